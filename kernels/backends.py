"""LoRA compute backends behind one interface, looked up by name.

Layers receive a backend and call `apply`; they never pick one or call a kernel themselves.
`triton` runs the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
`torch` runs the pure-torch twins (the reference in tests); `cpu` runs the twins plus a compiled
kernel for decode steps (CPU deployments).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from kernels.lora_ref import (
    DENSE_PREFILL_WASTE, lora_apply_ref, lora_apply_shared_ref, lora_expand_ref, lora_shrink_ref,
)
from kernels.meta import DispatchMeta


class LoRABackend:
    """Per-token LoRA compute over the dispatch metadata of one step.

    Shapes: x [T, D_in]; lora_a_stacked [S, R, D_in]; lora_b_stacked [S, D_out, R];
    slot_ranks int32[S]; slot_scales float32[S]; h float32[T*K, R]; out [T, D_out].
    """

    name = "abstract"
    # How the hot-set should store lora_b (see molora_core.hotset.SlotBuffers).
    b_layout = "slot_major"

    def shrink(self, x, lora_a_stacked, slot_ranks, meta: DispatchMeta) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, h, lora_b_stacked, slot_ranks, slot_scales, meta: DispatchMeta, out) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta: DispatchMeta, out):
        """out += per-token weighted LoRA delta of x; returns out."""
        h = self.shrink(x, lora_a_stacked, slot_ranks, meta)
        return self.expand(h, lora_b_stacked, slot_ranks, slot_scales, meta, out)

    def apply_shared(self, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta: DispatchMeta, outs,
                     rank_scales=None, cache=None):
        """`apply` for G modules reading the same x: lora_a_group [G, S, R, D_in], G lora_b
        [S, D_out_g, R], ranks_group int32[G, S], scales_group float32[G, S], G outs [T, D_out_g];
        rank_scales float32[G, S, R] (scale below rank, 0 past it) or None. cache: a dict the
        caller keeps with these buffers (a layer's), where a backend may keep what it derives from
        them across steps, or None. Returns outs."""
        for g, (lora_b, out) in enumerate(zip(lora_b_list, outs)):
            self.apply(x, lora_a_group[g], lora_b, ranks_group[g], scales_group[g], meta, out)
        return outs

    def base_and_apply_shared(self, x, weight, bias, sizes, lora_a_group, lora_b_list, ranks_group, scales_group,
                              meta: DispatchMeta, rank_scales=None, cache=None) -> torch.Tensor | None:
        """The G modules' base projections and LoRA deltas in one pass where this backend has one
        for the step: x @ weight.T + bias + the deltas of `apply_shared`, [T, sum(sizes)], for
        weight [sum(sizes), D_in] (module g's rows `sizes[g]` long, in order; dense, or
        reordered for oneDNN by `kernels.onednn.pack` on CPU) and bias [sum(sizes)] or None. None
        where it has not: the caller runs its base matmul, then `apply_shared`."""
        return None


class _Choice:
    """An attribute that only takes one of `choices` (a ValueError naming them otherwise)."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.name]

    def __set__(self, obj, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}; got {value!r}")
        obj.__dict__[self.name] = value


class TorchBackend(LoRABackend):
    name = "torch"
    b_layout = "rank_major"

    def shrink(self, x, lora_a_stacked, slot_ranks, meta):
        return lora_shrink_ref(x, lora_a_stacked, slot_ranks, meta)

    def expand(self, h, lora_b_stacked, slot_ranks, slot_scales, meta, out):
        return lora_expand_ref(h, lora_b_stacked, slot_ranks, slot_scales, meta, out)

    def apply(self, x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta, out):
        return lora_apply_ref(x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta, out)

    def apply_shared(self, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales=None,
                     cache=None):
        return lora_apply_shared_ref(
            x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales=rank_scales, cache=cache
        )


class CpuBackend(TorchBackend):
    """The torch twins plus a compiled kernel (`kernels.lora_cpu`) for the group calls where it
    measured faster (`lora_cpu.takes`: fp32 steps of up to 1024 (token, k) pairs, bf16 calls of
    up to 24M multiply-adds, fp16 every call; so decode steps and small prefills): each
    projection group's LoRA is one call over the pairs each slot is routed, instead of the twins'
    matmuls and scalings per group. Other calls, autograd, and machines where the kernel cannot
    be built run the twins. What CPU engines run by default."""

    name = "cpu"

    def __init__(self) -> None:
        from kernels import lora_cpu

        self._lora_cpu = lora_cpu
        self.compiled = lora_cpu.available()  # builds on first use (about 30 s), then loads the cached build

    def apply_shared(self, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales=None,
                     cache=None):
        compiled = self._compiled(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, cache)
        if compiled is not None:
            self._lora_cpu.run_prepared(x, *compiled, outs, meta.top_k)
            return outs
        return super().apply_shared(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs,
                                    rank_scales=rank_scales, cache=cache)

    def base_and_apply_shared(self, x, weight, bias, sizes, lora_a_group, lora_b_list, ranks_group, scales_group,
                              meta, rank_scales=None, cache=None):
        """Where the kernel takes the step: the base matmul (oneDNN-packed weights too) and the
        deltas in one compiled call, which saves the Python between the two (about 10 us a
        projection group in a decode step)."""
        if weight.dtype != x.dtype or not weight.is_cpu:
            return None
        compiled = self._compiled(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, cache)
        if compiled is None:
            return None
        return self._lora_cpu.run_with_base(x, weight, bias, sizes, *compiled, meta.top_k)

    def _compiled(self, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, cache):
        """(prepared operands, step routes) where the compiled kernel takes this call, else None."""
        if not self.compiled:
            return None
        # Checked once per layer (the buffers keep their layout) and once per step (routes):
        # per call, the Python around a ~30 us kernel call must stay small.
        prepared = False if cache is None else cache.get("lora_cpu", False)
        if prepared is False:
            prepared = self._lora_cpu.Prepared.make(lora_a_group, lora_b_list, ranks_group, scales_group)
            if cache is not None:
                cache["lora_cpu"] = prepared
        if prepared is None or not self._lora_cpu.takes(prepared, meta.num_pairs):
            return None
        routes = self._lora_cpu.step_routes(meta)
        if routes is None or x.dtype != prepared.dtype or not x.is_contiguous() or x.requires_grad:
            return None
        return prepared, routes


class TritonBackend(LoRABackend):
    """The Triton kernels. Decode steps (`meta.is_decode`) run groups of up to 3 modules that
    read the same x (q/k/v, gate/up) through the kernel `decode_kernel` names:

    - "auto" (default): for 16-bit inputs, "dense_base" where the caller hands over the base
      weights, "dense" where it runs the base itself. `kernels.lora_dense` (every token through
      every used slot, tensor-core dots) beat the fused and split kernels on an H200 in bf16 for
      every Qwen3-0.6B and 7B projection group timed but one (0.6B o at 64 tokens x top-1, 4%
      behind fused), and end to end; `kernels.lora_dense_base` took a step's base projections
      and their LoRA in 1.09 ms against 1.51 for the matmuls then the dense kernel (Qwen3-0.6B
      shapes, 28 layers, 16 tokens), and gate-routed generation from 0.62 / 0.70 of the base
      engine's throughput to 0.75 / 0.78 in two runs (benchmarks/results/*-h200-dense-base*.json;
      7B shapes not yet timed with it). For fp32 inputs, whose dots both run on CUDA cores (5-10x
      slower there), one fused shrink + expand launch (`kernels.lora_fused_decode`) for a group
      of 2 or 3 modules where that measured faster (`use_fused`), separate shrink and expand
      launches for the rest, after the caller's matmul (benchmarks/results/lora_decode-h200*.json);
    - "dense", "fused", "split": that kernel for every group, after the caller's matmul;
    - "dense_base": `kernels.lora_dense_base` where the caller hands over the base weights too
      (`base_and_apply_shared`; the decoder's projections on CUDA do), whatever the dtype: the
      base projection and the slot-dense LoRA in one launch per group of up to 3 modules,
      instead of a matmul and the LoRA launches; "dense" where a caller runs the base itself.

    Prefill steps take the kernels `prefill_kernel` names:

    - "auto" (default) and "dense": `kernels.lora_dense` over the slots in use, per group of up
      to 3 modules (two launches a group, no atomics or fp32 scratch for tokens with two choices)
      where those slots span at most DENSE_PREFILL_WASTE * top-k (`_dense_prefill_span`; a gate
      over 4 adapters with top-2 qualifies, 16 requests on 4 single adapters do not), the grouped
      kernels elsewhere and in steps with a fixed `meta.block_m` (captured in a CUDA graph: the span
      is a host read). On an H200 (Qwen3-0.6B shapes, 28 layers, bf16, benchmarks/results/logs/
      engine_profile-h200.txt) the gate-routed batch's 4096-token prefill took 23.7 ms of device
      time with it against the grouped kernels' 33.2 (of which 7.9 zero-filled and added fp32
      scratch), and 114 ms of wall time against 139 in one engine run
      (engine-h200-dense-base.json); with the launches stubbed out, the launchers' Python for
      that step is about 5.5 ms against 13-15 on this project's 2-core CPU
      (benchmarks/prefill_host.py). Default since 2026-11-26;
    - "grouped": per module, the grouped shrink and expand kernels over each slot's segment of
      sorted pairs (`kernels.lora_shrink`, `kernels.lora_expand`), for every prefill step.
    """

    name = "triton"
    DECODE_KERNELS = ("auto", "fused", "dense", "split", "dense_base")
    PREFILL_KERNELS = ("auto", "dense", "grouped")

    def __init__(self, decode_kernel: str = "auto", prefill_kernel: str = "auto") -> None:
        from kernels.lora_dense import lora_dense
        from kernels.lora_dense_base import lora_dense_base
        from kernels.lora_expand import lora_expand
        from kernels.lora_fused_decode import MAX_MODULES, lora_fused_decode, use_fused
        from kernels.lora_shrink import lora_shrink

        self._shrink, self._expand = lora_shrink, lora_expand
        self._fused, self._use_fused, self._max_group = lora_fused_decode, use_fused, MAX_MODULES
        self._dense, self._dense_base = lora_dense, lora_dense_base
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel

    decode_kernel = _Choice(DECODE_KERNELS)
    prefill_kernel = _Choice(PREFILL_KERNELS)

    def shrink(self, x, lora_a_stacked, slot_ranks, meta):
        return self._shrink(x, lora_a_stacked, slot_ranks, meta)

    def expand(self, h, lora_b_stacked, slot_ranks, slot_scales, meta, out):
        return self._expand(h, lora_b_stacked, slot_ranks, slot_scales, meta, out)

    def apply(self, x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta, out):
        # h goes to the expand alone, which never reads what the shrink leaves unwritten: no zero-fill launch.
        h = self._shrink(x, lora_a_stacked, slot_ranks, meta, zero_fill=False)
        return self._expand(h, lora_b_stacked, slot_ranks, slot_scales, meta, out)

    def apply_shared(self, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales=None,
                     cache=None):
        if not meta.is_decode:
            # A fixed tile height marks a step inside a CUDA graph (a decode bucket past DECODE_MAX_PAIRS
            # pairs): no host read of the slot counts, so the grouped kernels.
            dense = self.prefill_kernel != "grouped" and meta.block_m is None
            span = self._dense_prefill_span(meta) if dense else None
            if span is None:
                return super().apply_shared(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs)
            if span[0] < span[1]:
                for start in range(0, len(lora_b_list), self._max_group):
                    chunk = slice(start, start + self._max_group)
                    self._dense(x, lora_a_group[chunk], lora_b_list[chunk], ranks_group[chunk], scales_group[chunk],
                                meta, outs[chunk], slot_range=span)
            return outs
        kind = self.decode_kernel
        if kind == "split":
            return super().apply_shared(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs)
        if self._slot_dense(x):
            kind = "dense"  # dense_base (or auto in 16 bits) here: the caller ran the base matmul itself
        for start in range(0, len(lora_b_list), self._max_group):
            chunk = slice(start, start + self._max_group)
            args = (x, lora_a_group[chunk], lora_b_list[chunk], ranks_group[chunk], scales_group[chunk], meta,
                    outs[chunk])
            if kind == "dense":
                self._dense(*args)
            elif kind == "fused" or self._use_fused(meta, lora_a_group[chunk], lora_b_list[chunk]):
                self._fused(*args)
            else:
                super().apply_shared(*args)
        return outs

    def base_and_apply_shared(self, x, weight, bias, sizes, lora_a_group, lora_b_list, ranks_group, scales_group,
                              meta, rank_scales=None, cache=None):
        if weight.is_mkldnn or not (meta.is_decode and self._slot_dense(x)):  # (packed: a CPU engine's weights)
            return None
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        outs, weights = list(y.split(sizes, dim=1)), list(weight.split(sizes))
        biases = None if bias is None else list(bias.split(sizes))
        for start in range(0, len(sizes), self._max_group):
            chunk = slice(start, start + self._max_group)
            self._dense_base(x, weights[chunk], None if biases is None else biases[chunk], lora_a_group[chunk],
                             lora_b_list[chunk], ranks_group[chunk], scales_group[chunk], meta, outs[chunk])
        return y

    def _slot_dense(self, x: torch.Tensor) -> bool:
        """Whether decode steps take the slot-dense kernels: with the base projection where the
        caller hands it over, the LoRA alone where it does not ("dense_base", or "auto" in 16 bits)."""
        return self.decode_kernel == "dense_base" or (self.decode_kernel == "auto" and x.dtype != torch.float32)

    @staticmethod
    def _dense_prefill_span(meta: DispatchMeta) -> tuple[int, int] | None:
        """(lo, hi) of the slots a prefill step uses when the dense kernel may take it (at most
        DENSE_PREFILL_WASTE * K of them: for a step whose every token is routed, at most that many
        times the LoRA FLOPs of routing each pair alone; tokens on the base model go through the
        span too), else None. One host read per step (`host_counts`), cached in meta."""
        key = "triton_dense_prefill_span"
        if key not in meta.backend_cache:
            used = [slot for slot, count in enumerate(meta.host_counts()) if count]
            lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
            meta.backend_cache[key] = (lo, hi) if hi - lo <= DENSE_PREFILL_WASTE * meta.top_k else None
        return meta.backend_cache[key]


_BACKENDS: dict[str, Callable[[], LoRABackend]] = {"cpu": CpuBackend, "torch": TorchBackend, "triton": TritonBackend}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> LoRABackend:
    """The backend registered under `name` ("cpu", "torch" or "triton")."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {available_backends()}") from None
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("LoRA backend 'triton' needs the triton package, which is not installed")
    return factory()


def default_backend_name(device: torch.device | str) -> str:
    """triton on CUDA (when installed), torch elsewhere unless TRITON_INTERPRET=1 asks otherwise."""
    device = torch.device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if device.type == "cuda" and has_triton:
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1" and has_triton:
        return "triton"
    return "torch"
