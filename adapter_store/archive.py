"""Safe extraction of uploaded archives (tar, tar.gz/bz2/xz, zip) into a staging directory.

Every member is checked before anything is written: no absolute paths, no '..', no links or
devices, and the total unpacked size under the cap (so a compression bomb stops early). Files are
flattened to their base names; PEFT directories are flat.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import AdapterInvalid, AdapterTooLarge, UnsafeArchive

_CHUNK = 1 << 20


def _check_member(name: str, is_file: bool = True) -> str:
    """Return the member's file name, or raise UnsafeArchive naming it."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute path, expected a relative one")
    if ".." in path.parts:
        raise UnsafeArchive(f"archive member {name!r} contains '..' (path traversal), expected a plain path")
    if is_file and path.name in ("", ".", ".."):
        # '.' or './' as a file would be written over the extraction directory itself.
        raise UnsafeArchive(f"archive member {name!r} is a file without a name, expected a file name")
    return path.name


def _copy(src, dest: Path, budget: list[int], max_bytes: int) -> None:
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            budget[0] += len(chunk)
            if budget[0] > max_bytes:
                raise AdapterTooLarge(f"archive unpacks to more than the cap of {max_bytes} bytes")
            out.write(chunk)


def extract_archive(archive: Path, dest: Path, *, max_bytes: int) -> list[str]:
    """Unpack ``archive`` flat into ``dest``; return the file names written."""
    try:
        return _extract(archive, dest, max_bytes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise AdapterInvalid(f"archive is truncated or corrupt ({e.__class__.__name__})") from None


def _extract(archive: Path, dest: Path, max_bytes: int) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    budget = [0]
    names: list[str] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            for info in infos:
                _check_member(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchive(f"archive member {info.filename!r} is a symlink, expected a regular file")
            if sum(i.file_size for i in infos) > max_bytes:
                raise AdapterTooLarge(f"archive declares more than the cap of {max_bytes} bytes")
            for info in infos:
                name = _check_member(info.filename)
                with zf.open(info) as src:
                    _copy(src, dest / name, budget, max_bytes)
                names.append(name)
        return _unique(names)
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError):
        raise AdapterInvalid("upload is not a readable tar or zip archive") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError):
            raise AdapterInvalid("tar archive is truncated or corrupt") from None
        for m in members:
            _check_member(m.name, m.isfile())
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchive(f"archive member {m.name!r} is a link or device, expected a regular file")
        files = [m for m in members if m.isfile()]
        if sum(m.size for m in files) > max_bytes:
            raise AdapterTooLarge(f"archive declares more than the cap of {max_bytes} bytes")
        for m in files:
            name = _check_member(m.name)
            src = tf.extractfile(m)
            assert src is not None
            with src:
                _copy(src, dest / name, budget, max_bytes)
            names.append(name)
    return _unique(names)


def _unique(names: list[str]) -> list[str]:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AdapterInvalid(f"archive holds {dupes} more than once; expected one adapter directory")
    return names


def is_archive_name(filename: str) -> bool:
    return filename.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip"))


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
