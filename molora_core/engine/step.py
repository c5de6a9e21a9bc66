"""One forward of an engine step: route the scheduled batch, run the decoder, return logits.

The engine decides what runs (which sequences, how many new tokens each); `StepRunner` runs it.
A decode step whose routing fits a fixed shape (at most one gate router) goes through the graph
runner (`molora_core.engine.graphs`) when the engine has one; any other step runs the decoder
eagerly over the flat batch, with one routing plan for every request in it: constant routes
written from the host, vocab routes from the token ids, gate routes from the step's embeddings.

Legend: B sequences in the step, V vocabulary.
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import torch

from kernels import DispatchMeta
from molora_core.engine.graphs import DecodeGraphs, GateRouting
from molora_core.engine.sequence import Sequence
from molora_core.lora_layer import LoRAContext
from molora_core.model import KVCache, StepBatch
from molora_core.model.decoder import DecoderForCausalLM
from molora_core.routing import GateSlotRouter, RoutingPlan

Entries = list[tuple[Sequence, int]]  # (sequence, new tokens this step)


class StepLogits(NamedTuple):
    last: torch.Tensor  # [B, V]: each entry's last new token
    hidden: dict[int, torch.Tensor]  # entry index -> final-normed hidden states [n, D] of all its new tokens


class StepRunner:
    """Runs one step's forward for the engine; `graphs` None = every step eager."""

    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, plan: RoutingPlan, context: LoRAContext,
                 graphs: DecodeGraphs | None, max_top_k: int):
        self.model, self.kv_cache, self.plan, self.context = model, kv_cache, plan, context
        self.graphs, self.max_top_k = graphs, max_top_k
        self.fixed_steps = 0  # steps run at a fixed shape (the engine's stats report them)
        self.dynamic_rope = model is not None and model.rotary.rope_type == "dynamic"  # (None: routing-only tests)

    def logits(self, entries: Entries, flat: list[int], is_decode: bool,
               keep_hidden: Collection[int] = ()) -> StepLogits:
        """Logits of each entry's last new token; flat: every entry's new token ids, in order.
        For the entries (indices) in keep_hidden, also the hidden states of all their new tokens
        (the engine scores prompt tokens from them)."""
        try:
            with torch.inference_mode():
                if self.graphs is not None and is_decode and not keep_hidden and _fits_fixed_shape(entries):
                    logits = self._fixed_shape(entries, flat)
                    self.fixed_steps += 1
                    return StepLogits(logits, {})
                batch = StepBatch.build(
                    [seq.kv_slot for seq, _ in entries], [n for _, n in entries],
                    [seq.num_computed + n for seq, n in entries],
                    # ("dynamic" rope: a prompt's chunks all scale for the whole prompt)
                    [max(len(seq.prompt_ids), seq.num_computed + n) for seq, n in entries] if self.dynamic_rope
                    else None,
                )
                device = self.model.device
                ids = torch.tensor(flat, dtype=torch.int64, device=device)
                hook = self._route(entries, ids, batch)
                positions = batch.positions(device)
                if not keep_hidden:
                    return StepLogits(
                        self.model(ids, positions, batch, self.kv_cache, on_embeddings=hook, logits="last"), {}
                    )
                h = self.model(ids, positions, batch, self.kv_cache, on_embeddings=hook, logits="none")
                last = torch.tensor(batch.last_token_indices(), dtype=torch.int64, device=h.device)
                hidden = {b: h[batch.starts[b] : batch.starts[b] + entries[b][1]] for b in keep_hidden}
                return StepLogits(self.model.lm_head(h[last]), hidden)
        finally:
            self.context.meta = None

    def unrouted_plan(self, rows: int) -> DispatchMeta:
        """The routing plan's dispatch metadata over `rows` rows with max_top_k choices, every
        row on no adapter: the shape a fixed-shape decode step with adapters runs at."""
        self.plan.begin(rows, self.max_top_k)
        return self.plan.finalize()

    def _route(self, entries: Entries, ids: torch.Tensor, batch: StepBatch):
        """Fill the step's routing plan; returns the on_embeddings hook (None if not needed)."""
        routers = [seq.router for seq, _ in entries]
        if all(r is None for r in routers):
            self.context.meta = None
            return None
        self.plan.begin(ids.shape[0], max(r.top_k for r in routers if r is not None))
        # Adjacent requests whose routers route alike (one gate router, one adapter) go to the
        # plan as one run of rows: one entry for the plan to resolve, not one per request.
        runs: list[list] = []  # [start, end, router, key]
        for (seq, n), start in zip(entries, batch.starts):
            key = None if seq.router is None else seq.router.route_key
            if runs and key is not None and key == runs[-1][3] and start == runs[-1][1]:
                runs[-1][1] = start + n
            else:
                runs.append([start, start + n, seq.router, key])
        for start, end, router, _ in runs:
            self.plan.assign(start, router, ids[start:end])
        if not self.plan.needs_hidden:
            self.context.meta = self.plan.finalize()
            return None

        def on_embeddings(hidden: torch.Tensor) -> None:
            self.context.meta = self.plan.finalize(hidden)

        return on_embeddings

    def _fixed_shape(self, entries: Entries, flat: list[int]) -> torch.Tensor:
        """A decode step at a fixed shape: logits [B, V]. Rows on a gate router are routed inside
        the step; the plan holds every other row's route."""
        rows = self.graphs.rows_for(len(entries))
        meta = gate = None
        if any(seq.router is not None for seq, _ in entries):
            # Always max_top_k choices over the bucket's rows: the shape the graph captured.
            self.plan.begin(rows, self.max_top_k)
            ids = None  # host token ids, made for the first router that is handed them (the plan moves them)
            gate_rows = []
            for row, (seq, _) in enumerate(entries):
                router = seq.router
                if router is None:
                    continue  # (rows no router covers stay on the base model)
                if router.needs_hidden:
                    gate_rows.append(row)
                else:
                    if ids is None:
                        ids = torch.tensor(flat, dtype=torch.int64)
                    self.plan.assign(row, router, ids[row : row + 1])
            if gate_rows:
                router = entries[gate_rows[0]][0].router
                self.plan.resolve()
                gate = GateRouting(router.gate, router.lookup.tolist(), gate_rows, self.plan)
            else:
                meta = self.plan.finalize()
        return self.graphs.run(flat, [seq.kv_slot for seq, _ in entries],
                               [seq.num_computed + 1 for seq, _ in entries], meta, gate)


def _fits_fixed_shape(entries: Entries) -> bool:
    """At most one gate router among the step's routers that read the hidden state (see
    graphs.GateRouting): the graph runner routes that one inside the step."""
    hidden = [seq.router for seq, _ in entries if seq.router is not None and seq.router.needs_hidden]
    return all(isinstance(r, GateSlotRouter) for r in hidden) and len({r.batch_key() for r in hidden}) <= 1
