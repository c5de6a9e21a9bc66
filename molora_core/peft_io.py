"""Read and write adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Only safetensors are read; a pickled adapter_model.bin is refused, since unpickling runs code.
Scales follow PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with per-module
overrides from rank_pattern and alpha_pattern.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from molora_core.adapter import LoRAAdapter, LoRAModule
from molora_core.errors import AdapterInvalid

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of a PEFT directory, with the options we cannot serve refused."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterInvalid(f"{path} is not a PEFT adapter directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterInvalid(f"{config_path} is not valid JSON: {exc}") from None
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterInvalid(f"{config_path}: peft_type {peft_type!r} is not supported; expected 'LORA'")
    for flag, why in (
        ("use_dora", "DoRA magnitude vectors"),
        ("fan_in_fan_out", "Conv1D (fan_in_fan_out) layouts"),
    ):
        if config.get(flag):
            raise AdapterInvalid(f"{config_path}: {flag}=true is not supported ({why})")
    if config.get("alora_invocation_tokens"):
        raise AdapterInvalid(
            f"{config_path}: alora_invocation_tokens is set (Activated LoRA applies the adapter only from its "
            "invocation tokens on), which is not supported; expected a plain LoRA"
        )
    if config.get("modules_to_save"):
        raise AdapterInvalid(
            f"{config_path}: modules_to_save={config['modules_to_save']} would replace full base "
            "modules, which cannot be routed per token; expected none"
        )
    if config.get("bias", "none") != "none":
        raise AdapterInvalid(f"{config_path}: bias={config['bias']!r} is not supported; expected 'none'")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterInvalid(f"{config_path}: r must be a positive integer; got {config.get('r')!r}")
    return config


PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key (a regex; its alternatives grouped) applies to a module whose
    path ends with it. (The registry
    refuses keys that do not compile or could backtrack without end: adapter_store/patterns.py.)"""
    for key, value in (patterns or {}).items():
        try:
            if module == key or re.compile(key) and re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                return value
        except re.error as exc:
            raise AdapterInvalid(f"rank_pattern / alpha_pattern key {key!r} is not a valid regex: {exc}") from None
    return default


def module_scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_peft_adapter(
    path: str | Path, name: str | None = None, dtype: torch.dtype | None = None
) -> LoRAAdapter:
    """Load a PEFT LoRA directory into host memory.

    Returns a LoRAAdapter keyed by module path without PEFT's `base_model.model.` prefix.
    Raises AdapterInvalid for a missing or pickled weights file, unknown keys, mismatched
    lora_A / lora_B pairs, ranks that disagree with the config, or NaN / Inf values.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        pickled = [p for p in PICKLED_NAMES if (path / p).exists()]
        if pickled:
            raise AdapterInvalid(
                f"{path / pickled[0]} is a pickled checkpoint, which is refused (it can run code); "
                f"convert it to {WEIGHTS_NAME}"
            )
        raise AdapterInvalid(f"{path}: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterInvalid(f"{weights_path} is not a readable safetensors file: {exc}") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterInvalid(
                f"{weights_path}: tensor {key!r} is not a LoRA weight; expected "
                "'<module>.lora_A.weight' / '<module>.lora_B.weight'"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor

    modules = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterInvalid(f"{weights_path}: module {module} has lora_{''.join(pair)} only; expected A and B")
        a, b = pair["A"], pair["B"]
        rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterInvalid(
                f"{weights_path}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected [{rank}, D_in] and [D_out, {rank}] for rank {rank}"
            )
        for which, tensor in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(tensor).all():
                raise AdapterInvalid(f"{weights_path}: module {module} {which} holds NaN or Inf values")
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        modules[module] = LoRAModule(a.contiguous(), b.contiguous(), module_scale(config, module, rank))
    if not modules:
        raise AdapterInvalid(f"{weights_path} holds no LoRA weights")
    meta = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")}
    return LoRAAdapter(name=name or path.name, modules=modules, meta=meta)


def save_peft_adapter(
    adapter: LoRAAdapter, path: str | Path, lora_alpha: float | None = None, base_model: str | None = None
) -> Path:
    """Write `adapter` as a PEFT directory that PEFT's own `PeftModel.from_pretrained` reads.

    Per-module scales are expressed through alpha_pattern relative to the common rank.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank = adapter.rank
    alpha = lora_alpha if lora_alpha is not None else rank
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for module, weights in adapter.modules.items():
        module_alpha = weights.scale * weights.rank
        if weights.rank != rank:
            rank_pattern[module] = weights.rank
        if not math.isclose(module_alpha, alpha, rel_tol=1e-6):
            alpha_pattern[module] = module_alpha
        tensors[f"base_model.model.{module}.lora_A.weight"] = weights.lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = weights.lora_b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "bias": "none",
        "target_modules": adapter.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / WEIGHTS_NAME))
    return path
