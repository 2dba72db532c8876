"""Reward models behind one protocol, and how their scores combine.

:mod:`~mahalo.rewards.protocol` says what the controller needs; :mod:`~mahalo.rewards.seqcls`
adapts sequence classifiers, :mod:`~mahalo.rewards.callable` Python functions, and
:mod:`~mahalo.rewards.combine` turns per-objective scores into one number per candidate.
"""

from __future__ import annotations

from mahalo.rewards.callable import PROGRAMMATIC, CallableReward, concise
from mahalo.rewards.combine import combine, normalize
from mahalo.rewards.protocol import Candidates, RewardModel, RowCost
from mahalo.rewards.registry import REWARD_ADAPTERS, as_reward
from mahalo.rewards.seqcls import SequenceClassifierReward

__all__ = [
    "Candidates", "RowCost", "RewardModel", "SequenceClassifierReward", "CallableReward",
    "PROGRAMMATIC", "concise", "combine", "normalize", "as_reward", "REWARD_ADAPTERS",
]
