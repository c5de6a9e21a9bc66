"""The decoder: Llama / Mistral / Qwen2 / Qwen3 with Hugging Face's module names.

`DecoderForCausalLM.state_dict()` keys equal a Hugging Face checkpoint's (`model.embed_tokens`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`, ...), so
weights load by name and a LoRA-aware layer can replace any projection by its path. Every module
sees flattened tokens [T, D]: the engine's continuous batch, with no batch or padding dimension.

Legend: T tokens, B sequences, D hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from molora_core.model.attention import Attention, AttentionMeta
from molora_core.model.batch import StepBatch
from molora_core.model.config import DecoderConfig
from molora_core.model.kv_cache import KVCache
from molora_core.model.layers import MLP, RMSNorm
from molora_core.model.rope import RotaryEmbedding

EmbeddingHook = Callable[[torch.Tensor], None]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, positions, cos, sin, meta, kv_cache):
        """(h, residual) -> (h, residual): the layer's input is h + residual (h alone where
        residual is None), and its output the returned pair's sum, left unadded so that the next
        norm adds it (one op on CPU, `RMSNorm.add_norm`). Rounded as transformers' layer is."""
        x, residual = self.input_layernorm.add_norm(h, residual)
        h = self.self_attn(x, positions, cos, sin, meta, kv_cache)
        x, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of a checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Decoder plus `lm_head`; `forward` runs one continuous-batching step."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: StepBatch,
        kv_cache: KVCache | None = None,
        on_embeddings: EmbeddingHook | None = None,
        logits: Literal["all", "last", "none"] = "all",
    ) -> torch.Tensor:
        """Run one step over the flat new tokens of `batch`'s sequences.

        input_ids: int64[T] new tokens, sequence b's at [starts[b], starts[b] + num_new[b]).
        positions: int64[T] each token's position in its sequence (`batch.positions()`), i.e.
            context_lens[b] - num_new[b] + i; RoPE and the cache write use it.
        kv_cache: keys/values of earlier tokens; this step's are written into it. May be None
            only when every sequence is fresh (context_lens == num_new).
        on_embeddings: called once with the embedding output h [T, D] before layer 0 (the
            per-token router builds its routing plan from it).
        logits: "all" -> [T, V]; "last" -> [B, V], row b for sequence b's last new token;
            "none" -> the final-normed hidden states [T, D].
        """
        t = input_ids.shape[0]
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [T]; got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        if kv_cache is None:
            batch.validate(t)
        else:
            batch.validate(t, kv_cache.max_seqs, kv_cache.max_seq_len)
        meta = AttentionMeta.build(batch, input_ids.device, kv_cache is not None)

        h = self.model.embed_tokens(input_ids)  # [T, D]
        if on_embeddings is not None:
            on_embeddings(h)
        seq_lens = None
        if self.rotary.rope_type == "dynamic":
            seq_lens = torch.tensor(batch.per_token(batch.rope_lens or batch.context_lens), dtype=torch.int64)
            seq_lens = seq_lens.to(input_ids.device)
        h = self._layers(h, positions, meta, kv_cache, seq_lens)

        if logits == "none":
            return h
        if logits == "last":
            last = torch.tensor(batch.last_token_indices(), dtype=torch.int64, device=h.device)
            h = h[last]
        elif logits != "all":
            raise ValueError(f"logits={logits!r}; expected 'all', 'last' or 'none'")
        return self.lm_head(h)

    def forward_static_decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, kv_cache: KVCache,
        on_embeddings: EmbeddingHook | None = None,
    ) -> torch.Tensor:
        """Logits [B, V] of a decode step whose every input is a fixed device buffer (what a CUDA
        graph captures): input_ids / positions int64[B], meta from `AttentionMeta.static_decode`.
        No host reads, no host-to-device copies (`on_embeddings`, called with h [B, D] as in
        `forward`, must keep to that too); not for the "dynamic" rope type (its frequencies
        depend on per-step lengths)."""
        if self.rotary.rope_type == "dynamic":
            raise ValueError("static decode does not support the 'dynamic' rope type")
        meta._step_cache.clear()  # built from the buffers' current contents (captured: on every replay)
        h = self.model.embed_tokens(input_ids)
        if on_embeddings is not None:
            on_embeddings(h)
        return self.lm_head(self._layers(h, positions, meta, kv_cache))

    def _layers(self, h, positions, meta, kv_cache, seq_lens=None) -> torch.Tensor:
        """Every decoder layer, then the final norm: [T, D] -> [T, D]."""
        cos, sin = self.rotary.cos_sin(positions, h.dtype, seq_lens)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, positions, cos, sin, meta, kv_cache)
        return self.model.norm.add_norm(h, residual)[0]

    def forward_dense(self, input_ids: torch.Tensor, on_embeddings: EmbeddingHook | None = None) -> torch.Tensor:
        """Logits [B, L, V] for B fresh sequences int64[B, L], no cache (parity tests, scoring)."""
        b, length = input_ids.shape
        batch = StepBatch.build(range(b), [length] * b, [length] * b)
        positions = torch.arange(length, device=input_ids.device).repeat(b)
        out = self.forward(input_ids.reshape(-1), positions, batch, None, on_embeddings)
        return out.view(b, length, -1)
