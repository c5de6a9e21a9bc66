"""Read and check a safetensors header without loading any tensor.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor buffer. The JSON
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the buffer) plus an optional ``__metadata__`` map of strings.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterInvalid

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | Path, *, error: type[AdapterInvalid] = AdapterInvalid) -> SafetensorsHeader:
    """Parse and fully check the header of ``path``: dtypes known, shapes consistent with the
    byte ranges, ranges inside the file, contiguous and non-overlapping (a truncated file fails)."""
    path = Path(path)
    name = path.name
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise error(f"{name}: {size} bytes is too short for a safetensors file (need >= 8)")
        if prefix.startswith(PICKLE_MAGIC):
            raise error(f"{name}: looks like a pickle/torch.save file, expected safetensors")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise error(f"{name}: header length {n} does not fit a file of {size} bytes (truncated or corrupt)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{name}: header is not valid JSON ({e.__class__.__name__}); corrupt safetensors") from None
    if not isinstance(header, dict):
        raise error(f"{name}: header is a {type(header).__name__}, expected a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{name}: __metadata__ must map strings to strings")

    buffer_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise error(f"{name}: entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise error(f"{name}: tensor {key!r} has dtype {dtype!r}, expected one of {sorted(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise error(f"{name}: tensor {key!r} has shape {shape!r}, expected a list of non-negative ints")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]
        ):
            raise error(f"{name}: tensor {key!r} has data_offsets {offsets!r}, expected [begin, end]")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise error(
                f"{name}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes, "
                f"expected {nbytes} for {dtype} {shape}"
            )
        ranges.append((offsets[0], offsets[1], key))
        tensors[key] = TensorInfo(key, dtype, tuple(shape), nbytes)

    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            raise error(f"{name}: tensor {key!r} starts at {begin}, expected {end} (holes or overlaps)")
        end = stop
    if end > buffer_len:
        raise error(f"{name}: tensors need {end} bytes of data but the file holds {buffer_len} (truncated)")
    if end != buffer_len:
        raise error(f"{name}: {buffer_len - end} trailing bytes after the last tensor (corrupt)")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, file_size=size)
