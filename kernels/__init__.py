"""Per-token LoRA kernels: grouped shrink / expand over sorted per-slot segments.

Imports torch and (lazily) triton only. See `kernels.meta` for the dispatch metadata,
`kernels.lora_ref` for the pure-torch twins and `kernels.backends` for the backend registry.
"""

from kernels.backends import LoRABackend, available_backends, default_backend_name, get_backend
from kernels.meta import DECODE_MAX_PAIRS, DispatchBuffers, DispatchMeta, build_dispatch

__all__ = [
    "DECODE_MAX_PAIRS",
    "DispatchBuffers",
    "DispatchMeta",
    "LoRABackend",
    "available_backends",
    "build_dispatch",
    "default_backend_name",
    "get_backend",
]
