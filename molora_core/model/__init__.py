"""Compact decoder runtime for the Llama, Mistral, Qwen2 and Qwen3 families.

Module names follow Hugging Face's, projections are plain nn.Linear (replaceable by name with
LoRA-aware layers), and `DecoderForCausalLM.forward` runs one continuous-batching step over the
flat tokens of many sequences against a `KVCache` allocated once.
"""

from molora_core.model.batch import StepBatch
from molora_core.model.config import SUPPORTED_ARCHITECTURES, DecoderConfig, from_hf_config
from molora_core.model.decoder import DecoderForCausalLM
from molora_core.model.kv_cache import KVCache
from molora_core.model.loader import LoadedModel, load_config, load_model, load_pretrained, load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DecoderConfig",
    "DecoderForCausalLM",
    "KVCache",
    "LoadedModel",
    "StepBatch",
    "from_hf_config",
    "load_config",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
]
