"""Grouped-query self-attention over a flat batch of prefill chunks and decode tokens.

Each step's new keys/values are written into the KV cache, then every query attends to its own
sequence's cached positions (causal, optionally a sliding window) through torch SDPA:
- fresh prompts (nothing cached yet) of one length, side by side in the flat batch, run one SDPA
  call together, `is_causal`, straight over the step's own keys and values (views, no copy): a
  batch of 16 such prompts makes one call a layer instead of 16, whose launches and Python an
  eager GPU prefill otherwise waits on;
- any other sequence with several new tokens (a later chunk of a prompt, or one longer than a
  sliding window) runs its own SDPA call over its cache row, with an explicit [n, ctx] mask;
- all single-token (decode) sequences run one SDPA call straight over the cache rows of the
  slot span they occupy (a view, never a copy of the cache), padded to the longest context and
  masked per row; slots in the span that are not decoding attend to position 0 and are dropped.
  Decode rows already in the span's slot order (the common case) skip the scatter into the span
  and the gather back. A fixed-shape step over a cache with many more slots than rows copies its
  rows' keys out instead (`GATHER_FACTOR`).
The masks depend only on the step, so `AttentionMeta` builds them once and every layer reuses them.
On CPU with autograd off, q/k norm + RoPE, the cache write and the decode rows' attention (each
row over its own slot, no span or mask) run as compiled ops instead (`kernels.decode_cpu`).

Legend: T tokens, B sequences, H heads, H_kv key/value heads, D_h head dim, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels import decode_cpu
from molora_core.model.batch import StepBatch
from molora_core.model.config import DecoderConfig
from molora_core.model.kv_cache import KVCache
from molora_core.model.layers import RMSNorm, rms_norm_heads
from molora_core.model.rope import apply_rope

# A fixed-shape decode step copies its rows' keys and values out of the cache when the cache
# holds more than this many times its rows; below that, SDPA reads every slot of the cache in place.
# (A copy costs three passes over the rows' keys, write and two reads, against one pass over all
# slots.) With max_batch 16, a one-sequence step's attention read 17 slots' keys, not 1.
GATHER_FACTOR = 3

# `enable_gqa` (torch >= 2.5) lets SDPA read H_kv heads without materializing the repeat.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, mask, is_causal, scale):
    """q [B, H, n, D_h], k/v [B, H_kv, ctx, D_h] -> [B, H, n, D_h]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    kwargs = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs)


