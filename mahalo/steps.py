"""Step boundaries: where a candidate chunk ends and gets scored.

A step ends at a *confirmed* boundary, never at a guess from a token prefix. Text can only end a
step at a *gap*, where a non-whitespace character is followed by whitespace: "3." is not a
sentence end before we know whether "14" or " It" comes next. So the controller asks a detector
at two moments, both cheap because a per-tokenizer :class:`TokenTable` says which tokens matter:

* **before a token** (:meth:`StepBoundary.ends_before`): the chunk ends in text that may end a
  step (sentence punctuation) and the next sampled token starts with whitespace. If the detector
  confirms, the step ends *before* that token: the token is not kept, and the row's logits at the
  boundary, still in the cache, seed the next step's N fresh candidates (no extra forward).
  A lookahead of spaces alone (``" "`` before a digit in SmolLM2's vocabulary) says nothing yet:
  it is kept and the token after it decides, so "No. 5" is seen whole.
* **after a token** (:meth:`StepBoundary.ends_after`): the token itself ends in whitespace that
  completes a boundary: a blank line, or a sentence end inside one token (``".\\n"``). The token
  is kept.

End-of-turn and the per-step token cap are handled by the controller for every detector: they
always end a step. Detectors are picked by name from :data:`BOUNDARIES`.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

_CLOSERS = "\"')]}\u201d\u2019"
_END_CHARS = ".!?" + _CLOSERS
# A sentence end: final punctuation, optionally followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?][" + re.escape(_CLOSERS) + r"]*$")
# An ellipsis does not end a sentence ("Wait... what?").
_ELLIPSIS = re.compile(r"(?:\.\.\.|\u2026)[" + re.escape(_CLOSERS) + r"]*$")
# A blank line at the end: two newlines with only horizontal whitespace between and after.
_BLANK_LINE = re.compile(r"\n[ \t]*\n[ \t\n]*$")
# A bare list marker alone on its line: "2.", "B)", "iv.", "(3)", "Step 3:", "Step 3."
_LIST_MARKER = re.compile(
    r"^\s*(?:[-*\u2022]\s*)?(?:\(?(?:\d{1,3}|[A-Za-z]|[ivxlcdm]{1,6})[.):]|step\s+\d+\s*[.:)]?)\s*$",
    re.IGNORECASE,
)
# Abbreviations after which a period does not end a sentence (matched case-insensitively
# against the text that ends with the period).
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "et al", "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr",
                 "fig", "approx", "vol", "ca")
_WORD_START = r"(?:^|[\s(\[\"'])"
_ABBREV = re.compile(
    _WORD_START + r"(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")\.[\"')\]]*$", re.IGNORECASE
)
# Initialisms: single letters each followed by a period ("U.S.", "a.m.", "e.g.").
_INITIALISM = re.compile(_WORD_START + r"(?:[A-Za-z]\.){2,}[\"')\]]*$")
# Abbreviations that precede a number ("No. 5", "pp. 12").
_BEFORE_NUMBER = re.compile(_WORD_START + r"(?:no|nos|nr|pp?|vol|art|sec|ch)\.$", re.IGNORECASE)


class StepBoundary(Protocol):
    """Decides where generated text ends a step (see the module docstring)."""

    min_tokens: int  # a step has at least this many tokens before a boundary counts

    def may_end(self, token_text: str) -> bool:
        """Cheap filter on one token's text: could a step end right after a token like this?

        Used once per vocabulary to build the :class:`TokenTable`; must be True for every token
        after which :meth:`ends_before` or :meth:`ends_after` can return True.
        """
        ...

    def ends_before(self, context: str, chunk: str, following: str) -> bool:
        """True when the step ends between ``chunk`` (ending in non-whitespace) and ``following``.

        Args:
            context: the tail of the accepted response text (may be empty).
            chunk: the text of the current step so far.
            following: the text that comes next, starting with whitespace (the lookahead token,
                or kept spaces plus the token after them).
        """
        ...

    def ends_after(self, context: str, chunk: str) -> bool:
        """True when ``chunk``, whose last token ends in whitespace, ends the step right there."""
        ...


def _last_line(text: str) -> str:
    """The last non-empty line of ``text``."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def _is_bare_list_marker(text: str) -> bool:
    return bool(_LIST_MARKER.match(_last_line(text)))


def _blank_line_ends(context: str, chunk: str) -> bool:
    """The chunk has content and ends with a blank line that is not right after a list marker."""
    return bool(chunk.strip()) and bool(_BLANK_LINE.search(chunk)) and not _is_bare_list_marker(context + chunk)


def sentence_ends(before: str, next_word: str = "") -> bool:
    """Whether ``before`` (ending in non-whitespace) ends a sentence when whitespace and
    ``next_word`` follow it. Abbreviations, initialisms, ellipses, bare list markers and
    "No." before a number do not."""
    tail = before[-64:]
    if not _SENTENCE_END.search(tail) or _ELLIPSIS.search(tail):
        return False
    if _ABBREV.search(tail) or _INITIALISM.search(tail) or _is_bare_list_marker(before):
        return False
    return not (next_word[:1].isdigit() and _BEFORE_NUMBER.search(tail))


