"""The reward-model protocol: what the controller needs from a reward model.

One state holds the rows of every prompt in flight, so a step scores all candidates of all
prompts in one batch. The controller calls, per objective: ``start`` once (an empty state),
``add`` when prompts join the batch (one row each, appended), then per step ``score`` (every
candidate, each extending a row of the state) and ``keep`` (the candidates that survive, in the
new row order; rows of finished prompts are simply not kept). An adapter owns whatever it caches
between calls in its state, so other reward families fit without touching the controller:

* sequence classifiers (Bradley-Terry reward models such as MAHALO's truthfulness model) and
  multi-output classifiers: :mod:`mahalo.rewards.seqcls`;
* step-token PRMs (Qwen2.5-Math-PRM, Math-Shepherd): :mod:`mahalo.rewards.step_prm`;
* value heads on a backbone: :mod:`mahalo.rewards.value_head`;
* generative yes/no judges: :mod:`mahalo.rewards.judge`;
* a reward head on the policy's own backbone: :mod:`mahalo.rewards.shared_head`;
* programmatic rewards: :class:`~mahalo.rewards.callable.CallableReward`.

The model-backed ones share :mod:`mahalo.rewards.backbone`.

Faults stay with their prompt. The engine keeps one state per prompt; an adapter that can
``merge`` states and ``split`` them again lets several prompts' candidates share one forward
(``merge`` copies, so the prompts' own states are untouched until the step is kept). A ``score``
that cannot score some candidates raises :class:`RowFaults` *before changing its state*, naming
those rows, and the engine fails only their prompts; any other exception fails the prompts it was
scoring (each is then retried alone, so only the culprit fails). ``context_need`` lets the engine
refuse a prompt that would overflow the model's context before decoding it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from mahalo.chat import Messages


@dataclass
class Candidates:
    """One step's candidates of every prompt in flight, one row each."""

    parents: torch.Tensor  # (R,) the state row (beam) each candidate extends
    token_ids: list[list[int]]  # policy ids of the whole response so far (no end-of-turn)
    texts: list[str]  # text of the whole response so far
    steps: list[list[str]] | None = None  # the response's steps (the engine's), concatenating to its text
    held: list[int] | None = None  # response tokens each policy row's cache holds (the rest were not fed)


@dataclass
class RowCost:
    """What one ``add`` or ``score`` call cost, per row: tokens forwarded, padded slots, and what
    forwarding each whole conversation from scratch would have cost."""

    tokens: list[int] = field(default_factory=list)
    padded: list[int] = field(default_factory=list)
    full: list[int] = field(default_factory=list)

    @classmethod
    def free(cls, rows: int) -> RowCost:
        """No tokens forwarded (programmatic rewards)."""
        return cls([0] * rows, [0] * rows, [0] * rows)


class RowFaults(ValueError):
    """Candidates a reward model cannot score, raised by ``score`` before it changes its state:
    ``rows`` maps each candidate's index to the reason. ``too_long``: they exceed the model's
    context (the prompt is at fault, as if it had been refused before decoding)."""

    def __init__(self, rows: dict[int, str], too_long: bool = False) -> None:
        super().__init__("; ".join(f"candidate {r}: {why}" for r, why in sorted(rows.items())))
        self.rows, self.too_long = dict(rows), too_long


@runtime_checkable
class RewardModel(Protocol):
    """What the controller needs from a reward model. A state may set ``cost``
    (:class:`RowCost`) after each ``add`` and ``score``; the controller reports it per prompt."""

    def start(self) -> Any:
        """An empty state (no rows)."""
        ...

    def add(self, state: Any, prompts: list[Messages]) -> None:
        """Prompts join: one row each, appended to the state's rows in order."""
        ...

    def score(self, state: Any, candidates: Candidates) -> torch.Tensor:
        """Raw scores (R,) float64 of the whole response of every candidate."""
        ...

    def keep(self, state: Any, rows: torch.Tensor) -> None:
        """Continue from candidates ``rows`` (B',) of the last ``score`` call, in that order."""
        ...


# Optional methods (duck-typed; the engine checks with ``hasattr``):
#
#   merge(states: list) -> state
#       One state holding the rows of ``states`` in order, for one batched ``score`` and ``keep``;
#       ``states`` themselves are left unchanged (it copies what it must).
#   split(state, sizes: list[int]) -> list
#       The state's rows cut into consecutive groups of ``sizes`` rows, one new state each.
#   context_need(messages, response_tokens: int, steps: int) -> tuple[int, int | None]
#       (the most tokens the model reads for a response of ``response_tokens`` policy tokens in
#       at most ``steps`` steps, the model's context or None): lets the engine refuse the prompt
#       before decoding it.
#   shares_policy: bool
#       True when ``score`` forwards through the policy's own rows (a head on its backbone): an
#       exception other than RowFaults may have left them changed, so it stops the engine.
