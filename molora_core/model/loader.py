"""Load a local Hugging Face model directory (Llama / Mistral / Qwen2 / Qwen3) into the runtime.

config.json through transformers' AutoConfig, the tokenizer through AutoTokenizer, both with
local files only. Weights from `model.safetensors` or a sharded `model.safetensors.index.json`,
read tensor by tensor with `safe_open` straight into a model built on the meta device, so peak
memory is one copy of the weights plus one tensor. Pickled weights (`*.bin`, `*.pt`) are refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from molora_core.errors import ModelLoadError
from molora_core.model.config import DecoderConfig, check_architecture, from_hf_config
from molora_core.model.decoder import DecoderForCausalLM

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any one of these (with its partner files) is enough for AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Keys some checkpoints carry that the runtime recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: DecoderForCausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    config: DecoderConfig
    path: Path

    def eos_token_ids(self) -> set[int]:
        """The tokenizer's EOS id plus generation_config.json's `eos_token_id` (one or a list)."""
        ids = set()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        gen = Path(self.path) / "generation_config.json" if self.path else None
        if gen is not None and gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(int(v) for v in (value if isinstance(value, list) else [value] if value is not None else []))
        return ids


def _directory(path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {str(root)!r} does not exist or is not a directory")
    return root


def load_config(path) -> DecoderConfig:
    """Read and check config.json, then build the runtime config through transformers."""
    root = _directory(path)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{root}: config.json is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from e
    check_architecture(raw, str(cfg_file))

    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{cfg_file}: transformers cannot read it ({e})") from e
    return from_hf_config(hf)


def weight_files(path) -> list[Path]:
    """The safetensors files holding the model's weights, shards checked to exist."""
    root = _directory(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: no readable 'weight_map' ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ModelLoadError(f"{root}: shards listed in {index.name} are missing: {missing}")
        return [root / s for s in shards]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    found = sorted(root.glob("*.safetensors"))
    if found:
        return found
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{root}: only pickled weights found ({pickled}); they are refused for safety. "
            "Convert them to model.safetensors"
        )
    raise ModelLoadError(
        f"{root}: no weights; expected model.safetensors or model.safetensors.index.json with its shards"
    )


def _resolve_dtype(dtype, raw_cfg: dict) -> torch.dtype:
    if dtype is None:
        dtype = raw_cfg.get("dtype") or raw_cfg.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ModelLoadError(f"dtype {dtype} is not supported; expected one of {sorted(_DTYPES)}")
    return dtype


def _resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r} is not a device torch knows, expected 'cpu', 'cuda' or 'cuda:N' "
                             f"({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} was asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {str(device)!r} was asked for, but torch sees {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor):
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))


def load_model(path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu") -> DecoderForCausalLM:
    """Build the decoder for the checkpoint at `path` and load its weights in `dtype` on `device`.

    dtype None takes config.json's `dtype` (fp32 if absent). Raises ModelLoadError naming the
    missing file, the unsupported architecture, or the missing / unexpected / mis-shaped tensors.
    """
    cfg = load_config(path)
    files = weight_files(path)
    dtype = _resolve_dtype(dtype, json.loads((Path(path) / "config.json").read_text()))
    device = _resolve_device(device)
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head appears once
    head = "lm_head.weight"
    stored_head = None  # a tied config's checkpoint may hold an lm_head all the same (see below)

    from safetensors import safe_open

    loaded, unexpected = set(), []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if name == head and cfg.tie_word_embeddings:
                    stored_head = f.get_tensor(name)
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise ModelLoadError(
                        f"{file.name}: {name} has shape {tuple(tensor.shape)}, the config expects "
                        f"{tuple(expected[name])}"
                    )
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                _set_tensor(model, name, tensor.to(device))
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match the {cfg.architecture} config; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    if cfg.tie_word_embeddings:
        embed = model.model.embed_tokens.weight
        if stored_head is not None and tuple(stored_head.shape) != tuple(embed.shape):
            raise ModelLoadError(f"{path}: lm_head.weight has shape {tuple(stored_head.shape)}, the config "
                                 f"expects {tuple(embed.shape)}")
        if stored_head is not None and not torch.equal(stored_head.to(embed.device, embed.dtype), embed):
            # As transformers does: a stored head that differs from the embeddings is the model's own.
            log.warning("%s: tie_word_embeddings is set but the checkpoint's lm_head.weight differs from "
                        "embed_tokens.weight; using the stored lm_head (untied), as transformers does", path)
            model.lm_head.weight = nn.Parameter(stored_head.to(device, dtype), requires_grad=False)
        else:
            model.lm_head.weight = embed
    return model.eval()


def load_tokenizer(path):
    """The directory's tokenizer through transformers' AutoTokenizer, local files only."""
    root = _directory(path)
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{root}: no tokenizer files; expected one of {list(TOKENIZER_FILES)} "
            "(with tokenizer_config.json)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{root}: transformers cannot load the tokenizer ({e})") from e


def load_pretrained(path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Model, tokenizer and config of a model directory; every file is checked before any load."""
    root = _directory(path)
    cfg = load_config(root)
    weight_files(root)
    tokenizer = load_tokenizer(root)
    return LoadedModel(load_model(root, dtype, device), tokenizer, cfg, root)