@dataclass
class AttentionMeta:
    """Per-step attention metadata, built once by `build` and shared by every layer.

    `static_decode` builds the same metadata from device buffers for a decode step of fixed
    shape (a CUDA graph's): nothing in it is read on the host, so a forward over it has no
    host-to-device copies or syncs.
    """

    batch: StepBatch | None  # None for a static decode step (no prefill path)
    device: torch.device
    has_cache: bool
    token_slots: torch.Tensor  # int64[T] KV-cache slot of each token's sequence
    prefill: list[int]  # indices b of sequences on the prefill path (several new tokens, or fresh)
    decode_rows: torch.Tensor | None  # int64[B_d] flat token index of each decode sequence
    decode_index: torch.Tensor | None  # int64[B_d] its KV slot minus decode_span[0]
    decode_span: tuple[int, int]  # KV slots [lo, hi) that hold every decode sequence
    decode_lens: torch.Tensor | None  # int64[hi - lo] context length per slot of the span (1 = not decoding)
    decode_length: int  # keys read per slot: the longest decode context (a bucket above it when static)
    decode_uniform: bool  # every slot of the span decodes at decode_length (no mask without a window)
    decode_all: bool = False  # every token decodes, token t as decode row t
    decode_direct: bool = False  # decode row i is in KV slot decode_span[0] + i and nothing else is in the span
    decode_gather: bool = False  # static: read each row's slot (a copy) instead of the whole cache span
    # Each decode row's KV slot and context length, int64[B_d] (eager steps; the compiled CPU path reads them)
    decode_row_slots: torch.Tensor | None = None
    decode_row_lens: torch.Tensor | None = None
    # Fresh prefills (nothing cached) run together: (first flat token, tokens each, sequences b)
    # for each run of equal-length ones side by side in the flat batch; the rest of `prefill` are
    # continuations, one SDPA call each.
    prefill_runs: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    prefill_rest: list[int] = field(default_factory=list)
    _step_cache: dict = field(default_factory=dict)  # tensors every layer of the step reuses (masks, KV rows)

    @classmethod
    def build(cls, batch: StepBatch, device: torch.device, has_cache: bool) -> "AttentionMeta":
        prefill, decode = [], []
        for b, (n, ctx) in enumerate(zip(batch.num_new, batch.context_lens)):
            if not has_cache and n != ctx:
                raise ValueError(
                    f"sequence {b} has {ctx - n} cached tokens but no KV cache was given"
                )
            (decode if n == 1 and ctx > 1 else prefill).append(b)
        token_slots = torch.tensor(batch.per_token(batch.slots), dtype=torch.int64).to(device)
        decode_rows = decode_index = decode_lens = None
        span, length, uniform = (0, 0), 0, True
        if decode:
            slots = [batch.slots[b] for b in decode]
            span = (min(slots), max(slots) + 1)
            decode_rows = torch.tensor([batch.starts[b] for b in decode], dtype=torch.int64).to(device)
            decode_index = torch.tensor([s - span[0] for s in slots], dtype=torch.int64).to(device)
            by_slot = {s: batch.context_lens[b] for s, b in zip(slots, decode)}
            lens = [by_slot.get(slot, 1) for slot in range(*span)]
            length, uniform = max(lens), len(by_slot) == len(lens) and min(lens) == max(lens)
            decode_lens = torch.tensor(lens, dtype=torch.int64).to(device)
        every = not prefill and [batch.starts[b] for b in decode] == list(range(len(decode)))
        direct = [batch.slots[b] for b in decode] == list(range(span[0], span[0] + len(decode)))
        row_slots = row_lens = None
        if decode:
            row_slots = torch.tensor([batch.slots[b] for b in decode], dtype=torch.int64).to(device)
            row_lens = torch.tensor([batch.context_lens[b] for b in decode], dtype=torch.int64).to(device)
        runs, rest = [], []
        for b in prefill:
            start, n = batch.starts[b], batch.num_new[b]
            if n != batch.context_lens[b]:
                rest.append(b)
            elif runs and runs[-1][1] == n and runs[-1][0] + len(runs[-1][2]) * n == start:
                runs[-1] = (runs[-1][0], n, (*runs[-1][2], b))
            else:
                runs.append((start, n, (b,)))
        return cls(batch, device, has_cache, token_slots, prefill, decode_rows, decode_index, span,
                   decode_lens, length, uniform, every, direct, decode_row_slots=row_slots, decode_row_lens=row_lens,
                   prefill_runs=runs, prefill_rest=rest)

    @classmethod
    def static_decode(cls, kv_slots: torch.Tensor, kv_lens: torch.Tensor, length: int) -> "AttentionMeta":
        """A decode step over fixed buffers: row t is a sequence in KV slot kv_slots[t] (int64[B]);
        kv_lens (int64[S_kv], every slot of the cache) holds each slot's context length after
        the step, 1 for slots that are not decoding; `length` >= the longest of them. Rows may
        share a slot (padding rows all write one scratch slot): their outputs are garbage."""
        rows = torch.arange(kv_slots.shape[0], device=kv_slots.device)
        gather = kv_lens.shape[0] > GATHER_FACTOR * kv_slots.shape[0]
        return cls(None, kv_slots.device, True, kv_slots, [], rows, kv_slots, (0, kv_lens.shape[0]), kv_lens,
                   length, False, True, False, gather)

    def kv_index(self, kv_cache: KVCache, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Where this step's keys and values go in the cache (`KVCache.index`), once per step."""
        index = self._step_cache.get("kv_index")
        if index is None:
            index = self._step_cache["kv_index"] = kv_cache.index(self.token_slots, positions)
        return index

    def prefill_mask(self, b: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask bool[n, ctx] or None, is_causal) for sequence b's queries against its keys."""
        n, ctx = self.batch.num_new[b], self.batch.context_lens[b]
        if n == ctx and (window is None or ctx <= window):
            return None, n > 1
        key = ("prefill", b, window)
        if key not in self._step_cache:
            q_pos = torch.arange(ctx - n, ctx, device=self.device)[:, None]
            k_pos = torch.arange(ctx, device=self.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._step_cache[key] = mask
        return self._step_cache[key], False

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """bool[span, 1, 1, decode_length] over the decode span's KV slots (over the decode rows
        when `decode_gather`): a decoding slot sees its own context (and window); a slot that is
        not decoding sees position 0 only."""
        if self.decode_uniform and (window is None or self.decode_length <= window):
            return None
        key = ("decode", window)
        if key not in self._step_cache:
            ctx = (self.decode_lens[self.decode_index] if self.decode_gather else self.decode_lens)[:, None]
            k_pos = torch.arange(self.decode_length, device=self.device)[None, :]
            mask = k_pos < ctx
            if window is not None:
                mask &= k_pos > ctx - 1 - window
            self._step_cache[key] = mask[:, None, None, :]
        return self._step_cache[key]


class Attention(nn.Module):
    """q/k/v/o projections (HF names, plain nn.Linear), optional q/k RMSNorm, RoPE, SDPA."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_idx]
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Set by molora_core.lora_layer.attach_molora: runs q/k/v with one matmul and one LoRA call.
        self.qkv_group = None

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        positions: torch.Tensor,  # int64[T]
        cos: torch.Tensor,  # [T, D_h]
        sin: torch.Tensor,  # [T, D_h]
        meta: AttentionMeta,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:  # [T, D]
        t, heads, qk_heads = x.shape[0], self.num_heads, self.num_heads + self.num_kv_heads
        # q's and k's heads side by side, [T, H + H_kv, D_h]: one norm and one rotation for both.
        if self.qkv_group is not None:
            qkv = self.qkv_group.concat(x)  # [T, (H + 2 H_kv) D_h]: q, k, v columns
            qk, v = qkv[:, : qk_heads * self.head_dim], qkv[:, qk_heads * self.head_dim :]
        else:
            qk, v = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
        qk = qk.view(t, qk_heads, self.head_dim)
        compiled = self._compiled_ops(qk, cos, sin)
        if compiled:  # q/k norm and RoPE in one call
            norm = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
            eps = self.q_norm.eps if self.q_norm is not None else 0.0
            qk = decode_cpu.qk_norm_rope(qk, heads, *norm, eps, cos, sin)
        else:
            if self.q_norm is not None:
                qk = rms_norm_heads(qk, heads, self.q_norm, self.k_norm)
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if kv_cache is not None:
            if compiled and kv_cache.dtype == qk.dtype:
                decode_cpu.kv_write(kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx], meta.token_slots, positions,
                                    k, v)
            else:
                kv_cache.write(self.layer_idx, meta.kv_index(kv_cache, positions), k, v)
        compiled_decode = compiled and meta.decode_row_lens is not None and kv_cache.dtype == q.dtype

        if meta.decode_all:
            if compiled_decode:
                out = self._decode_compiled(q, meta, kv_cache, torch.empty_like(q))
            else:
                out = self._decode(q.unsqueeze(2), meta, kv_cache)
            return self.o_proj(out.reshape(t, -1))
        out = torch.empty_like(q)  # [T, H, D_h]
        batch = meta.batch
        # A run of fresh prompts reads this step's k and v: what the cache now holds, where the cache
        # keeps their dtype. A prompt longer than a sliding window needs a mask: its run goes one by one.
        together = kv_cache is None or kv_cache.dtype == k.dtype
        rest = meta.prefill_rest
        for start, n, seqs in meta.prefill_runs:
            if not together or (self.sliding_window is not None and n > self.sliding_window):
                rest = [*rest, *seqs]
                continue
            rows, shape = slice(start, start + len(seqs) * n), (len(seqs), n, -1, self.head_dim)
            o = _sdpa(q[rows].view(shape).transpose(1, 2), k[rows].view(shape).transpose(1, 2),
                      v[rows].view(shape).transpose(1, 2), None, n > 1, self.scaling)  # [B_run, H, n, D_h]
            out[rows].view(len(seqs), n, heads, self.head_dim).copy_(o.transpose(1, 2))
        for b in rest:
            start, n, ctx = batch.starts[b], batch.num_new[b], batch.context_lens[b]
            if kv_cache is not None:
                ks, vs = kv_cache.view(self.layer_idx, batch.slots[b], ctx)
            else:
                ks, vs = k[start : start + n].transpose(0, 1), v[start : start + n].transpose(0, 1)
            mask, is_causal = meta.prefill_mask(b, self.sliding_window)
            qs = q[start : start + n].transpose(0, 1)[None]
            o = _sdpa(qs, ks[None], vs[None], mask, is_causal, self.scaling)
            out[start : start + n] = o[0].transpose(0, 1)
        if meta.decode_rows is not None:
            if compiled_decode:
                self._decode_compiled(q[meta.decode_rows], meta, kv_cache, out)
            else:
                out[meta.decode_rows] = self._decode(q[meta.decode_rows].unsqueeze(2), meta, kv_cache)[:, :, 0]
        return self.o_proj(out.view(t, self.num_heads * self.head_dim))

    def _compiled_ops(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether this step's q/k norm, RoPE, cache write and decode attention run as compiled
        CPU ops (`kernels.decode_cpu`): CPU, no autograd, one dtype throughout."""
        if not decode_cpu.enabled(qk) or cos.dtype != qk.dtype or not (cos.is_contiguous() and sin.is_contiguous()):
            return False
        return self.q_norm is None or (
            self.q_norm.eps == self.k_norm.eps and self.q_norm.weight.dtype == self.k_norm.weight.dtype == qk.dtype
        )

    def _decode_compiled(self, q: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache, out: torch.Tensor):
        """The decode rows' attention as one compiled CPU call over each row's own cache slot,
        q [B_d, H, D_h] -> written into out at the rows' flat indices; returns out."""
        return decode_cpu.decode_attention(q, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx],
                                           meta.decode_row_slots, meta.decode_row_lens, meta.decode_rows,
                                           self.scaling, self.sliding_window, out)

    def _decode(self, q: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache) -> torch.Tensor:
        """One SDPA call for every decode row, q [B_d, H, 1, D_h] -> [B_d, H, 1, D_h]: over the
        decode span's cache rows, with each row's query at its slot's place in the span (rows
        already in the span's slot order go in and come out as they are), or over a copy of
        each row's own slot (`decode_gather`)."""
        if meta.decode_gather:  # each row's own slot, copied: [B_d, H_kv, length, D_h]
            kd, vd = kv_cache.gather(self.layer_idx, meta.decode_index, meta.decode_length)
            return _sdpa(q, kd, vd, meta.decode_mask(self.sliding_window), False, self.scaling)
        lo, hi = meta.decode_span
        kd, vd = kv_cache.span(self.layer_idx, lo, hi, meta.decode_length)  # views
        if not meta.decode_direct:
            qd = q.new_zeros(hi - lo, *q.shape[1:])  # [span, H, 1, D_h]
            qd[meta.decode_index] = q
            q = qd
        od = _sdpa(q, kd, vd, meta.decode_mask(self.sliding_window), False, self.scaling)
        return od if meta.decode_direct else od[meta.decode_index]
