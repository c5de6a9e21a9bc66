"""Decode steps at fixed shapes, captured as CUDA graphs.

A decode step of n sequences runs as a step of B >= n rows, the next batch bucket, reading keys up
to L, the next length bucket above its longest context. Every input lives in a buffer allocated
once: token ids, positions, each row's KV slot and each KV slot's length here; the hot-set's LoRA
weights, the KV cache and the routing plan's dispatch buffers in their owners. A step fills them
and replays the graph captured for (B, L, with or without LoRA) the first time that shape ran.
Loading an adapter copies into hot-set slots in place, so the next replay uses it, with no
recapture.

Padding rows run token 0 at position 0 in a scratch KV slot that no sequence owns (the cache has
one slot more than the batch), with no adapter; their logits are dropped.

A step with gate-routed rows routes inside the step: after the embeddings, the gate picks each
flagged row's adapters, and the dispatch metadata is sorted and counted on the device, so the
graph captures the routing too. Such shapes are keyed by the gate router as well and captured the
first time that router's step runs at them (routers load at run time); its adapter-to-slot table
and the flagged rows live in buffers that each step refreshes, so adapters may move between slots.
Steps with rows on two different gate routers run eagerly, as do prefill chunks.

`capture_all` captures every shape without a gate at start-up (the engine does,
`EngineConfig.capture_at_start`), so no request waits for a capture. `mode="eager"` runs this
same fixed-shape path without capturing (any device), which is how CPU tests check it against the
ordinary step.

Legend: B batch bucket, L length bucket, S_kv KV-cache slots (max_batch + 1), V vocabulary.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import DispatchMeta
from molora_core.lora_layer import LoRAContext
from molora_core.model import KVCache
from molora_core.model.attention import AttentionMeta
from molora_core.model.decoder import DecoderForCausalLM
from molora_core.routing import GateRouter, RoutingPlan

log = logging.getLogger(__name__)

# Rows per tile of the grouped LoRA kernels inside a graph (a decode step has few rows per slot).
GRAPH_BLOCK_M = 16


def graph_mode(setting: str, device: torch.device, backend: str, rope_type: str) -> str | None:
    """What `EngineConfig.decode_graphs` means for an engine: 'graphs' (capture; CUDA with the
    triton backend, any rope type but 'dynamic'), 'eager' (asked for), or None (every step eager)."""
    if setting == "eager":
        return "eager"
    if setting == "off" or device.type != "cuda" or backend != "triton" or rope_type == "dynamic":
        return None
    return "graphs"


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_batch (which is always the last bucket)."""
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    buckets += list(range(8, max_batch, 8))
    return buckets + [max_batch]


def length_buckets(max_seq_len: int, smallest: int = 64) -> list[int]:
    """Powers of two from `smallest` up to max_seq_len (which is always the last bucket)."""
    buckets, length = [], smallest
    while length < max_seq_len:
        buckets.append(length)
        length *= 2
    return buckets + [max_seq_len]


def _bucket(value: int, buckets: list[int]) -> int:
    for bucket in buckets:
        if value <= bucket:
            return bucket
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclass
class GateRouting:
    """The gate-routed rows of a fixed-shape decode step, routed inside the step."""

    gate: GateRouter
    lookup: list[int]  # hot-set slot of each of the gate's adapters, in its order
    rows: list[int]  # the rows the gate routes (the plan holds every other row's route)
    plan: RoutingPlan  # begun over the step's rows with the other rows resolved


@dataclass
class _GateBuffer:
    """A gate router's adapter-to-slot table on the device, which its graphs read."""

    gate: GateRouter
    lookup: torch.Tensor  # int32[A]: the hot-set slot of each of the gate's adapters
    held: tuple[int, ...] | None = None  # the slots `lookup` holds now (a step copies only a change)


