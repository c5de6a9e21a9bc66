"""Validate a PEFT LoRA adapter directory without loading tensors.

Reads adapter_config.json and the safetensors header only, and checks tensor names, shapes,
dtypes and rank against the base model's signature. Values (NaN/Inf) are the model side's check
when it loads the weights.

Whatever passes here must also load on a replica, so the loader's rules are restated here (this
package does not import molora_core): the config options ``read_adapter_config`` in
molora_core/peft_io.py refuses, and the module paths the hot-set holds (``HotSet.validate`` in
molora_core/hotset.py: ``model.layers.<i>.self_attn.{q,k,v,o}_proj`` and
``model.layers.<i>.mlp.{gate,up,down}_proj``, ``<i>`` written without leading zeros).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .base_model import ALL_MODULES, ATTENTION_MODULES, BaseModelSignature
from .errors import AdapterInvalid, PickledWeights
from .patterns import Deadline, compile_pattern_keys, compile_target_regex, fullmatch, pattern_value
from .safetensors_header import read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = ("F32", "F16", "BF16")
# The module paths of our decoder (molora_core/model), which are the keys of the hot-set's buffers.
_KEY_RE = re.compile(
    r"base_model\.model\.(?P<path>model\.layers\.(?P<layer>0|[1-9][0-9]{0,5})\.(?P<block>self_attn|mlp)"
    r"\.(?P<module>[a-z_]+))\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight"
)
KEY_FORM = "'base_model.model.model.layers.<i>.self_attn|mlp.<module>.lora_A|lora_B.weight'"
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out
MAX_ALPHA = 1e6  # lora_alpha / alpha_pattern values: the loader's scale alpha/r must stay a sane float32


@dataclass(frozen=True)
class ValidatedAdapter:
    """What validation learned; becomes an AdapterManifest once the files are stored."""

    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]
    layers: list[int]
    dtype: str
    base_model_name_or_path: str


def refuse_pickles(names: list[str]) -> None:
    bad = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise PickledWeights(
            f"pickled weights {bad} are refused (they can run code when loaded); "
            f"expected {WEIGHTS_FILE} (safetensors)",
            param="files",
        )


def adapter_files(directory: Path) -> dict[str, Path]:
    """The adapter's files in ``directory``: pickles refused, both PEFT files required."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    refuse_pickles(names)
    missing = [f for f in ADAPTER_FILES if f not in names]
    if missing:
        raise AdapterInvalid(f"adapter is missing {missing}; found {names}, expected {list(ADAPTER_FILES)}", param="files")
    return {f: directory / f for f in ADAPTER_FILES}


def _full_name(module: str) -> str:
    block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return f"model.layers.0.{block}.{module}"


def _target_modules(raw, base: BaseModelSignature, deadline: Deadline) -> set[str]:
    if isinstance(raw, str):
        if raw == "all-linear":
            return set(ALL_MODULES)
        # PEFT fullmatches a string against each module's full dotted name.
        pattern = compile_target_regex(raw)
        matched = {m for m in ALL_MODULES
                   if m == raw or fullmatch(pattern, _full_name(m), deadline, "target_modules")}
        if not matched:
            raise AdapterInvalid(f"target_modules {raw!r} matches none of the known modules {list(ALL_MODULES)}",
                                 param="target_modules")
        return matched
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
        raise AdapterInvalid(f"target_modules {raw!r} must be a non-empty list of module names or a string",
                             param="target_modules")
    unknown = sorted(set(raw) - set(base.modules))
    if unknown:
        raise AdapterInvalid(
            f"unknown target modules {unknown}; expected a subset of {list(base.modules)}", param="target_modules"
        )
    return set(raw)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sane_alpha(value) -> bool:
    # NaN and +-inf fail the comparison; an inf would be stored as null and poison every read.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_ALPHA


def read_json_object(path: Path, error: type[Exception] = AdapterInvalid) -> dict:
    """A JSON object file's contents; ``error`` names the file when it is not one."""
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise error(f"{path.name} holds a {type(cfg).__name__}, expected a JSON object")
    return cfg


