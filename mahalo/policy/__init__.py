"""Policies: the model that proposes tokens, behind the :class:`Policy` protocol."""

from mahalo.policy.hf import HFPolicy, as_policy, stop_token_ids
from mahalo.policy.protocol import Policy, PolicyState

__all__ = ["Policy", "PolicyState", "HFPolicy", "as_policy", "stop_token_ids"]
