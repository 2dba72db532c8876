"""The reward-model protocol: what the controller needs from a reward model.

The controller calls, per objective: ``start`` once per prompt, then per step ``score`` (all
candidates of all beams at once) and ``keep`` (the candidates that survive). An adapter owns
whatever it caches between calls in the state object it returns, so other reward families fit
without touching the controller:

* sequence classifiers (Bradley-Terry reward models such as MAHALO's truthfulness model, or
  value heads): :class:`~mahalo.rewards.seqcls.SequenceClassifierReward`;
* step-token PRMs (Qwen2.5-Math-PRM style): ``score`` forwards the new step plus the separator
  token and reads the positive-class probability there; the state keeps earlier steps' scores
  to aggregate (last / min / prod / mean);
* generative yes/no judges: ``score`` forwards the new tokens plus the judge question and reads
  the yes/no logits;
* programmatic rewards: :class:`~mahalo.rewards.callable.CallableReward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mahalo.chat import Messages


@dataclass
class Candidates:
    """One step's candidates, one row each (all beams together)."""

    messages: Messages
    parents: torch.Tensor  # (R,) index of the beam each candidate extends
    token_ids: list[list[int]]  # policy ids of the whole response so far (no end-of-turn)
    texts: list[str]  # text of the whole response so far


@dataclass
class RewardCounters:
    """Tokens a reward model forwarded (real, padded) and what full rescoring would cost."""

    tokens: int = 0
    padded_tokens: int = 0
    full_rescore_tokens: int = 0


@runtime_checkable
class RewardModel(Protocol):
    """What the controller needs from a reward model."""

    def start(self, messages: Messages, policy_tokenizer: Any) -> Any:
        """Begin a prompt.

        Args:
            messages: the chat prompt.
            policy_tokenizer: the policy's tokenizer (to decide whether ids can be shared).

        Returns:
            an opaque state, with a ``counters`` attribute (:class:`RewardCounters`).
        """
        ...

    def score(self, state: Any, candidates: Candidates) -> torch.Tensor:
        """Raw scores (R,) float64 of the whole response of every candidate."""
        ...

    def keep(self, state: Any, rows: torch.Tensor) -> None:
        """Continue from candidates ``rows`` (B',) of the last ``score`` call."""
        ...
