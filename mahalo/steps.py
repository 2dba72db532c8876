"""Step-boundary detectors: decide when a candidate chunk is a complete reasoning step.

A detector sees the tail of the accepted text (``context``, for rules that look at the whole
current line), the chunk decoded so far and its token count, and answers whether the chunk
ends a step *now*. End-of-turn and the per-step token cap are handled by the controller for
every detector: they always end a step.

Detectors are picked by name from :data:`BOUNDARIES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# Sentence-final punctuation, optionally followed by closing quotes or brackets, then
# optional spaces/tabs and at most one newline (a blank line is its own rule).
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]}]*[ \t]*\n?[ \t]*$")
# A blank line: two newlines with only horizontal whitespace between and after.
_BLANK_LINE = re.compile(r"\n[ \t]*\n[ \t\n]*$")
# A bare list marker alone on its line: "2.", "B)", "iv.", "(3)", "Step 3:", "Step 3."
_LIST_MARKER = re.compile(
    r"^\s*(?:[-*\u2022]\s*)?(?:\(?(?:\d{1,3}|[A-Za-z]|[ivxlcdm]{1,6})[.):]|step\s+\d+\s*[.:)]?)\s*$",
    re.IGNORECASE,
)
# Abbreviations after which a period does not end a sentence (matched case-insensitively
# against the text just before the final period).
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "et al", "dr", "mr", "mrs", "ms", "prof")
_ABBREV = re.compile(
    r"(?:^|[\s(\[\"'])(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")\.[\"')\]]*\s*$",
    re.IGNORECASE,
)


class StepBoundary(Protocol):
    """Decides whether a chunk of generated text ends a step."""

    def __call__(self, context: str, chunk: str, n_tokens: int) -> bool:
        """Args:
            context: the tail of the accepted response text (may be empty).
            chunk: the text of the current step so far.
            n_tokens: the number of tokens in ``chunk``.

        Returns:
            True when the step ends after the chunk's last token.
        """
        ...


def _last_line(text: str) -> str:
    """The last non-empty line of ``text``."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def _is_bare_list_marker(context: str, chunk: str) -> bool:
    return bool(_LIST_MARKER.match(_last_line(context + chunk)))


def _ends_with_abbreviation(context: str, chunk: str) -> bool:
    return bool(_ABBREV.search((context + chunk)[-64:].rstrip()))


@dataclass(frozen=True)
class SentenceBoundary:
    """MAHALO's boundary: a sentence end or a blank line, after at least ``min_tokens`` tokens.

    Never right after a bare list marker (``2.``, ``B)``, ``Step 3:`` alone on its line) or an
    abbreviation (:data:`ABBREVIATIONS`).
    """

    min_tokens: int = 8

    def __call__(self, context: str, chunk: str, n_tokens: int) -> bool:
        if n_tokens < self.min_tokens or not chunk.strip():
            return False
        if not (_BLANK_LINE.search(chunk) or _SENTENCE_END.search(chunk)):
            return False
        if _is_bare_list_marker(context, chunk):
            return False
        return not _ends_with_abbreviation(context, chunk)


@dataclass(frozen=True)
class DoubleNewlineBoundary:
    """Step-by-step reasoning: a step ends at a blank line (after ``min_tokens`` tokens)."""

    min_tokens: int = 1

    def __call__(self, context: str, chunk: str, n_tokens: int) -> bool:
        if n_tokens < self.min_tokens or not chunk.strip():
            return False
        return bool(_BLANK_LINE.search(chunk)) and not _is_bare_list_marker(context, chunk)


@dataclass(frozen=True)
class NoBoundary:
    """Only the token cap and end-of-turn end a step (fixed-length chunks, whole responses)."""

    min_tokens: int = 0

    def __call__(self, context: str, chunk: str, n_tokens: int) -> bool:
        return False


BOUNDARIES: dict[str, type] = {
    "sentence": SentenceBoundary,
    "double_newline": DoubleNewlineBoundary,
    "max_tokens": NoBoundary,
}


def make_boundary(kind: str, min_tokens: int) -> StepBoundary:
    """Build the detector registered under ``kind``.

    Raises:
        ValueError: for an unknown kind (the message lists the valid ones).
    """
    if kind not in BOUNDARIES:
        raise ValueError(f"unknown step boundary {kind!r}: choose one of {sorted(BOUNDARIES)}")
    return BOUNDARIES[kind](min_tokens=min_tokens)
