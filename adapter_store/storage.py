"""Open the configured object storage from its URI."""

from __future__ import annotations

from .errors import AdapterInvalid, ConfigError
from .storage_base import ObjectStorage
from .storage_local import LocalStorage, file_uri_path


def open_storage(uri: str, *, endpoint_url: str | None = None, max_attempts: int = 3) -> ObjectStorage:
    """``file:///path`` -> LocalStorage; ``s3://bucket/prefix`` -> S3Storage (endpoint optional)."""
    if uri.startswith("file://"):
        return LocalStorage(uri)
    if uri.startswith("s3://"):
        from .storage_s3 import S3Storage

        return S3Storage(uri, endpoint_url=endpoint_url, max_attempts=max_attempts)
    raise ConfigError(f"storage URI {uri!r} is not supported, expected file:///path or s3://bucket/prefix")


def check_storage_uri(uri: str) -> None:
    """Refuse (ConfigError) a storage URI ``open_storage`` could not open, without opening it:
    for checking a configuration before anything starts."""
    try:
        if uri.startswith("file://"):
            if not file_uri_path(uri).is_absolute():
                raise ConfigError(f"storage URI {uri!r} is not an absolute path, expected file:///path")
            return
        if uri.startswith("s3://"):
            from .storage_s3 import parse_s3_uri

            parse_s3_uri(uri)
            return
    except AdapterInvalid as e:
        raise ConfigError(f"storage URI: {e}") from None
    raise ConfigError(f"storage URI {uri!r} is not supported, expected file:///path or s3://bucket/prefix")