def _read_config(path: Path, max_rank: int) -> dict:
    cfg = read_json_object(path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterInvalid(f"peft_type {peft_type!r} is not supported, expected 'LORA'")
    if cfg.get("use_dora"):
        raise AdapterInvalid("use_dora=true is not supported, expected plain LoRA")
    if cfg.get("alora_invocation_tokens"):
        raise AdapterInvalid("alora_invocation_tokens is set (Activated LoRA applies the adapter only from its "
                             "invocation tokens on), which is not supported; expected plain LoRA",
                             param="alora_invocation_tokens")
    if cfg.get("modules_to_save"):
        raise AdapterInvalid(f"modules_to_save {cfg['modules_to_save']!r} is not supported, expected none")
    # The loader (molora_core/peft_io.py, read_adapter_config) refuses these; so must we.
    if cfg.get("fan_in_fan_out"):
        raise AdapterInvalid("fan_in_fan_out=true (Conv1D layouts) is not supported, expected false",
                             param="fan_in_fan_out")
    if cfg.get("bias", "none") != "none":
        raise AdapterInvalid(f"bias={cfg['bias']!r} is not supported, expected 'none'", param="bias")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _is_int(r) or r < 1:
        raise AdapterInvalid(f"r={r!r} in {CONFIG_FILE}, expected a positive integer", param="r")
    if not _is_sane_alpha(alpha):
        raise AdapterInvalid(f"lora_alpha={alpha!r} in {CONFIG_FILE}, expected a finite number in (0, {MAX_ALPHA:g}]",
                             param="lora_alpha")
    for key, ok, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"),
                          ("alpha_pattern", _is_sane_alpha, f"finite numbers in (0, {MAX_ALPHA:g}]")):
        value = cfg.get(key) or {}
        if not isinstance(value, dict) or not all(ok(v) for v in value.values()):
            raise AdapterInvalid(f"{key}={value!r}, expected a map of module patterns to {want}", param=key)
        cfg[key] = value
    ranks = [r, *cfg["rank_pattern"].values()]
    if max(ranks) > max_rank:
        raise AdapterInvalid(f"rank {max(ranks)} is over the maximum rank {max_rank}", param="r")
    return cfg


def validate_adapter(directory: Path, base: BaseModelSignature, *, max_rank: int) -> ValidatedAdapter:
    """Check a PEFT adapter directory against ``base``; raise AdapterInvalid naming the problem."""
    files = adapter_files(directory)
    cfg = _read_config(files[CONFIG_FILE], max_rank)
    deadline = Deadline()
    targets = _target_modules(cfg.get("target_modules"), base, deadline)
    compiled = {key: compile_pattern_keys(key, cfg[key]) for key in ("rank_pattern", "alpha_pattern")}
    header = read_header(files[WEIGHTS_FILE])
    if not header.tensors:
        raise AdapterInvalid(f"{WEIGHTS_FILE} holds no tensors, expected lora_A/lora_B weights")

    pairs: dict[str, dict[str, tuple]] = {}
    dtypes, layers, present = set(), set(), set()
    for key, t in header.tensors.items():
        m = _KEY_RE.fullmatch(key)
        if not m:
            raise AdapterInvalid(f"tensor {key!r} is not a LoRA weight of a decoder projection, expected {KEY_FORM}")
        module, layer = m["module"], int(m["layer"])
        if module not in base.modules:
            raise AdapterInvalid(f"tensor {key!r} targets unknown module {module!r}; expected one of {list(base.modules)}")
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        if m["block"] != block:
            raise AdapterInvalid(f"tensor {key!r} places {module!r} under {m['block']!r}, expected {block!r}")
        if module not in targets:
            raise AdapterInvalid(f"tensor {key!r} targets {module!r}, which target_modules {sorted(targets)} does not list")
        if layer >= base.num_layers:
            raise AdapterInvalid(f"tensor {key!r} is for layer {layer}, but the base model has {base.num_layers} layers")
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterInvalid(f"tensor {key!r} has dtype {t.dtype}, expected one of {list(FLOAT_DTYPES)}")
        if len(t.shape) != 2:
            raise AdapterInvalid(f"tensor {key!r} has shape {list(t.shape)}, expected 2 dimensions")
        pair = pairs.setdefault(m["path"], {})
        if m["ab"] in pair:
            raise AdapterInvalid(f"tensors {pair[m['ab']][0]!r} and {key!r} are both lora_{m['ab']} of {m['path']}, "
                                 "expected one")
        pair[m["ab"]] = (key, t.shape, module)
        dtypes.add(t.dtype)
        layers.add(layer)
        present.add(module)

    if len(dtypes) > 1:
        raise AdapterInvalid(f"weights mix dtypes {sorted(dtypes)}, expected one dtype")
    max_seen = 0
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            raise AdapterInvalid(f"tensor {have!r} has no lora_{'B' if 'A' in ab else 'A'} partner")
        (_, a_shape, module), (_, b_shape, _) = ab["A"], ab["B"]
        shape = base.modules[module]
        rank = pattern_value("rank_pattern", cfg["rank_pattern"], compiled["rank_pattern"], path, cfg["r"], deadline)
        # The loader evaluates alpha_pattern for every module too: decide it here, in bounded time.
        pattern_value("alpha_pattern", cfg["alpha_pattern"], compiled["alpha_pattern"], path, None, deadline)
        want_a, want_b = (rank, shape.d_in), (shape.d_out, rank)
        if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
            raise AdapterInvalid(
                f"{path}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit the base model "
                f"{base.architecture}, expected {list(want_a)} / {list(want_b)}"
            )
        max_seen = max(max_seen, rank)
    return ValidatedAdapter(
        rank=max_seen,
        alpha=float(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern={k: int(v) for k, v in cfg["rank_pattern"].items()},
        alpha_pattern={k: float(v) for k, v in cfg["alpha_pattern"].items()},
        target_modules=sorted(present),
        layers=sorted(layers),
        dtype=dtypes.pop(),
        base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
    )
