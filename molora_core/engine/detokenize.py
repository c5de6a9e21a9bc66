"""Incremental detokenization with stop strings, for streaming text deltas.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens; decoding a prefix that
ends inside a character yields U+FFFD. Like vLLM, we decode a short window of recent tokens and
release text only once it no longer ends in U+FFFD, so no replacement character is ever sent
for a character that later completes. Text that could still be the start of a stop string is
held back until it cannot be, so the stream never sends what the final output cuts off.

The window starts on the prompt's last few tokens: a SentencePiece (Metaspace) tokenizer drops
the leading space of the first token it decodes, so the first generated word would lose its
space if decoded alone.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens the first decode window starts on (vLLM's offset too)


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into safe-to-send text deltas."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), include_stop: bool = False, prompt=()):
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust decoder directly: what its `decode` runs (cleanup is off here),
        # without the Python wrapper around it (1 us instead of 5 per call, two calls per token).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = getattr(backend, "decode", None)
        self.stop = stop
        self.include_stop = include_stop  # the text ends after the stop string instead of before it
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = list(prompt[-PROMPT_CONTEXT:])  # context, then the generated ids
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self.ids)  # tokens before this are already in `text` (or the prompt's)
        self.text = ""  # decoded (possibly not yet sent) text
        self.sent = 0  # characters of `text` already sent
        self._stop_checked = 0  # characters of `text` checked for stop strings
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """Append one token; sets `stopped` (and cuts `text`) when a stop string appears. With
        check_stop False the new text is taken as checked: a later check finds a stop string in
        it only where the string ends past it."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._check_stop(check_stop)

    def _check_stop(self, search: bool = True) -> None:
        if not self.stop:
            return
        if not search:
            self._stop_checked = len(self.text)
            return
        # Only a string that ends past the checked text is new (each string's own window).
        hits = [(i, len(s)) for i, s in ((self.text.find(s, max(0, self._stop_checked - len(s) + 1)), s)
                                         for s in self.stop) if i >= 0]
        if hits:
            start, length = min(hits)  # the first to begin; of two there, the first to end
            self.text = self.text[: start + length if self.include_stop else start]
            self.stopped = True
        self._stop_checked = len(self.text)

    def flush(self, check_stop: bool = True) -> None:
        """At the end of the request: take whatever the window still holds (even a broken char)."""
        if self.stopped:
            return
        tail = self._decode(self.ids[self._prefix_offset :])
        head = self._decode(self.ids[self._prefix_offset : self._read_offset])
        if len(tail) > len(head):
            self.text += tail[len(head) :]
            self._read_offset = len(self.ids)
            self._check_stop(check_stop)

    def take_delta(self, final: bool) -> str:
        """Text not sent yet; all of it when final, else minus a possible stop-string prefix."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._holdback)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
