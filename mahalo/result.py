"""What a guided decode returns: plain dataclasses, safe to serialise with ``to_dict``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class PromptError(ValueError):
    """A prompt that cannot be decoded as asked, found before any of it is decoded: longer than a
    model's context at the most the search can reach, or malformed. The caller's input is at fault
    (the server answers 400); other ``ValueError`` results arise while decoding (a reward model's
    NaN, a reward model that raised: the server answers 500)."""


@dataclass
class Candidate:
    """One candidate chunk of one step."""

    text: str  # the chunk's text (this step only)
    token_ids: list[int]  # the chunk's policy token ids (end-of-turn excluded)
    scores: dict[str, float]  # objective -> raw score of the whole response with this chunk
    combined: float  # weighted, normalised reward used for selection
    parent: int  # index of the previous step's candidate it extends (-1 in the first step)
    end: str  # "step" (boundary or step cap), "eos" (end of turn), "stop" (a stop string) or "length" (token budget)
    logprobs: list[float] = field(default_factory=list)  # policy log p(token), temperature 1


@dataclass
class Step:
    """One step of the search: every candidate and which were kept."""

    candidates: list[Candidate]
    chosen: int | list[int]  # the kept candidate (B = 1) or kept candidates (beam search)


def path_to(steps: list[Step], step: int, candidate: int) -> list[int]:
    """The candidate of each step ``0..step`` that ``candidate`` of ``step`` extends (its parents)."""
    path = [candidate]
    for k in range(step, 0, -1):
        path.append(steps[k].candidates[path[-1]].parent)
    return path[::-1]


@dataclass
class Stats:
    """Cost of one decode. Token counts are real tokens; ``*_padded`` include padding slots."""

    policy_tokens: int = 0  # tokens forwarded through the policy, prefill included
    policy_tokens_padded: int = 0
    prm_tokens: int = 0  # tokens forwarded through reward models, all objectives (pruning's included)
    prm_tokens_padded: int = 0
    prm_full_rescore_tokens: int = 0  # what rescoring every whole conversation would forward
    response_tokens: int = 0
    steps: int = 0
    policy_s: float = 0.0
    prm_s: float = 0.0
    wall_s: float = 0.0
    prompt_tokens: int = 0  # the chat prompt's tokens (the policy's prefill)
    pruned_rows: int = 0  # candidates ended early by search.prune
    pruned_tokens: int = 0  # tokens those candidates had drawn when pruned
    # tokens a separate reward model forwarded to rank partial candidates for search.prune (on copies
    # of its state, dropped after each pruning); already counted in prm_tokens (0 with a probe)
    prune_prm_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Response tokens per wall-clock second."""
        return self.response_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Answer:
    """One finished response of the search's pool (``GuidedResult.pool``)."""

    text: str
    token_ids: list[int]  # end-of-turn excluded
    stop_reason: str  # "eos", "stop" or "length"
    scores: dict[str, float]  # objective -> raw score
    score: float  # the final rule's score over the pool (normalised over it, length penalty applied)
    logprobs: list[float] = field(default_factory=list)  # policy log p(token) of each token, temperature 1


@dataclass
class GuidedResult:
    """The answer and how it was found."""

    text: str
    token_ids: list[int]
    stop_reason: str  # "eos", "stop" (a stop string, cut from the text) or "length"
    steps: list[Step]
    stats: Stats
    scores: dict[str, float] = field(default_factory=dict)  # raw scores of the final response
    # the answer's candidate in each step, from the first step to the one that ended it; their
    # chunks spell the answer (a beam search keeps several per step, so ``chosen`` alone does not
    # say which one led to it)
    answer_path: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # policy log p(token) of ``token_ids``, temperature 1
    # The distinct finished responses (by text), best first by the search's final rule; the first
    # is the answer. What ``n > 1`` returns: best_of_n holds up to N, step_beam and dvts one per beam.
    pool: list[Answer] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)
