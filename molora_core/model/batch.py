"""The description of one engine step: which sequences' new tokens make up the flat batch.

A continuous-batching step runs the new tokens of many sequences (prompt chunks and single
decode tokens alike) as one flat batch of T tokens. `StepBatch` says where each sequence's tokens
lie in that batch, which KV-cache slot holds its earlier tokens, and how long it is after the
step. Plain Python ints: the scheduler knows them on the host, and reading them never syncs a
device.

Legend: B sequences in the step, T = sum(num_new) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class StepBatch:
    """Sequence b's new tokens are flat tokens [starts[b], starts[b] + num_new[b]); their
    positions are context_lens[b] - num_new[b] + i, and those positions go into slot slots[b]
    of the KV cache. context_lens[b] == num_new[b] means a fresh sequence (nothing cached)."""

    slots: tuple[int, ...]  # [B] KV-cache slot of each sequence
    starts: tuple[int, ...]  # [B] index of the sequence's first new token in the flat batch
    num_new: tuple[int, ...]  # [B] new tokens this step (a prompt chunk, or 1 when decoding)
    context_lens: tuple[int, ...]  # [B] tokens of the sequence in the cache after this step
    # [B] the length the "dynamic" rope type scales for (None: context_lens). A prompt prefilled
    # in chunks keeps its whole length for every chunk, as one forward over it would.
    rope_lens: tuple[int, ...] | None = None

    @classmethod
    def build(cls, slots, num_new, context_lens, rope_lens=None) -> "StepBatch":
        """Sequences laid out back to back in the given order."""
        num_new = tuple(int(n) for n in num_new)
        starts = (0, *accumulate(num_new))[:-1]
        rope_lens = None if rope_lens is None else tuple(int(n) for n in rope_lens)
        return cls(tuple(int(s) for s in slots), starts, num_new, tuple(int(c) for c in context_lens), rope_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64[T] position of every flat token (what `forward` expects as `positions`), built
        as a host list and made a tensor once (not two ops per sequence)."""
        out = [0] * self.num_tokens
        for start, n, ctx in zip(self.starts, self.num_new, self.context_lens):
            out[start : start + n] = range(ctx - n, ctx)
        return torch.tensor(out, dtype=torch.int64).to(device)

    def per_token(self, values) -> list[int]:
        """[T] list giving every flat token its sequence's entry of `values` ([B])."""
        out = [0] * self.num_tokens
        for start, n, value in zip(self.starts, self.num_new, values):
            out[start : start + n] = [int(value)] * n
        return out

    def last_token_indices(self) -> list[int]:
        """[B] flat index of each sequence's last new token (the one to sample from)."""
        return [start + n - 1 for start, n in zip(self.starts, self.num_new)]

    def validate(self, num_tokens: int, max_slots: int | None = None, max_seq_len: int | None = None):
        """Raise ValueError unless the spans tile [0, num_tokens) and fit the cache."""
        b = self.num_seqs
        if not (len(self.starts) == len(self.num_new) == len(self.context_lens) == b):
            raise ValueError(f"StepBatch fields have different lengths: {self}")
        if b == 0:
            raise ValueError("StepBatch has no sequences")
        if sum(self.num_new) != num_tokens:
            raise ValueError(f"StepBatch covers {sum(self.num_new)} tokens, the batch has {num_tokens}")
        end = 0
        for start, n in sorted(zip(self.starts, self.num_new)):
            if start != end or n < 1:
                raise ValueError(
                    f"StepBatch spans must tile the batch with >= 1 token each; got starts="
                    f"{self.starts} num_new={self.num_new}"
                )
            end = start + n
        if len(set(self.slots)) != b:
            raise ValueError(f"StepBatch uses a KV-cache slot twice: slots={self.slots}")
        for slot, n, ctx in zip(self.slots, self.num_new, self.context_lens):
            if ctx < n:
                raise ValueError(f"context length {ctx} is shorter than its {n} new tokens")
            if max_slots is not None and not 0 <= slot < max_slots:
                raise ValueError(f"slot {slot} outside the KV cache's {max_slots} slots")
            if max_seq_len is not None and ctx > max_seq_len:
                raise ValueError(f"context length {ctx} exceeds the KV cache's max_seq_len {max_seq_len}")
