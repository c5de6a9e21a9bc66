"""Validate a router artifact directory: ``router.safetensors`` (+ optional ``router.json``).

Only the header is read. The store checks the file is safetensors with float tensors; what each
tensor means (gate weights per layer, task embeddings) is the model side's business.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RouterInvalid
from .peft_validate import FLOAT_DTYPES, refuse_pickles
from .safetensors_header import read_header

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"  # the same file name as molora_core.routing.GateRouter writes


def router_files(directory: Path) -> dict[str, Path]:
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    refuse_pickles(names)
    if ROUTER_WEIGHTS not in names:
        raise RouterInvalid(f"router is missing {ROUTER_WEIGHTS}; found {names}", param="files")
    return {n: directory / n for n in (ROUTER_WEIGHTS, ROUTER_CONFIG) if n in names}


def validate_router(directory: Path) -> dict[str, Path]:
    """Check the router's files; return them by name."""
    files = router_files(directory)
    header = read_header(files[ROUTER_WEIGHTS], error=RouterInvalid)
    if not header.tensors:
        raise RouterInvalid(f"{ROUTER_WEIGHTS} holds no tensors, expected router weights")
    for key, t in header.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise RouterInvalid(f"router tensor {key!r} has dtype {t.dtype}, expected one of {list(FLOAT_DTYPES)}")
    if ROUTER_CONFIG in files:
        try:
            cfg = json.loads(files[ROUTER_CONFIG].read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RouterInvalid(f"{ROUTER_CONFIG} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise RouterInvalid(f"{ROUTER_CONFIG} holds a {type(cfg).__name__}, expected a JSON object")
    return files