@dataclass
class _Shape:
    rows: int  # B
    length: int  # L
    meta: AttentionMeta
    lora: tuple[int, int] | None = None  # (top_k, slots buffer address) of the captured routing plan
    gate: GateRouter | None = None  # routes the flagged rows inside the step
    capture_error: str | None = None  # why capturing this (gate) shape failed: it runs uncaptured
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None  # [B, V], written by every replay


class DecodeGraphs:
    """Fixed-shape decode steps of one engine; see the module docstring.

    Args:
        model: the engine's decoder (MoLoRA layers attached).
        kv_cache: its cache, with one scratch slot past the last sequence slot.
        context: the LoRA context whose `meta` the engine sets for a step with adapters.
        max_batch: the most sequences per step; max_seq_len: the cache row length.
        mode: "graphs" captures and replays (CUDA only); "eager" runs the same path uncaptured.
        max_gates: gate routers whose shapes are kept; the least recently used one's shapes (and
            graphs, which hold its weights) are dropped for a new one.
    """

    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_cache: KVCache,
        context: LoRAContext,
        max_batch: int,
        max_seq_len: int,
        mode: str = "graphs",
        max_gates: int = 16,
    ):
        if mode not in ("graphs", "eager"):
            raise ValueError(f"mode must be 'graphs' or 'eager'; got {mode!r}")
        if mode == "graphs" and kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and KV cache on a CUDA device")
        if kv_cache.max_seqs < max_batch + 1:
            raise ValueError(f"the KV cache needs a scratch slot: {kv_cache.max_seqs} slots for max_batch={max_batch}")
        self.model, self.kv_cache, self.context, self.mode = model, kv_cache, context, mode
        self.scratch_slot = kv_cache.max_seqs - 1
        self.batch_buckets = batch_buckets(max_batch)
        self.length_buckets = length_buckets(max_seq_len)
        device, rows = kv_cache.device, self.batch_buckets[-1]
        # The step's inputs, one buffer so a step fills them with one host-to-device copy.
        self._inputs = torch.zeros(3 * rows + kv_cache.max_seqs, dtype=torch.int64, device=device)
        self.input_ids = self._inputs[:rows]  # int64[B_max]
        self.positions = self._inputs[rows : 2 * rows]  # int64[B_max]
        self.kv_slots = self._inputs[2 * rows : 3 * rows]  # int64[B_max]
        self.kv_lens = self._inputs[3 * rows :]  # int64[S_kv]
        self.kv_slots.fill_(self.scratch_slot)
        self.kv_lens.fill_(1)
        self.gate_rows = torch.zeros(rows, dtype=torch.bool, device=device)  # bool[B_max]: routed by the gate
        self._gate_rows_held: tuple[int, ...] = ()  # the rows gate_rows flags now (a step copies only a change)
        self.max_gates = max_gates
        self._gates: OrderedDict[int, _GateBuffer] = OrderedDict()  # by id(gate), least recently used first
        self._shapes: dict[tuple, _Shape] = {}
        self._pool = torch.cuda.graph_pool_handle() if mode == "graphs" else None
        self.captures = 0  # graphs captured so far (a test reads it to see no recapture happened)

    def rows_for(self, num_seqs: int) -> int:
        """The batch bucket a step of `num_seqs` decode sequences runs at."""
        return _bucket(num_seqs, self.batch_buckets)

    def run(
        self,
        token_ids: list[int],
        kv_slots: list[int],
        context_lens: list[int],
        lora_meta: DispatchMeta | None,
        gate: GateRouting | None = None,
    ) -> torch.Tensor:
        """Logits [n, V] for n decode sequences: sequence i feeds token_ids[i] at position
        context_lens[i] - 1 of KV slot kv_slots[i]. lora_meta: the step's dispatch metadata over
        rows_for(n) rows (padding rows routed to no adapter), or None for the base model only.
        gate: the step's gate-routed rows instead (lora_meta None): the dispatch metadata is
        built inside the step, after the gate has routed them."""
        n = len(token_ids)
        rows = self.rows_for(n)
        length = _bucket(max(context_lens), self.length_buckets)
        self._fill(token_ids, kv_slots, context_lens)
        if gate is None:
            return self._execute(self._shape(rows, length, _plan_key(lora_meta)), lora_meta)[:n]
        if lora_meta is not None or gate.plan.dispatch_buffers is None:
            raise ValueError("a gate step builds its dispatch metadata in the plan's buffers; pass lora_meta=None")
        plan = gate.plan
        entry = self._gate_entry(gate.gate)  # first: may drop the least recently used gate's shapes
        shape = self._shape(rows, length, (plan.num_tokens, plan.top_k, plan.slots.data_ptr()), gate.gate)
        # Only what changed goes to the device: a decode batch keeps its rows and slots for many steps.
        flagged_rows, slots = tuple(gate.rows), tuple(gate.lookup)
        if flagged_rows != self._gate_rows_held:
            flagged = torch.zeros(self.gate_rows.shape[0], dtype=torch.bool)
            flagged[list(flagged_rows)] = True
            self.gate_rows.copy_(flagged.to(self.gate_rows.device, non_blocking=True))
            self._gate_rows_held = flagged_rows
        if slots != entry.held:
            entry.lookup.copy_(torch.tensor(slots, dtype=torch.int32).to(entry.lookup.device, non_blocking=True))
            entry.held = slots
        return self._execute(shape, None, _GateStep(self, gate.gate, entry.lookup, plan))[:n]

    def _gate_entry(self, gate: GateRouter) -> "_GateBuffer":
        """The gate's adapter-to-slot buffer (made on first use), marking it most recently used."""
        key = id(gate)
        if key in self._gates:
            self._gates.move_to_end(key)
            return self._gates[key]
        lookup = torch.zeros(len(gate.adapters), dtype=torch.int32, device=self.gate_rows.device)
        entry = self._gates[key] = _GateBuffer(gate, lookup)
        while len(self._gates) > self.max_gates:
            self._drop_gate(next(iter(self._gates.values())).gate)
        return entry

    def _drop_gate(self, gate: GateRouter) -> None:
        """Forget a gate router's shapes (and graphs), the least recently used one past max_gates."""
        for key in [key for key, shape in self._shapes.items() if shape.gate is gate]:
            del self._shapes[key]
        self._gates.pop(id(gate), None)

    def capture_all(self, lora_meta_for: Callable[[int], DispatchMeta]) -> int:
        """Capture every (batch bucket, length bucket) shape, with and without LoRA, now rather
        than on the first step of each (start-up, off the request path); returns how many.
        Every row is a padding row: only the scratch KV slot is written. lora_meta_for(rows):
        the routing plan's dispatch metadata over `rows` rows, all routed to no adapter."""
        before = self.captures
        self._fill([], [], [])
        for rows in self.batch_buckets:
            for length in self.length_buckets:
                for lora_meta in (None, lora_meta_for(rows)):
                    self._execute(self._shape(rows, length, _plan_key(lora_meta)), lora_meta)
        return self.captures - before

    def _fill(self, token_ids: list[int], kv_slots: list[int], context_lens: list[int]) -> None:
        """Copy one step's inputs into the buffers in one copy; every row past the sequences'
        is a padding row (scratch KV slot, token 0 at position 0)."""
        pad = self.input_ids.shape[0] - len(token_ids)
        lens = [1] * self.kv_lens.shape[0]
        for slot, length in zip(kv_slots, context_lens):
            lens[slot] = length
        host = torch.tensor(
            list(token_ids) + [0] * pad + [c - 1 for c in context_lens] + [0] * pad
            + list(kv_slots) + [self.scratch_slot] * pad + lens,
            dtype=torch.int64,
        )
        self._inputs.copy_(host.to(self._inputs.device, non_blocking=True))

    def _shape(self, rows: int, length: int, lora: tuple[int, int, int] | None,
               gate: GateRouter | None = None) -> _Shape:
        """The shape of a step; lora: (rows, top_k, slots buffer address) of its routing plan."""
        if lora is not None and lora[0] != rows:
            raise ValueError(f"the routing plan covers {lora[0]} rows; the step runs {rows}")
        key = (rows, length, lora is not None) if gate is None else (rows, length, "gate", id(gate))
        shape = self._shapes.get(key)
        if shape is None:
            meta = AttentionMeta.static_decode(self.kv_slots[:rows], self.kv_lens, length)
            shape = self._shapes[key] = _Shape(rows, length, meta, gate=gate)
        if lora is not None:
            # A captured graph reads the plan's buffers at fixed addresses and sizes.
            if shape.lora is None:
                shape.lora = lora[1:]
            elif shape.lora != lora[1:]:
                raise ValueError(f"the routing plan changed shape or address since capture: {lora[1:]} != {shape.lora}")
        return shape

    def _execute(self, shape: _Shape, lora_meta: DispatchMeta | None, gate: "_GateStep | None" = None) -> torch.Tensor:
        """Logits [B, V] of the step in the buffers: replayed (captured first if new) or eager."""
        self.context.meta = lora_meta
        try:
            if self.mode == "eager" or shape.capture_error is not None:
                return self._forward(shape, gate)
            if shape.graph is None:
                try:
                    self._capture(shape, gate)
                except Exception as exc:
                    if shape.gate is None:
                        raise  # start-up shapes: the engine turns graphs off (EngineConfig.capture_at_start)
                    # A gate's shape is captured on a serving step: run it uncaptured from now on.
                    log.warning("decode graph capture failed for gate router %s; its steps run uncaptured: %r",
                                shape.gate.adapters, exc)
                    shape.capture_error = repr(exc)
                    return self._forward(shape, gate)
            shape.graph.replay()
            return shape.logits
        finally:
            self.context.meta = None

    def _forward(self, shape: _Shape, gate: "_GateStep | None" = None) -> torch.Tensor:
        rows = shape.rows
        return self.model.forward_static_decode(
            self.input_ids[:rows], self.positions[:rows], shape.meta, self.kv_cache, on_embeddings=gate
        )

    def _capture(self, shape: _Shape, gate: "_GateStep | None" = None) -> None:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels, the
        # allocator sees the step), as torch.cuda.graph requires. Decode writes are idempotent:
        # every run stores the same keys and values at the same positions, and routing a gate
        # step again writes the same routes.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(shape, gate)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            shape.logits = self._forward(shape, gate)
        shape.graph = graph
        self.captures += 1


def _plan_key(lora_meta: DispatchMeta | None) -> tuple[int, int, int] | None:
    """(rows, top_k, slots buffer address) of a step's dispatch metadata, which gets the graphs'
    fixed tile height (no host read of the busiest slot's count)."""
    if lora_meta is None:
        return None
    lora_meta.block_m = GRAPH_BLOCK_M
    return lora_meta.num_tokens, lora_meta.top_k, lora_meta.slots.data_ptr()


class _GateStep:
    """The on_embeddings hook of a gate step: route the flagged rows, build the dispatch
    metadata in the plan's buffers and hand it to the LoRA layers (device ops only)."""

    def __init__(self, graphs: DecodeGraphs, gate: GateRouter, lookup: torch.Tensor, plan: RoutingPlan):
        self.graphs, self.gate, self.lookup, self.plan = graphs, gate, lookup, plan

    def __call__(self, hidden: torch.Tensor) -> None:
        rows = hidden.shape[0]
        meta = self.plan.route_static(hidden, self.gate, self.lookup, self.graphs.gate_rows[:rows])
        meta.block_m = GRAPH_BLOCK_M
        self.graphs.context.meta = meta
