"""Policies: the model that proposes tokens, behind the :class:`Policy` protocol."""

from mahalo.policy.hf import HFPolicy, as_policy, end_of_turn_ids
from mahalo.policy.protocol import Policy, PolicyState

__all__ = ["Policy", "PolicyState", "HFPolicy", "as_policy", "end_of_turn_ids"]
