"""Programmatic rewards: any Python function ``(prompt, response) -> float``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mahalo.chat import Messages
from mahalo.rewards.protocol import Candidates, RowCost, RowFaults


@dataclass
class _CallableState:
    prompts: list[str] = field(default_factory=list)  # per row: the last user message
    cost: RowCost = field(default_factory=RowCost)


class CallableReward:
    """A programmatic reward ``fn(prompt: str, response: str) -> float`` (no tokens forwarded)."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn = fn

    def start(self) -> _CallableState:
        return _CallableState()

    def add(self, state: _CallableState, prompts: list[Messages]) -> None:
        for messages in prompts:
            users = [m["content"] for m in messages if m["role"] == "user"]
            state.prompts.append(users[-1] if users else messages[-1]["content"])
        state.cost = RowCost.free(len(prompts))

    def score(self, state: _CallableState, candidates: Candidates) -> torch.Tensor:
        """The function's value for every candidate. A call that raises (or returns something that
        is not a number) fails its candidate's prompt only: :class:`RowFaults`, state unchanged."""
        prompts = [state.prompts[p] for p in candidates.parents.tolist()]
        values, faults = [], {}
        for i, (p, t) in enumerate(zip(prompts, candidates.texts)):
            try:
                values.append(float(self.fn(p, t)))
            except Exception as err:  # noqa: BLE001 - a user's function: its fault is its prompt's
                faults[i] = f"reward function {getattr(self.fn, '__name__', 'fn')} raised {type(err).__name__}: {err}"
                values.append(float("nan"))
        if faults:
            raise RowFaults(faults)
        state.prompts = prompts
        state.cost = RowCost.free(len(prompts))
        return torch.tensor(values, dtype=torch.float64)

    def keep(self, state: _CallableState, rows: torch.Tensor) -> None:
        state.prompts = [state.prompts[r] for r in rows.tolist()]

    def merge(self, states: list[_CallableState]) -> _CallableState:
        return _CallableState([p for st in states for p in st.prompts])

    def split(self, state: _CallableState, sizes: list[int]) -> list[_CallableState]:
        out, start = [], 0
        for n in sizes:
            out.append(_CallableState(state.prompts[start:start + n]))
            start += n
        return out


def concise(prompt: str, response: str) -> float:
    """A programmatic length reward: minus the response's words / 50 (0 for an empty answer)."""
    return -len(response.split()) / 50.0


# Programmatic objectives the CLI can name without a model: name -> fn(prompt, response).
PROGRAMMATIC = {"concise": concise}
