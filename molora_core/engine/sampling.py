"""Next-token sampling for a batch of sequences with per-request parameters.

Rows whose request sets logit_bias, a penalty or min_tokens first have their logits adjusted
(`LogitAdjust`, one per such sequence, which counts the tokens it generated). Greedy rows
then take the argmax in one call (on CPU a compiled one: `kernels.decode_cpu.argmax`). Other rows
scale by temperature, keep the top_k logits and the smallest set whose probability reaches top_p,
and draw with the request's own torch.Generator, so the same seed gives the same tokens whatever
else shares the batch.

Legend: B sequences sampled this step, V vocabulary.
"""

from __future__ import annotations

import torch

from kernels import decode_cpu
from molora_core.engine.request import SamplingParams, TokenLogprob

# Rows per LM-head call when scoring many tokens (`score_tokens`): bounds the float32 [rows, V] logits.
SCORE_ROWS = 256
FLOAT32_MAX = torch.finfo(torch.float32).max


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits float32[V] / temperature, shifted so the largest is 0 first (the softmax is the
    same): a tiny temperature (even one that is 0 in float32) then gives -inf to all but the
    likeliest tokens instead of overflowing to inf and NaN probabilities. A +inf logit (a tiny
    repetition penalty divides by it) counts as the largest float."""
    shifted = logits.clamp(max=FLOAT32_MAX)
    shifted = shifted - shifted.max()
    return torch.where(shifted < 0, shifted / temperature, shifted)


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


class LogitAdjust:
    """One sequence's logit_bias and penalties. OpenAI's: logits[j] += bias[j] - c[j] * frequency
    - (c[j] > 0) * presence, where c[j] counts the times the sequence generated token j; then
    transformers' repetition penalty: logits[j] / p where positive, * p where negative, for every
    token j of the prompt or generated so far. The counts and the seen-token mask live on the
    logits' device (a float32[V] and a bool[V]). Last, `held_ids` (the sequence's EOS and stop
    tokens) get -inf until it has generated `min_tokens` tokens."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device,
                 prompt_ids: list[int] = (), held_ids: list[int] = ()) -> None:
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.min_tokens, self.generated = params.min_tokens, 0
        self.bias_ids = self.bias = self.counts = self.seen = self.held_ids = None
        if self.min_tokens and held_ids:
            self.held_ids = torch.tensor(list(held_ids), dtype=torch.long, device=device)
        if params.logit_bias:
            ids, bias = zip(*params.logit_bias)
            self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.bias = torch.tensor(bias, dtype=torch.float32, device=device)
        if self.presence or self.frequency:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if self.repetition != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True

    def apply(self, row: torch.Tensor) -> None:
        """Adjust one row of float32 logits [V] in place."""
        if self.bias is not None:
            row.index_add_(0, self.bias_ids, self.bias)
        if self.counts is not None:
            row.sub_(self.counts * self.frequency + (self.counts > 0).float() * self.presence)
        if self.seen is not None:
            penalised = torch.where(row > 0, row / self.repetition, row * self.repetition)
            row.copy_(torch.where(self.seen, penalised, row))
        if self.held_ids is not None and self.generated < self.min_tokens:
            row.index_fill_(0, self.held_ids, float("-inf"))

    def observe(self, token: int) -> None:
        """Count a generated token."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    adjusts: list[LogitAdjust | None] | None = None,
) -> list[int]:
    """One token per row of logits [B, V] (any float dtype), row b under params[b], after
    adjusts[b] (None: none) changed its logits. The caller's logits are left as they were."""
    converted = logits.float()
    if adjusts and any(a is not None for a in adjusts):
        converted = converted.clone() if converted is logits else converted
        for b, adjust in enumerate(adjusts):
            if adjust is not None:
                adjust.apply(converted[b])
    logits = converted
    out = decode_cpu.argmax(logits).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(scale(logits[b], p.temperature), p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        # Draw on the CPU: a CPU generator gives the same stream on every device.
        out[b] = int(torch.multinomial(probs.cpu(), 1, generator=generators[b]).item())
    return out


def score_tokens(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of targets[i] under lm_head(hidden[i]) with the `top` likeliest tokens'
    (prompt scoring), SCORE_ROWS rows per LM-head call."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(targets), SCORE_ROWS):
            chunk = targets[i : i + SCORE_ROWS]
            out += token_logprobs(lm_head(hidden[i : i + len(chunk)]), chunk, [top] * len(chunk))
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int | None]) -> list[TokenLogprob | None]:
    """For each row b of logits [B, V] with tops[b] not None: the log-probability of tokens[b]
    under log_softmax(row) in float32, and the tops[b] likeliest tokens' (one host read)."""
    rows = [b for b, top in enumerate(tops) if top is not None]
    out: list[TokenLogprob | None] = [None] * len(tops)
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[b]] for b in rows], device=logp.device)).squeeze(1)
    k = min(max(tops[b] for b in rows), logp.shape[-1])
    top_values, top_ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for i, b in enumerate(rows):
        n = tops[b]
        out[b] = TokenLogprob(tokens[b], chosen[i], tuple(zip(top_ids[i][:n], top_values[i][:n])))
    return out
