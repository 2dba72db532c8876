"""The state of the searches in flight: plain dataclasses, no logic beyond what they hold.

    Plan      how a prompt is searched (its options, the search's shape, its objectives)
    Prompt    a prompt ready to join: its conversation, the policy's ids, its plan
    Search    one prompt in flight: its beams, the current step's candidate rows, its pool
    Beam      an accepted partial response (its tokens live in a beam slot of the KV cache)
    Row       one candidate of the current step (its tokens live in a row slot)
    Finished  an ended response in the pool, with its raw scores
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mahalo.chat import Messages
from mahalo.config import GuideConfig
from mahalo.engine.strategies import Strategy
from mahalo.result import Stats, Step
from mahalo.steps import ChunkText


@dataclass(frozen=True)
class Plan:
    """How one prompt is searched: its options, the search's shape and its objectives."""

    cfg: GuideConfig
    strategy: Strategy
    weights: dict[str, float]  # the objectives it is guided by -> weight (the others are not read)
    step_cap: int  # tokens that end a step at the latest (stepwise) or the response budget
    root: int  # its sampling stream
    prune: tuple[float, ...] = ()  # search.prune: the weight of each token-level probe in the partial score
    prune_source: int | None = None  # search.prune by a separate reward model: its source (controller.sources)

    @property
    def rows(self) -> int:
        """Candidate rows of its widest step (the first: B*N)."""
        return self.strategy.beams * self.strategy.candidates

    @property
    def max_steps(self) -> int:
        """The most steps a response can take (each step at least one token, and at least
        ``min_step_tokens`` unless it is the last)."""
        budget = self.cfg.search.max_new_tokens
        return -(-budget // max(1, self.cfg.step.min_step_tokens)) if self.strategy.stepwise else 1


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to join the batch: its conversation, the policy's token ids and its plan,
    checked against every model's context (``Controller.prepare``)."""

    messages: Messages
    ids: list[int]
    plan: Plan


@dataclass
class Beam:
    """An accepted partial response. Its tokens' keys and values are in beam slot ``slot``
    (-1: none yet, the empty root beam)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    stream: int = 0  # the sampling stream its candidates branch from
    steps: list[str] = field(default_factory=list)  # its text, step by step
    slot: int = -1


@dataclass
class Finished:
    """An ended response: where it ended and its raw scores."""

    beam: Beam
    reason: str
    scores: dict[str, float]
    step: int
    row: int


@dataclass
class Row:
    """One candidate of a step: its tokens so far and where its keys and values are.

    ``slot`` is its row slot (its step's tokens and its next-token logits); ``prompt_slot`` /
    ``beam_slot`` are the slots it reads: its prompt's and its beam's. When prefixes are not
    shared (``engine.share_prefix=false``) its row slot holds a private copy of its prompt and its
    beam first (``base`` columns), as a per-row cache holds them, and it reads nothing else.
    """

    search: Search
    parent: int  # the index of the beam it extends among its prompt's beams
    beam: Beam  # that beam
    stream: int
    slot: int
    prompt_slot: int
    beam_slot: int
    position: int  # its next draw's index in the response (the sampling key)
    base: int = 0  # columns of its row slot before its own tokens (a private prompt and beam)
    group: int = 0  # the beam it competes for (dvts: its subtree): its index among the step's candidates // N
    tokens: list[int] = field(default_factory=list)  # new tokens, end-of-turn excluded
    logprobs: list[float] = field(default_factory=list)
    end: str = ""  # "step" | "eos" | "stop" | "length"
    deferred: bool = False  # kept a spaces-only lookahead: the next token decides the boundary
    text: ChunkText | None = None  # created on the first boundary check
    fed: int = 0  # tokens forwarded (held in its row slot)
    scanned: int = 0  # characters of its text checked for stop strings
    cut: int | None = None  # a stop string ended it: the response tokens it keeps (its beam's included)
    cut_text: str | None = None  # ... and the response's text, up to where the stop string starts
    final_partial: float | None = None  # pruning by a reward model: its score once ended (its text is final)

    @property
    def plan(self) -> Plan:
        return self.search.plan

    @property
    def response_ids(self) -> list[int]:
        """The response's token ids with this candidate (cut back after a stop string)."""
        return (self.beam.token_ids + self.tokens)[:self.cut]

    @property
    def response_logprobs(self) -> list[float]:
        return (self.beam.logprobs + self.logprobs)[:self.cut]

    @property
    def length(self) -> int:
        """Tokens its cache holds before its next one: prompt + beam + its own."""
        return len(self.search.ids) + len(self.beam.token_ids) + self.fed


@dataclass
class Search:
    """One prompt in flight: its beams, its current step's candidate rows, its finished pool."""

    index: int  # the prompt's input index
    plan: Plan
    messages: Messages
    ids: list[int]  # the policy's prompt ids
    stats: Stats
    t0: float
    beams: list[Beam] = field(default_factory=list)
    rewards: dict[int, Any] = field(default_factory=dict)  # source index -> its state (one row per beam)
    origins: list[int] = field(default_factory=lambda: [-1])  # each beam's candidate index last step
    finished: list[Finished] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # the current step's candidates
    decoding: int = 0  # of them still decoding
    prompt_slot: int = -1  # the prompt level slot that holds its prompt (after a shared root prefix)
    root_slot: int = -1  # the root level slot of the prefix it shares with other prompts (-1: none)
    shared: int = 0  # tokens of ``ids`` held by the root slot
    prefilled: int = 0  # tokens of ``ids`` forwarded so far (the shared ones count as forwarded)
    head_scores: dict[int, Any] = field(default_factory=dict)  # source -> scores read during the forward
    step_tokens: int = 0  # tokens its current step's candidates have drawn (they all start together)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.ids)
