"""Reward models behind one protocol, and how their scores combine.

:mod:`~mahalo.rewards.protocol` says what the controller needs. Model-backed families share the
incremental machinery of :mod:`~mahalo.rewards.backbone`: sequence classifiers and multi-output
models (:mod:`~mahalo.rewards.seqcls`), step-token PRMs (:mod:`~mahalo.rewards.step_prm`), value
heads (:mod:`~mahalo.rewards.value_head`) and generative judges (:mod:`~mahalo.rewards.judge`);
:mod:`~mahalo.rewards.shared_head` reads a head off the policy's own backbone;
:mod:`~mahalo.rewards.callable` adapts Python functions, and :mod:`~mahalo.rewards.combine` turns
per-objective scores into one number per candidate.
"""

from __future__ import annotations

from mahalo.rewards.backbone import BackboneReward, HeadReader, TokenReader
from mahalo.rewards.callable import PROGRAMMATIC, CallableReward, concise
from mahalo.rewards.combine import combine, normalize
from mahalo.rewards.judge import judge_reward
from mahalo.rewards.protocol import Candidates, RewardModel, RowCost, RowFaults
from mahalo.rewards.registry import REWARD_ADAPTERS, as_reward
from mahalo.rewards.seqcls import RewardOutput, SequenceClassifierReward
from mahalo.rewards.shared_head import SharedHeadReward
from mahalo.rewards.step_prm import causal_lm_prm, token_classifier_prm
from mahalo.rewards.value_head import load_value_head, value_head_reward

__all__ = [
    "Candidates", "RowCost", "RowFaults", "RewardModel", "BackboneReward", "HeadReader", "TokenReader",
    "SequenceClassifierReward", "RewardOutput", "SharedHeadReward", "token_classifier_prm", "causal_lm_prm",
    "value_head_reward", "load_value_head", "judge_reward", "CallableReward", "PROGRAMMATIC", "concise",
    "combine", "normalize", "as_reward", "REWARD_ADAPTERS",
]
