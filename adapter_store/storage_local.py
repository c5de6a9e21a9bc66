"""Object storage in a local directory (``file:///path``), the embedded default."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import AdapterInvalid, StorageUnavailable, UriOutsideStorage
from .storage_base import (
    BLOB_PREFIX, CHUNK, BlobInfo, ObjectStorage, ProgressFn, blob_key, file_chunks, write_verified,
)

_NAME_MAX = 255   # bytes per path component (Linux NAME_MAX)
_PATH_MAX = 4096  # bytes per path (Linux PATH_MAX)


def file_uri_path(uri: str) -> Path:
    parsed = urlsplit(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise AdapterInvalid(f"{uri!r} is not a file:// URI, expected file:///absolute/path", param="uri")
    if "?" in uri or "#" in uri:
        # A file URI's '#' or '?' would cut the path short: another directory, silently.
        raise AdapterInvalid(f"{uri!r} holds a query or fragment ('?' or '#'), expected a plain path; "
                             "write '#' as %23 and '?' as %3F", param="uri")
    return Path(unquote(parsed.path))


class LocalStorage(ObjectStorage):
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.root = file_uri_path(uri).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"cannot create storage directory {self.root}: {e}") from None

    def _blob_path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def put_blob(self, path: Path, sha256: str, size: int, progress: ProgressFn | None = None) -> None:
        dest = self._blob_path(sha256)
        if self.stat_blob(sha256) == size:
            if progress is not None:
                progress(size, size)
            return
        try:
            write_verified(file_chunks(path), dest, sha256=sha256, size=size, progress=progress)
        except OSError as e:
            raise StorageUnavailable(f"cannot write blob {sha256} under {self.root}: {e}") from None

    def stat_blob(self, sha256: str) -> int | None:
        try:
            return self._blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageUnavailable(f"cannot stat blob {sha256}: {e}") from None

    def get_blob(self, sha256: str, dest: Path, size: int | None = None, progress: ProgressFn | None = None) -> None:
        src = self._blob_path(sha256)
        if not src.is_file():
            raise StorageUnavailable(f"blob {sha256} is missing from {self.uri}")
        try:
            write_verified(file_chunks(src), dest, sha256=sha256, size=size, progress=progress)
        except OSError as e:
            raise StorageUnavailable(f"cannot read blob {sha256}: {e}") from None

    def delete_blob(self, sha256: str) -> None:
        try:
            self._blob_path(sha256).unlink(missing_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"cannot delete blob {sha256}: {e}") from None

    def list_blobs(self) -> Iterator[BlobInfo]:
        base = self.root / BLOB_PREFIX
        try:
            subs = sorted(base.iterdir()) if base.is_dir() else []
            for sub in subs:
                for p in sorted(sub.iterdir()):
                    if p.name.startswith("."):
                        continue
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue  # deleted meanwhile (another collector)
                    if stat.S_ISREG(st.st_mode):
                        yield BlobInfo(p.name, st.st_size, st.st_mtime)
        except OSError as e:
            raise StorageUnavailable(f"cannot list blobs under {base}: {e}") from None

    def _resolve_dir(self, uri: str) -> Path:
        if not uri.startswith("file://"):
            raise UriOutsideStorage(f"URI {uri!r} is outside the configured storage {self.uri}", param="uri")
        path = file_uri_path(uri)
        # The OS would refuse these with ValueError / ENAMETOOLONG; name the problem instead.
        if "\0" in str(path):
            raise AdapterInvalid(f"URI {uri!r} holds a NUL byte, expected a plain path", param="uri")
        long = [p for p in path.parts if len(os.fsencode(p)) > _NAME_MAX]
        if long or len(os.fsencode(str(path))) > _PATH_MAX:
            raise AdapterInvalid(
                f"URI {uri[:100]!r}{'...' if len(uri) > 100 else ''} has a path component over {_NAME_MAX} "
                f"bytes or is over {_PATH_MAX} bytes, expected shorter names",
                param="uri",
            )
        if ".." in path.parts or not path.is_absolute():
            raise UriOutsideStorage(f"URI {uri!r} is not a plain absolute path inside {self.uri}", param="uri")
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            raise UriOutsideStorage(f"URI {uri!r} is outside the configured storage {self.uri}", param="uri")
        return real

    def list_uri(self, uri: str) -> dict[str, int]:
        directory = self._resolve_dir(uri)
        try:
            if not directory.is_dir():
                raise AdapterInvalid(f"URI {uri!r} is not a directory in {self.uri}", param="uri")
            return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and not p.is_symlink()}
        except OSError as e:
            raise AdapterInvalid(f"URI {uri!r} cannot be listed: {e.strerror}", param="uri") from None

    def fetch_uri(self, uri: str, name: str, dest: Path, progress: ProgressFn | None = None) -> None:
        src = self._resolve_dir(uri) / name
        try:  # (gone or unreadable since it was listed: the user's file, a 400)
            size, source = src.stat().st_size, open(src, "rb")
        except OSError as e:
            raise AdapterInvalid(f"URI {uri!r}: {name} cannot be read: {e.strerror}", param="uri") from None
        with source:
            try:
                write_verified(iter(lambda: source.read(CHUNK), b""), dest, sha256=None, size=size, progress=progress)
            except OSError as e:
                raise StorageUnavailable(f"cannot copy {name} of {uri!r} to {dest.parent}: {e}") from None

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"storage directory {self.root} is not writable")
