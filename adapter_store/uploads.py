"""Receive a multipart upload into a staging directory, with the size cap enforced while the
bytes stream in (a client that lies about Content-Length still cannot exceed it)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .archive import extract_archive, is_archive_name
from .errors import AdapterInvalid, AdapterTooLarge, RouterInvalid, UnsafeArchive

_OVERHEAD = 1 << 20  # multipart boundaries and small fields on top of the file bytes
_CHUNK = 1 << 20


async def _capped(stream: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > cap:
            raise AdapterTooLarge(f"upload is over the cap of {cap} bytes")
        yield chunk


def _safe_name(filename: str) -> str:
    path = PurePosixPath(filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise UnsafeArchive(f"uploaded file name {filename!r} is not a plain relative name")
    return path.name


async def receive_upload(request: Request, staging: Path, *, max_bytes: int,
                         kind: str = "adapter") -> dict[str, list[str]]:
    """Parse the multipart body of a `kind` ("adapter" or "router") upload; write file parts (or
    an archive's members) flat into ``staging``; return the text fields (name -> values)."""
    invalid = RouterInvalid if kind == "router" else AdapterInvalid
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + _OVERHEAD:
        raise AdapterTooLarge(f"upload of {length} bytes is over the cap of {max_bytes} bytes")
    parser = MultiPartParser(
        request.headers, _capped(request.stream(), max_bytes + _OVERHEAD),
        max_files=32, max_fields=64, max_part_size=256 << 10,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise invalid(f"multipart body is malformed: {e.message}") from None
    fields: dict[str, list[str]] = {}
    uploads: list[UploadFile] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(value)
            else:
                fields.setdefault(key, []).append(value)
        if not uploads:
            raise invalid(f"multipart upload has no file parts, expected the {kind}'s files or an archive")
        total = 0
        for up in uploads:
            name = _safe_name(up.filename or "")
            dest = staging / name
            if dest.exists():
                raise invalid(f"file {name!r} was uploaded twice")
            with open(dest, "wb") as out:
                while chunk := await up.read(_CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise AdapterTooLarge(f"uploaded files are over the cap of {max_bytes} bytes")
                    out.write(chunk)
        if len(uploads) == 1 and is_archive_name(uploads[0].filename or ""):
            archive = staging / _safe_name(uploads[0].filename or "")
            # A sibling directory of its own: a member may have any name, so no fixed name inside
            # staging is safe to extract into.
            unpacked = Path(tempfile.mkdtemp(prefix=f"{staging.name}-", dir=staging.parent))
            try:
                extract_archive(archive, unpacked, max_bytes=max_bytes)
                archive.unlink()
                for p in unpacked.iterdir():
                    p.rename(staging / p.name)
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)
    finally:
        await form.close()
    return fields


def field(fields: dict[str, list[str]], key: str, default: str | None = None) -> str | None:
    values = fields.get(key)
    return values[-1] if values else default


def list_field(fields: dict[str, list[str]], key: str) -> list[str]:
    """Repeated fields, or one field of comma-separated values (a JSON list also works)."""
    out: list[str] = []
    for value in fields.get(key, []):
        value = value.strip()
        if value.startswith("["):
            try:
                items = json.loads(value)
            except json.JSONDecodeError:
                raise AdapterInvalid(f"{key}={value!r} is not a JSON list", param=key) from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise AdapterInvalid(f"{key}={value!r}, expected a list of strings", param=key)
            out += items
        else:
            out += [v.strip() for v in value.split(",") if v.strip()]
    return out
