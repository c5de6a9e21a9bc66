"""Validate a router artifact directory: ``router.safetensors`` + ``router.json``.

Only the header is read. For a ``gate`` router every rule the replica applies when it loads one is
restated here (this package does not import molora_core), so a router that registers also serves:
``GateRouter.load`` in molora_core/routing/gate.py (router.json with kind 'gate', hidden_size and
top_k in [1, number of adapters]; exactly gate.weight [A, D] and gate.bias [A]) and
``_load_router`` in deployments/replica.py (router.json's adapters equal the manifest's, in order)
and the engine's admission (top_k at most the replicas' max_top_k).
``task`` routers are not served yet; for them the store checks the weights are float tensors and,
when router.json lists adapters, that the list matches.
"""

from __future__ import annotations

from pathlib import Path

from .errors import RouterInvalid
from .peft_validate import FLOAT_DTYPES, read_json_object, refuse_pickles
from .safetensors_header import SafetensorsHeader, read_header

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"  # the same file name as molora_core.routing.GateRouter writes
GATE_DEFAULT_TOP_K = 2  # GateRouter.load's default when router.json has no top_k


def router_files(directory: Path, *, require_config: bool = False) -> dict[str, Path]:
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    refuse_pickles(names)
    required = (ROUTER_WEIGHTS, ROUTER_CONFIG) if require_config else (ROUTER_WEIGHTS,)
    missing = [n for n in required if n not in names]
    if missing:
        raise RouterInvalid(f"router is missing {missing}; found {names}, expected {list(required)}", param="files")
    return {n: directory / n for n in (ROUTER_WEIGHTS, ROUTER_CONFIG) if n in names}


def _positive_int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RouterInvalid(f"{ROUTER_CONFIG}: {key}={value!r}, expected a positive integer", param=key)
    return value


def _check_gate(cfg: dict, header: SafetensorsHeader, adapters: list[str], hidden_size: int | None,
                max_top_k: int | None) -> None:
    if cfg.get("kind") != "gate":
        raise RouterInvalid(f"{ROUTER_CONFIG}: kind={cfg.get('kind')!r}, expected 'gate' for a gate router",
                            param="kind")
    hidden = _positive_int(cfg, "hidden_size")
    if hidden_size is not None and hidden != hidden_size:
        raise RouterInvalid(f"{ROUTER_CONFIG}: hidden_size={hidden}, but the base model's hidden size is "
                            f"{hidden_size}", param="hidden_size")
    top_k = _positive_int(cfg, "top_k", GATE_DEFAULT_TOP_K)
    if top_k > len(adapters):
        raise RouterInvalid(f"{ROUTER_CONFIG}: top_k={top_k} for {len(adapters)} adapters, expected "
                            f"1..{len(adapters)}", param="top_k")
    if max_top_k is not None and top_k > max_top_k:
        raise RouterInvalid(f"{ROUTER_CONFIG}: top_k={top_k} is over the serving replicas' max_top_k={max_top_k} "
                            "(MOLORA_MAX_TOP_K), the most adapters one token mixes", param="top_k")
    want = {"gate.weight": (len(adapters), hidden), "gate.bias": (len(adapters),)}
    if set(header.tensors) != set(want):
        raise RouterInvalid(f"{ROUTER_WEIGHTS} holds tensors {sorted(header.tensors)}, expected exactly "
                            f"{sorted(want)}", param="files")
    for key, shape in want.items():
        got = header.tensors[key].shape
        if tuple(got) != shape:
            raise RouterInvalid(f"{ROUTER_WEIGHTS}: {key} has shape {list(got)}, expected {list(shape)} "
                                f"({len(adapters)} adapters x hidden_size {hidden})", param="files")


def validate_router(directory: Path, *, kind: str = "gate", adapters: list[str] | None = None,
                    hidden_size: int | None = None, max_top_k: int | None = None) -> dict[str, Path]:
    """Check the router's files against its ``kind``, its ordered ``adapters``, the base
    model's ``hidden_size`` and the replicas' ``max_top_k`` (None: unknown, not checked);
    return the files by name."""
    files = router_files(Path(directory), require_config=kind == "gate")
    header = read_header(files[ROUTER_WEIGHTS], error=RouterInvalid)
    if not header.tensors:
        raise RouterInvalid(f"{ROUTER_WEIGHTS} holds no tensors, expected router weights")
    for key, t in header.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise RouterInvalid(f"router tensor {key!r} has dtype {t.dtype}, expected one of {list(FLOAT_DTYPES)}")
    cfg = read_json_object(files[ROUTER_CONFIG], RouterInvalid) if ROUTER_CONFIG in files else {}
    listed = cfg.get("adapters")
    if adapters is not None and (kind == "gate" or listed is not None) and listed != list(adapters):
        # Output i of the router is adapters[i]: another order or a subset would route every
        # token to the wrong adapter, so the replica refuses it; refuse it here instead.
        raise RouterInvalid(f"{ROUTER_CONFIG} lists adapters {listed!r}, but the registration names "
                            f"{list(adapters)}; expected the same names in the same order", param="adapters")
    if kind == "gate":
        _check_gate(cfg, header, list(adapters or listed or []), hidden_size, max_top_k)
    return files
