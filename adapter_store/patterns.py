"""The user regexes of adapter_config.json, checked and matched with a bound.

PEFT reads ``target_modules`` (when it is a string) and the keys of ``rank_pattern`` and
``alpha_pattern`` as regexes. They come from whoever uploads an adapter, and a backtracking engine
can take hours on a six-character pattern such as ``(.*)*z`` (catastrophic backtracking). So:

- every pattern must compile under Python's ``re`` (what PEFT and our loader use), else it is refused;
- the registry's own matching runs on the ``regex`` engine with a deadline (``Deadline``), and a
  pattern that cannot be decided in time is refused;
- pattern keys are matched again at load time by the model side (``_pattern_value`` in
  ``molora_core/peft_io.py``, the twin of ``pattern_value`` below) with plain ``re`` and no time
  limit, and ``regex`` is fast on patterns that make ``re`` hang, so a fast match here proves nothing
  about the loader. Keys must therefore also avoid the shapes that make a backtracking engine blow
  up: a repeat inside a repeat, an alternation inside a repeat, backreferences, and more than
  ``MAX_KEY_REPEATS`` repeats (each one multiplies the work by up to the module path's length).
"""

from __future__ import annotations

import re
import time

import regex

from .errors import AdapterInvalid

try:  # the parser behind re.compile; the only parser of exactly re's syntax
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERN_KEYS = 1024      # keys per rank_pattern / alpha_pattern (a key per module of a large model)
MAX_REPEATING_KEYS = 32      # of which keys with a repeat ('+', '*', '{m,n}'): each costs far more per match
MAX_PATTERN_CHARS = 256      # characters per pattern
MAX_KEY_REPEATS = 3          # with the loader's own '(?:.*\.)?', a match costs at most ~len(path)^4 steps
MATCH_BUDGET_S = 5.0         # all the matching one validation may do (one core, bounded)

_REPEATS = tuple(getattr(_sre, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, n))
_BACKREFS = tuple(getattr(_sre, n) for n in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE",
                                                 "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE") if hasattr(_sre, n))


class Deadline:
    """A time budget shared by every match of one validation."""

    def __init__(self, seconds: float = MATCH_BUDGET_S):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1e-3)


def _children(av):
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _children(item)


def _backtracking_hazard(sub, in_repeat: bool, repeats: list[int]) -> str | None:
    """Why ``sub`` (a parsed re pattern) can backtrack badly, or None."""
    for op, av in sub.data:
        why = None
        if op in _REPEATS:
            _lo, hi, body = av
            if hi > 1:
                if in_repeat:
                    return "a repeat inside a repeat"
                repeats[0] += 1
            why = _backtracking_hazard(body, in_repeat or hi > 1, repeats)
        elif op == _sre.BRANCH and in_repeat:
            return "an alternation inside a repeat"
        elif op in _BACKREFS:
            return "a backreference"
        else:
            for child in _children(av):
                why = why or _backtracking_hazard(child, in_repeat, repeats)
        if why:
            return why
    return None


def compile_target_regex(raw: str) -> regex.Pattern:
    """``target_modules`` given as a string: PEFT fullmatches it against each module's full name."""
    if len(raw) > MAX_PATTERN_CHARS:
        raise AdapterInvalid(f"target_modules is a {len(raw)}-character regex, expected at most "
                             f"{MAX_PATTERN_CHARS}", param="target_modules")
    try:
        re.compile(raw)
        return regex.compile(raw)
    except (re.error, regex.error) as e:
        raise AdapterInvalid(f"target_modules {raw!r} is not a valid regex: {e}", param="target_modules") from None


def compile_pattern_keys(field: str, patterns: dict) -> dict[str, regex.Pattern]:
    """Check the keys of ``rank_pattern`` or ``alpha_pattern`` (``field``) and compile each the way
    PEFT applies it (the key matches the end of the module's dotted path)."""
    if len(patterns) > MAX_PATTERN_KEYS:
        raise AdapterInvalid(f"{field} has {len(patterns)} keys, expected at most {MAX_PATTERN_KEYS}", param=field)
    compiled, repeating = {}, 0
    for key in patterns:
        if not key or len(key) > MAX_PATTERN_CHARS:
            raise AdapterInvalid(f"{field} key {key[:80]!r} has {len(key)} characters, expected 1-"
                                 f"{MAX_PATTERN_CHARS}", param=field)
        wrapped = rf"(?:.*\.)?(?:{key})"  # (grouped: every alternative of `a|b` ends the path)
        try:
            re.compile(key)
            parsed = _sre.parse(wrapped)
            compiled[key] = regex.compile(wrapped)
        except (re.error, regex.error, RecursionError, OverflowError) as e:
            raise AdapterInvalid(f"{field} key {key!r} is not a valid regex: {e}", param=field) from None
        repeats = [0]
        why = _backtracking_hazard(parsed, False, repeats)
        if why is None and repeats[0] - 1 > MAX_KEY_REPEATS:
            why = f"{repeats[0] - 1} repeats (at most {MAX_KEY_REPEATS})"
        repeating += repeats[0] > 1
        if why is None and repeating > MAX_REPEATING_KEYS:
            why = f"a repeat, and more than {MAX_REPEATING_KEYS} of the keys have one"
        if why:
            raise AdapterInvalid(
                f"{field} key {key!r} is refused: it has {why}, which can make regex matching take hours; "
                "expected a module name or a simple regex such as 'q_proj' or 'layers\\.[0-9]+\\.self_attn\\.q_proj'",
                param=field,
            )
    return compiled


def fullmatch(pattern: regex.Pattern, text: str, deadline: Deadline, field: str) -> bool:
    """``pattern.fullmatch(text)`` within the deadline; AdapterInvalid naming ``field`` when it
    cannot be decided in time."""
    try:
        return pattern.fullmatch(text, timeout=deadline.left()) is not None
    except TimeoutError:
        raise AdapterInvalid(
            f"{field} pattern {pattern.pattern[:80]!r} could not be matched within {deadline.seconds} s; "
            "expected a module name or a simple regex", param=field,
        ) from None


def pattern_value(field: str, patterns: dict, compiled: dict[str, regex.Pattern], path: str, default,
                  deadline: Deadline):
    """PEFT's rule, as the loader applies it: the first key equal to ``path`` or matching its end
    (after a dot) gives the value; else ``default``. Twin of molora_core/peft_io.py ``_pattern_value``."""
    for key, value in patterns.items():
        if path == key or fullmatch(compiled[key], path, deadline, field):
            return value
    return default
