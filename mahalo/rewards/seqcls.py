"""Sequence-classification reward models: Bradley-Terry logits, 2-label probabilities, and
multi-output models (K named objectives from one forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mahalo.chat import SCORE_AT, Messages, ScoringFormat, scoring_format, scoring_ids
from mahalo.rewards.backbone import BackboneReward, HeadReader
from mahalo.rewards.protocol import Candidates


@dataclass(frozen=True)
class ChatLayout:
    """The chat conversation ``messages + [assistant response]`` (optionally followed by a user
    ``follow_up`` and the generation prompt), read at its last token. See :mod:`mahalo.chat`."""

    score_at: str = "last_token"
    follow_up: str | None = None

    def format(self, tokenizer: Any, messages: Messages) -> ScoringFormat:
        return scoring_format(tokenizer, messages, self.score_at, self.follow_up)

    def ids(self, tokenizer: Any, formats: list[ScoringFormat], candidates: Candidates) -> list[list[int]]:
        return scoring_ids(tokenizer, formats, candidates.texts)

    def positions(self, fmt: ScoringFormat, ids: list[int]) -> list[int]:
        return [len(ids) - 1]

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        return values[-1]


def head_of(model: Any) -> Any:
    """The classification head (``score`` in Llama/Qwen/Mistral, ``classifier`` elsewhere)."""
    head = getattr(model, "score", None)
    return head if head is not None else getattr(model, "classifier", None)


class SequenceClassifierReward(BackboneReward):
    """A sequence-classification reward model, scored as a plain forward would score it.

    ``num_labels == 1``: the logit (Bradley-Terry). ``num_labels == 2``: P(class 1). With
    ``outputs=True``: every output, raw (R, K) -- give each its objective with
    :class:`RewardOutput`.

    What is scored: the conversation as ``apply_chat_template(messages + [assistant response],
    tokenize=True)`` tokenises it, read at its last token (``score_at="last_token"``, the default)
    or with the template's trailing whitespace removed, at the end-of-turn token
    (``score_at="end_of_turn"``); see :mod:`mahalo.chat`. The response is the candidate's *text*,
    re-tokenised by this model's tokenizer, so the reward model reads exactly what its trainer saw
    even where the policy sampled a non-canonical split of the same text or uses another
    vocabulary. Cost: see :mod:`mahalo.rewards.backbone`.
    """

    def __init__(self, model: Any, tokenizer: Any, score_at: str = "last_token", outputs: bool = False) -> None:
        num_labels = int(model.config.num_labels)
        if not outputs and num_labels not in (1, 2):
            raise ValueError(
                f"a reward classifier needs num_labels 1 or 2, got {num_labels}: name its outputs "
                "(a multi-output model) to use them as objectives"
            )
        if score_at not in SCORE_AT:
            raise ValueError(f"unknown score_at {score_at!r}: choose one of {list(SCORE_AT)}")
        self.num_labels = num_labels
        self.score_at = score_at
        self.head = head_of(model)
        mode = "outputs" if outputs else ("logit" if num_labels == 1 else "prob")
        super().__init__(model.base_model, tokenizer, ChatLayout(score_at), HeadReader(self.head, mode),
                         getattr(model.config, "max_position_embeddings", None))
        self.model = model.eval()

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """A model with a base model, a classification head and 1 or 2 labels."""
        config = getattr(model, "config", None)
        return (
            head_of(model) is not None
            and hasattr(model, "base_model")
            and getattr(config, "num_labels", None) in (1, 2)
            and "TokenClassification" not in type(model).__name__
        )


class RewardOutput:
    """Output ``column`` of a multi-output reward model as one objective.

    On its own it is a full :class:`~mahalo.rewards.protocol.RewardModel`. The controller groups
    the outputs of one ``source`` so that the model forwards once per step for all of them.
    """

    def __init__(self, source: Any, column: int) -> None:
        self.source, self.column = source, column

    def start(self) -> Any:
        return self.source.start()

    def add(self, state: Any, prompts: list[Messages]) -> None:
        self.source.add(state, prompts)

    def score(self, state: Any, candidates: Candidates) -> torch.Tensor:
        return self.source.score(state, candidates)[:, self.column]

    def keep(self, state: Any, rows: torch.Tensor) -> None:
        self.source.keep(state, rows)

    def __getattr__(self, name: str) -> Any:  # the source's optional methods (merge, split, context_need ...)
        if name in ("merge", "split", "context_need", "shares_policy"):
            return getattr(self.source, name)
        raise AttributeError(name)
