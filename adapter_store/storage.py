"""Open the configured object storage from its URI."""

from __future__ import annotations

from .errors import ConfigError
from .storage_base import ObjectStorage
from .storage_local import LocalStorage


def open_storage(uri: str, *, endpoint_url: str | None = None, max_attempts: int = 3) -> ObjectStorage:
    """``file:///path`` -> LocalStorage; ``s3://bucket/prefix`` -> S3Storage (endpoint optional)."""
    if uri.startswith("file://"):
        return LocalStorage(uri)
    if uri.startswith("s3://"):
        from .storage_s3 import S3Storage

        return S3Storage(uri, endpoint_url=endpoint_url, max_attempts=max_attempts)
    raise ConfigError(f"storage URI {uri!r} is not supported, expected file:///path or s3://bucket/prefix")
