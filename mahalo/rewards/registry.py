"""Turn what a user passes as a reward (an adapter, a model pair, a function) into a
:class:`~mahalo.rewards.protocol.RewardModel`. Adapters are tried in registry order."""

from __future__ import annotations

from typing import Any

from mahalo.rewards.callable import CallableReward
from mahalo.rewards.protocol import RewardModel
from mahalo.rewards.seqcls import SequenceClassifierReward

# Adapters for (model, tokenizer) pairs, tried in order; each has ``accepts(model)``.
REWARD_ADAPTERS: list[type] = [SequenceClassifierReward]


def as_reward(obj: Any, name: str) -> RewardModel:
    """Accept a :class:`RewardModel`, a ``(model, tokenizer)`` pair or a callable.

    Raises:
        ValueError: nothing fits (the message names the objective).
    """
    if isinstance(obj, RewardModel):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        for adapter in REWARD_ADAPTERS:
            if adapter.accepts(obj[0]):
                return adapter(*obj)
        raise ValueError(
            f"objective {name!r}: no reward adapter accepts {type(obj[0]).__name__} "
            "(expected a sequence-classification model with num_labels 1 or 2; build other families with "
            "mahalo.rewards: token_classifier_prm, causal_lm_prm, value_head_reward, judge_reward, RewardOutput)"
        )
    if callable(obj):
        return CallableReward(obj)
    raise ValueError(
        f"objective {name!r}: expected a reward model, a (model, tokenizer) pair or a "
        f"callable (prompt, response) -> float, got {type(obj).__name__}"
    )
