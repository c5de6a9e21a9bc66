"""Object storage: one interface, content-addressed blobs, verified reads.

A blob is stored under ``blobs/sha256/<aa>/<sha256>`` of the storage root. Every read hashes the
bytes while it streams them and refuses a mismatch (``IntegrityError``); writes land in a temporary
name first, so a reader never sees half a blob. Registration by URI reads user files from
elsewhere under the same root, and a URI outside the root is refused (``UriOutsideStorage``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError

ProgressFn = Callable[[int, int], None]
"""progress(bytes_done, bytes_total), called as a transfer streams."""

CHUNK = 4 << 20
BLOB_PREFIX = "blobs/sha256"


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    mtime: float


def blob_key(sha256: str) -> str:
    return f"{BLOB_PREFIX}/{sha256[:2]}/{sha256}"


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, streamed."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def write_verified(
    chunks: Iterable[bytes], dest: Path, *, sha256: str | None, size: int | None, progress: ProgressFn | None = None
) -> str:
    """Stream ``chunks`` to ``dest`` atomically; when ``sha256`` is given, refuse a mismatch.

    Returns the sha256 of what was written. On any failure nothing is left at ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    h, done = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, size or done)
        digest = h.hexdigest()
        if sha256 is not None and (digest != sha256 or (size is not None and done != size)):
            raise IntegrityError(
                f"blob {sha256} read back as {done} bytes hashing to {digest}, "
                f"expected {size} bytes with sha256 {sha256}"
            )
        os.replace(tmp, dest)
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class ObjectStorage(ABC):
    """Content-addressed blob store plus read access to user files under the same root."""

    uri: str

    @abstractmethod
    def put_blob(self, path: Path, sha256: str, size: int, progress: ProgressFn | None = None) -> None:
        """Store local file ``path`` as blob ``sha256``; a no-op when it is already stored."""

    @abstractmethod
    def stat_blob(self, sha256: str) -> int | None:
        """Size of the stored blob, or None when it is absent."""

    @abstractmethod
    def get_blob(self, sha256: str, dest: Path, size: int | None = None, progress: ProgressFn | None = None) -> None:
        """Stream blob ``sha256`` to ``dest``, verifying its hash (IntegrityError on mismatch)."""

    @abstractmethod
    def delete_blob(self, sha256: str) -> None:
        """Remove a blob (missing is fine)."""

    @abstractmethod
    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob."""

    @abstractmethod
    def list_uri(self, uri: str) -> dict[str, int]:
        """Files directly under directory ``uri`` (name -> size); UriOutsideStorage if not ours."""

    @abstractmethod
    def fetch_uri(self, uri: str, name: str, dest: Path, progress: ProgressFn | None = None) -> None:
        """Copy file ``name`` of directory ``uri`` to local ``dest``."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StorageUnavailable when the storage cannot be reached."""

    def verify_blob(self, sha256: str, size: int) -> None:
        """After an upload: the blob is there with the right size (reads re-hash later)."""
        stored = self.stat_blob(sha256)
        if stored != size:
            raise IntegrityError(f"blob {sha256} is stored with size {stored}, expected {size}")
