"""Next-token sampling for a batch of sequences with per-request parameters.

Greedy rows take the argmax in one call (on CPU a compiled one: `kernels.decode_cpu.argmax`).
Other rows scale by temperature, keep the top_k logits and the smallest set whose probability
reaches top_p, and draw with the request's own torch.Generator, so the same seed gives the same
tokens whatever else shares the batch.

Legend: B sequences sampled this step, V vocabulary.
"""

from __future__ import annotations

import torch

from kernels import decode_cpu
from molora_core.engine.request import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits float32[V] with everything outside top_k / the top_p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of logits [B, V] (any float dtype), row b under params[b]."""
    logits = logits.float()
    out = decode_cpu.argmax(logits).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[b] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        # Draw on the CPU: a CPU generator gives the same stream on every device.
        out[b] = int(torch.multinomial(probs.cpu(), 1, generator=generators[b]).item())
    return out