@dataclass(frozen=True)
class SentenceBoundary:
    """MAHALO's boundary: a confirmed sentence end or a blank line, after ``min_tokens`` tokens.

    Never at an abbreviation (:data:`ABBREVIATIONS`), an initialism ("U.S."), an ellipsis, a bare
    list marker (``2.``, ``B)``, ``Step 3:`` alone on its line) or "No." before a number; never
    inside a number ("3.14") or a name ("example.com"), since no whitespace follows the period.
    """

    min_tokens: int = 8

    def may_end(self, token_text: str) -> bool:
        return "\n" in token_text or token_text.rstrip()[-1:] in tuple(_END_CHARS)

    def ends_before(self, context: str, chunk: str, following: str) -> bool:
        if not chunk.strip():
            return False
        next_word = following.split()[0] if following.split() else ""
        return sentence_ends(context + chunk, next_word)

    def ends_after(self, context: str, chunk: str) -> bool:
        if _blank_line_ends(context, chunk):
            return True
        body = chunk.rstrip()
        return bool(body.strip()) and len(body) < len(chunk) and sentence_ends(context + body)


@dataclass(frozen=True)
class DoubleNewlineBoundary:
    """Step-by-step reasoning: a step ends at a blank line (after ``min_tokens`` tokens)."""

    min_tokens: int = 1

    def may_end(self, token_text: str) -> bool:
        return "\n" in token_text

    def ends_before(self, context: str, chunk: str, following: str) -> bool:
        return False

    def ends_after(self, context: str, chunk: str) -> bool:
        return _blank_line_ends(context, chunk)


@dataclass(frozen=True)
class NoBoundary:
    """Only the token cap and end-of-turn end a step (fixed-length chunks, whole responses)."""

    min_tokens: int = 0

    def may_end(self, token_text: str) -> bool:
        return False

    def ends_before(self, context: str, chunk: str, following: str) -> bool:
        return False

    def ends_after(self, context: str, chunk: str) -> bool:
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


# --------------------------------------------------------------------------- token table


@dataclass(frozen=True)
class TokenTable:
    """What the step rules need to know of every token of a vocabulary, computed once.

    ``text[i]`` is token i's text as it reads after other text (a leading space included, which a
    SentencePiece tokenizer drops when it decodes a token alone); special tokens read as ``""``.
    """

    text: list[str]
    ws_start: list[bool]  # the text starts with whitespace
    ws_end: list[bool]  # ... ends with whitespace
    spaces: list[bool]  # the text is spaces or tabs only (no newline): a lookahead that says nothing yet
    may_end: list[bool]  # the detector's may_end(text)


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> list[str]:
    """Every token's text as it reads after a letter, cached per tokenizer (one batched decode)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
        head = tokenizer.decode(anchor, skip_special_tokens=True)
        pairs = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], skip_special_tokens=True)
        texts = [p[len(head):] if p.startswith(head) else p for p in pairs]
        _TEXTS[tokenizer] = texts
    return texts


def token_table(tokenizer: Any, boundary: StepBoundary) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer`` for ``boundary``'s kind, cached."""
    per_tokenizer = _TABLES.setdefault(tokenizer, {})
    key = type(boundary)
    if key not in per_tokenizer:
        texts = token_texts(tokenizer)
        per_tokenizer[key] = TokenTable(
            text=texts,
            ws_start=[t[:1].isspace() for t in texts],
            ws_end=[t[-1:].isspace() for t in texts],
            spaces=[bool(t) and not t.strip(" \t") for t in texts],
            may_end=[boundary.may_end(t) for t in texts],
        )
    return per_tokenizer[key]


# --------------------------------------------------------------------------- incremental text


class ChunkText:
    """A chunk's text as it reads after its beam's last tokens, detokenised incrementally.

    Only the tokens added since the last read are decoded, with a short window of earlier tokens
    for the spaces and merges that depend on them (vLLM's scheme); a decode that ends in an
    incomplete character waits for the next token.
    """

    WINDOW = 4  # earlier tokens decoded with new ones

    def __init__(self, decode: Any, context: list[int]) -> None:
        self.decode = decode
        self.ids = list(context[-self.WINDOW:])
        self.prefix = 0  # ids[prefix:read] are the window of the last read
        self.read = len(self.ids)  # ids before this are in ``text`` (or are context)
        self.text = ""

    def append(self, token: int) -> None:
        self.ids.append(token)

    def current(self) -> str:
        """The chunk's text so far."""
        if self.read < len(self.ids):
            before = self.decode(self.ids[self.prefix:self.read])
            full = self.decode(self.ids[self.prefix:])
            if not full.endswith("\ufffd"):
                self.text += full[len(before):] if full.startswith(before) else self.decode(self.ids[self.read:])
                self.read = len(self.ids)
                self.prefix = max(self.read - self.WINDOW, 0)
        return self.text
