"""Policies: the model that proposes tokens, behind the :class:`Policy` protocol."""

from mahalo.policy.hf import HFPolicy, as_policy, stop_token_ids
from mahalo.policy.protocol import Policy

__all__ = ["Policy", "HFPolicy", "as_policy", "stop_token_ids"]
