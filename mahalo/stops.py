"""Stop strings (OpenAI's ``stop``): where a response's text ends, found token by token.

A candidate is checked as it grows, on the text its new token added (the chunk's incrementally
detokenised text, :class:`mahalo.steps.ChunkText`) plus the few characters before it that a stop
string could start in, so a check costs the new characters, not the response. A match ends the
candidate (end reason ``stop``): its text is cut where the stop string starts, and its tokens
after the last one that spells any of that text are dropped (:func:`tokens_for`).

A streamed answer may not show text that a later stop string removes: :func:`safe_length` holds
back a suffix that could still grow into one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_STOP = 4  # OpenAI's limit on stop strings per request


def find_stop(before: str, chunk: str, scanned: int, stops: Sequence[str]) -> int | None:
    """The start of the first stop string in ``before + chunk`` that ends after ``scanned``
    characters of ``chunk`` (earlier text was checked already), relative to ``chunk``: negative
    when it starts in ``before`` (the beam's text). None: no stop string."""
    longest = max(len(s) for s in stops)
    start = scanned - (longest - 1)
    if start >= 0:
        text, offset = chunk[start:], start
    else:
        lead = before[max(0, len(before) + start):]
        text, offset = lead + chunk, -len(lead)
    hits = []
    for stop in stops:
        at = text.find(stop)
        while at >= 0 and offset + at + len(stop) <= scanned:  # ends in text checked already
            at = text.find(stop, at + 1)
        if at >= 0:
            hits.append(at)
    return offset + min(hits) if hits else None


def safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` a stream may send: all of it but the longest suffix that is the start
    of a stop string (the next tokens could complete it, and the answer would then end before it)."""
    for keep in range(max(0, len(text) - max((len(s) for s in stops), default=0) + 1), len(text)):
        tail = text[keep:]
        if any(s.startswith(tail) for s in stops):
            return keep
    return len(text)


def tokens_for(decode: Callable[[list[int]], str], ids: list[int], chars: int) -> int:
    """The fewest leading tokens of ``ids`` whose text has ``chars`` characters: a token that
    straddles the cut is kept (its text is cut, its id is not)."""
    k = len(ids)
    while k > 0 and len(decode(ids[:k - 1]).rstrip("\ufffd")) >= chars:
        k -= 1
    return k
