"""The KV cache: one slot per running sequence, allocated once and never reallocated.

Fixed addresses are what a captured CUDA graph needs, and one contiguous [max_seq_len] row per
slot keeps a sequence's keys in one strided view, which SDPA reads directly.

Legend: L layers, S slots, H_kv key/value heads, N max_seq_len, D_h head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of up to `max_seqs` sequences of up to `max_seq_len` tokens."""

    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, max_seqs, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, H_kv, N, D_h]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, H_kv, N, D_h]
        self.num_layers, self.max_seqs, self.max_seq_len = num_layers, max_seqs, max_seq_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @classmethod
    def for_model(cls, model, max_seqs: int, max_seq_len: int) -> "KVCache":
        """A cache shaped for `model` (a DecoderForCausalLM), in its dtype and on its device."""
        cfg = model.config
        w = model.model.embed_tokens.weight
        return cls(cfg.num_layers, max_seqs, max_seq_len, cfg.num_kv_heads, cfg.head_dim, w.dtype, w.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def index(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(slot, head, position) index of each (token, head) in a layer's cache [S, H_kv, N, D_h],
        for token t at position positions[t] of slot slots[t] (both int64[T]): three tensors that
        broadcast to [T, H_kv]. The same for every layer: compute once per step."""
        heads = torch.arange(self.num_kv_heads, device=slots.device)
        return slots[:, None], heads[None, :], positions[:, None]

    def write(self, layer: int, index: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor):
        """Store k, v ([T, H_kv, D_h], any strides) at `index` (from `index`): one index_put_ each."""
        self.k[layer].index_put_(index, k)
        self.v[layer].index_put_(index, v)

    def view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one slot's first `length` positions, each [H_kv, length, D_h]."""
        return self.k[layer, slot, :, :length], self.v[layer, slot, :, :length]

    def gather(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` (int64[B], repeats allowed) up to `length`, each
        [B, H_kv, length, D_h]: a copy."""
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def clear(self, slot: int, length: int, start: int = 0) -> None:
        """Zero positions [start, length) of `slot` in every layer (a sequence leaving it)."""
        if length > start:
            self.k[:, slot, :, start:length].zero_()
            self.v[:, slot, :, start:length].zero_()

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`, every layer (a shared
        prompt prefix): one copy each for keys and values."""
        if length > 0:
            self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
            self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])

    def span(self, layer: int, lo: int, hi: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots lo..hi-1 up to `length`, each [hi - lo, H_kv, length, D_h];
        views of the cache, no copy."""
        return self.k[layer, lo:hi, :, :length], self.v[layer, lo:hi, :, :length]
