"""The KV cache's sequence slots, and prefix caching: a new sequence starts after the prompt
tokens whose keys and values another sequence already computed.

A slot is free (zeroed), held by a running sequence, or cached: a finished sequence's slot keeps
its keys and values, and the tokens they came from, until a new sequence takes it or a slot is
needed and none is free (the least recently cached goes first, zeroed). A new sequence whose
prompt begins with tokens computed under the same routing starts after them:

- from a cached slot whose tokens it shares all of (a chat's next turn), or when no slot is free,
  it takes that slot as it is: no copy, and the rows past the shared prefix are zeroed (decode
  attention reads them masked; see `Engine._release`); otherwise it copies the shared rows
  into a free slot and the cached one stays for others;
- from a running sequence (another choice of an n > 1 request, a request with the same system
  prompt), the shared rows are copied into its own slot once the running one has computed them;
  until then it sits out the steps.

Keys and values depend on the routing as well as the tokens, so only sequences with equal
`kv_key`s share: the router's routes plus the hot-set load serial of every slot it reads (a slot
loaded again, with any adapter, gets a new serial). A prompt's last token is always computed
again, since its logits are needed, and a request that scores its prompt (`prompt_logprobs`)
computes every token. Owned by the step thread.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable

from molora_core.engine.sequence import Sequence
from molora_core.model import KVCache


class KVSlots:
    """Slots 0..num_slots-1 of `kv_cache`; `prefix_caching` False frees every slot at exit."""

    def __init__(self, kv_cache: KVCache, num_slots: int, prefix_caching: bool = True):
        self.kv_cache, self.prefix_caching = kv_cache, prefix_caching
        # Free slots as a min-heap: the lowest goes first, so running sequences stay packed at the
        # low slots and a step's decode rows, sorted by slot, make one span in order.
        self._free = list(range(num_slots))
        # Cached slots, least recently cached first: slot -> (kv_key, the tokens its rows hold).
        self._cached: OrderedDict[int, tuple[tuple, list[int]]] = OrderedDict()
        self.hits = 0  # sequences that started from a shared prefix
        self.reused_tokens = 0  # prompt tokens they did not compute

    def available(self) -> int:
        """Slots a new sequence can take: free ones and cached ones."""
        return len(self._free) + len(self._cached)

    def cached(self) -> int:
        return len(self._cached)

    def assign(self, seq: Sequence, running: Iterable[Sequence]) -> None:
        """Give `seq` (admitted, not yet running) a slot, and the longest prefix it can share."""
        length, source = self._best_prefix(seq, running)
        if isinstance(source, int):  # a cached slot
            tokens = self._cached[source][1]
            if length == len(tokens) or not self._free:
                # All of it is shared (a chat's next turn), or a slot must go anyway: take it as it is.
                del self._cached[source]
                self.kv_cache.clear(source, len(tokens), start=length)
                seq.kv_slot = source
            else:  # part of it: copy that part into a free slot and keep the entry for others
                self._cached.move_to_end(source)
                seq.kv_slot = heapq.heappop(self._free)
                self.kv_cache.copy(source, seq.kv_slot, length)
            self._started(seq, length)
            return
        seq.kv_slot = self._take()
        if source is not None:
            seq.share = (source, length)
            self.ready(seq)

    def ready(self, seq: Sequence) -> bool:
        """True when `seq` can run this step: it shares nothing, or its source has now computed
        the shared rows (copied here)."""
        if seq.share is None:
            return True
        source, length = seq.share
        if source.kv_slot < 0:  # (gone without `release`: share nothing rather than wait forever)
            seq.share = None
            return True
        if source.num_computed < length:
            return False
        self._copy(seq, source, length)
        return True

    def release(self, seq: Sequence, keep: bool, running: Iterable[Sequence]) -> None:
        """`seq` leaves its slot: cached where `keep` (it finished or was aborted, its rows are
        whole), zeroed and freed otherwise. Sequences still waiting to copy from it copy what it
        has now."""
        for other in running:
            if other.share is not None and other.share[0] is seq:
                self._copy(other, seq, min(other.share[1], seq.num_computed))
        slot, seq.kv_slot, seq.share = seq.kv_slot, -1, None
        if slot < 0:
            return
        n = seq.num_computed
        if keep and self.prefix_caching and seq.kv_key is not None and n > 0:
            self._cached[slot] = (seq.kv_key, (seq.prompt_ids + seq.output_ids)[:n])
        else:  # (a step that failed may have written rows past num_computed: up to its tokens)
            self.kv_cache.clear(slot, max(n, seq.num_tokens))
            heapq.heappush(self._free, slot)

    # -- internals -------------------------------------------------------------------------
    def _best_prefix(self, seq: Sequence, running: Iterable[Sequence]) -> tuple[int, int | Sequence | None]:
        """(length, source) of the longest prefix `seq` can share: a cached slot (int) or a running
        sequence; (0, None) for none. At equal lengths a cached slot goes first (no copy), then a
        running sequence that has computed it (no wait)."""
        prompt, key = seq.prompt_ids, seq.kv_key
        limit = len(prompt) - 1  # the last prompt token runs again: its logits are needed
        if not self.prefix_caching or key is None or seq.prompt_logprobs is not None or limit < 1:
            return 0, None
        best, rank, source = 0, 0, None
        for slot, (other_key, tokens) in self._cached.items():
            if other_key == key:
                n = common_prefix(prompt, tokens, limit)
                if n and (n, 2) > (best, rank):
                    best, rank, source = n, 2, slot
        for other in running:
            if other.kv_key == key and other.kv_slot >= 0 and other.prompt_ids[0] == prompt[0]:
                n = common_prefix(prompt, other.prompt_ids, limit)
                if n == len(other.prompt_ids) and other.output_ids:  # on into what it generated
                    n += common_prefix(prompt[n:], other.output_ids, limit - n)
                ready = int(other.num_computed >= n)
                if n and (n, ready) > (best, rank):
                    best, rank, source = n, ready, other
        return best, source

    def _take(self) -> int:
        """A free slot, or the least recently cached one, zeroed."""
        if self._free:
            return heapq.heappop(self._free)
        slot, (_, tokens) = self._cached.popitem(last=False)
        self.kv_cache.clear(slot, len(tokens))
        return slot

    def _copy(self, seq: Sequence, source: Sequence, length: int) -> None:
        self.kv_cache.copy(source.kv_slot, seq.kv_slot, length)
        seq.share = None
        self._started(seq, length)

    def _started(self, seq: Sequence, length: int) -> None:
        seq.num_computed = seq.cached_tokens = length
        if length:
            self.hits += 1
            self.reused_tokens += length


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`: a binary search over
    slice comparisons, each done in C."""
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # a[:lo] == b[:lo] holds; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
