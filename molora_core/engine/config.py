"""The engine's configuration: sizes fixed at start-up (KV cache, hot-set, routing plan, queue)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from molora_core.lora_layer import TARGET_MODULES


class EngineConfig(BaseModel):
    """Everything the engine allocates once: nothing here changes while it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(8, ge=1, le=4096, description="running sequences at once (KV-cache slots)")
    max_seq_len: int = Field(512, ge=2, description="prompt + generated tokens per sequence (KV-cache row length)")
    max_queue: int = Field(64, ge=1, description="requests waiting for admission; submit raises CapacityExceeded beyond")
    prefill_chunk: int = Field(256, ge=1, description="most prompt tokens of one sequence in one step (chunked prefill)")
    max_step_tokens: int | None = Field(
        None, ge=1, description="most tokens in one step; None = max_batch + prefill_chunk"
    )
    hot_slots: int = Field(8, ge=1, description="hot-set slots (adapters resident at once)")
    max_rank: int = Field(16, ge=1, description="largest LoRA rank the hot-set holds")
    max_top_k: int = Field(4, ge=1, description="most adapters one token may mix (mixtures, gate top-k)")
    target_modules: tuple[str, ...] = Field(TARGET_MODULES, description="projection names that get LoRA slots")
    pin_timeout_s: float = Field(
        30.0, ge=0.0,
        description="how long a request waits for its adapters (background cold load, then a free hot-set slot) "
        "before failing with CapacityExceeded",
    )
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1', ...; None = CUDA when present, else CPU")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="model dtype; None = the checkpoint's (float32 on CPU)"
    )
    backend: str | None = Field(None, description="LoRA backend ('cpu' | 'torch' | 'triton'); None = cpu on CPU (the torch "
                                  "twins plus a compiled LoRA kernel), the device's default elsewhere")
    decode_kernel: Literal["auto", "fused", "dense", "split", "dense_base"] = Field(
        "auto",
        description="triton backend only: the kernel decode steps run LoRA with (kernels.backends.TritonBackend); "
        "'auto' = for bf16/fp16 each projection group's base matmul and its slot-dense LoRA in one launch "
        "('dense_base', the fastest timed on an H200), and for fp32 fused shrink+expand for q/k/v and small gate/up "
        "groups, separate launches elsewhere, after the matmul; 'dense', 'fused' or 'split' for every group after "
        "the matmul; 'dense_base' for every dtype",
    )
    prefill_kernel: Literal["auto", "dense", "grouped"] = Field(
        "auto",
        description="triton backend only: the kernel prefill steps run LoRA with; 'auto' = 'dense' = the slot-dense "
        "kernel per group of modules where the slots in use span at most 2 x top-k (a gate's top-2 over 4 "
        "adapters; 23.7 against 33.2 ms of H200 device time for a 4096-token prefill), "
        "the grouped kernels elsewhere; 'grouped' = per module, shrink and expand over each adapter's sorted tokens",
    )
    max_routers: int = Field(16, ge=1, description="gate routers kept loaded (LRU)")
    prefix_caching: bool = Field(
        True, description="a finished sequence's KV-cache slot keeps its keys and values until a slot is needed, and "
        "a new request whose prompt begins with tokens a cached or running sequence computed under the same routing "
        "starts after them (molora_core.engine.kv_slots)",
    )
    decode_graphs: Literal["auto", "off", "eager"] = Field(
        "auto",
        description="fixed-shape decode steps (molora_core.engine.graphs): 'auto' captures CUDA graphs on CUDA with "
        "the triton backend and is off elsewhere; 'eager' runs the fixed-shape path without capturing (debugging)",
    )
    capture_at_start: bool = Field(
        True, description="run every fixed-shape decode step once at start-up (capturing its CUDA graph) instead "
        "of on the first step of each shape; if that fails, the engine logs why and runs every step eagerly",
    )
    pack_weights: bool = Field(
        True, description="CPU only: reorder the base projections once for oneDNN (about 2x faster decode "
        "matmuls; the model's dense copies are released): fp32 weights, and bf16 ones where the CPU packs bf16",
    )

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.max_step_tokens is not None and self.max_step_tokens < self.max_batch:
            raise ValueError(
                f"max_step_tokens={self.max_step_tokens} must be >= max_batch={self.max_batch} "
                "(every running sequence decodes one token per step)"
            )
        return self

    @property
    def step_tokens(self) -> int:
        return self.max_step_tokens or self.max_batch + self.prefill_chunk
