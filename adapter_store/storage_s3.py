"""Object storage on S3 or an S3-compatible endpoint (``s3://bucket/prefix``).

Credentials come from the standard AWS chain (env, shared files, instance roles); the endpoint
URL is configurable for S3-compatible stores. Every botocore failure becomes StorageUnavailable
after botocore's own bounded retries, so callers see one domain error.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import AdapterInvalid, StorageUnavailable, UriOutsideStorage
from .storage_base import BLOB_PREFIX, BlobInfo, ObjectStorage, ProgressFn, blob_key, write_verified

_READ_CHUNK = 1 << 20


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix``. The key is taken as written, as the AWS
    CLI takes it: '#', '?' and '%' are part of it, not a fragment, a query or an escape."""
    bucket, _, key = uri[len("s3://"):].partition("/") if uri.startswith("s3://") else ("", "", "")
    if not bucket or "\0" in uri:
        raise AdapterInvalid(f"{uri[:200]!r} is not an s3:// URI, expected s3://bucket/prefix", param="uri")
    return bucket, key.strip("/")


class S3Storage(ObjectStorage):
    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
        max_attempts: int = 3, connect_timeout: float = 3.0, read_timeout: float = 30.0,
    ):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        session = boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                s3={"addressing_style": "path"},
                max_pool_connections=32,
            ),
        )
        self._transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _unavailable(self, what: str, e: Exception) -> StorageUnavailable:
        return StorageUnavailable(f"S3 storage {self.uri}: {what} failed: {e}")

    def put_blob(self, path: Path, sha256: str, size: int, progress: ProgressFn | None = None) -> None:
        if self.stat_blob(sha256) == size:
            if progress is not None:
                progress(size, size)
            return
        done = [0]

        def callback(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], size)

        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(blob_key(sha256)),
                ExtraArgs={"Metadata": {"sha256": sha256}}, Callback=callback, Config=self._transfer,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as e:  # (upload_file wraps ClientError)
            raise self._unavailable(f"upload of blob {sha256}", e) from None

    def stat_blob(self, sha256: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(blob_key(sha256)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._unavailable(f"stat of blob {sha256}", e) from None
        except BotoCoreError as e:
            raise self._unavailable(f"stat of blob {sha256}", e) from None
        return int(head["ContentLength"])

    def _stream(self, key: str, what: str, missing: Exception | None = None) -> Iterator[bytes]:
        """The object's bytes; ``missing`` (when given) is raised where there is no such key."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            yield from body.iter_chunks(_READ_CHUNK)
        except ClientError as e:
            if missing is not None and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise missing from None
            raise self._unavailable(what, e) from None
        except BotoCoreError as e:
            raise self._unavailable(what, e) from None

    def get_blob(self, sha256: str, dest: Path, size: int | None = None, progress: ProgressFn | None = None) -> None:
        chunks = self._stream(self._key(blob_key(sha256)), f"read of blob {sha256}")
        write_verified(chunks, dest, sha256=sha256, size=size, progress=progress)

    def delete_blob(self, sha256: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(blob_key(sha256)))
        except (BotoCoreError, ClientError) as e:
            raise self._unavailable(f"delete of blob {sha256}", e) from None

    def list_blobs(self) -> Iterator[BlobInfo]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(BLOB_PREFIX) + "/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    yield BlobInfo(name, int(obj["Size"]), obj["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as e:
            raise self._unavailable("listing blobs", e) from None

    def _resolve_dir(self, uri: str) -> str:
        if not uri.startswith("s3://"):
            raise UriOutsideStorage(f"URI {uri!r} is outside the configured storage {self.uri}", param="uri")
        bucket, key = parse_s3_uri(uri)
        parts = key.split("/")
        if ".." in parts or "." in parts or posixpath.normpath(key or ".") != (key or "."):
            raise UriOutsideStorage(f"URI {uri!r} is not a normalised path inside {self.uri}", param="uri")
        inside = bucket == self.bucket and (not self.prefix or key == self.prefix or key.startswith(self.prefix + "/"))
        if not inside:
            raise UriOutsideStorage(f"URI {uri!r} is outside the configured storage {self.uri}", param="uri")
        return key

    def list_uri(self, uri: str) -> dict[str, int]:
        prefix = self._resolve_dir(uri).rstrip("/") + "/"
        out: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix):]] = int(obj["Size"])
        except (BotoCoreError, ClientError) as e:
            raise self._unavailable(f"listing {uri}", e) from None
        if not out:
            raise AdapterInvalid(f"URI {uri!r} holds no files in {self.uri}", param="uri")
        return out

    def fetch_uri(self, uri: str, name: str, dest: Path, progress: ProgressFn | None = None) -> None:
        key = self._resolve_dir(uri).rstrip("/") + "/" + name
        # (deleted since it was listed)
        gone = AdapterInvalid(f"URI {uri!r}: {name} cannot be read: it is not there", param="uri")
        write_verified(self._stream(key, f"read of {uri}/{name}", gone), dest, sha256=None, size=None, progress=progress)

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            raise self._unavailable(f"reaching bucket {self.bucket}", e) from None
