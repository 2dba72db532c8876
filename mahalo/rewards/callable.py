"""Programmatic rewards: any Python function ``(prompt, response) -> float``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mahalo.chat import Messages
from mahalo.rewards.protocol import Candidates, RewardCounters


@dataclass
class _CallableState:
    prompt: str
    counters: RewardCounters = field(default_factory=RewardCounters)


class CallableReward:
    """A programmatic reward ``fn(prompt: str, response: str) -> float`` (no tokens forwarded)."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn = fn

    def start(self, messages: Messages, policy_tokenizer: Any) -> _CallableState:
        users = [m["content"] for m in messages if m["role"] == "user"]
        return _CallableState(users[-1] if users else messages[-1]["content"])

    def score(self, state: _CallableState, candidates: Candidates) -> torch.Tensor:
        return torch.tensor([float(self.fn(state.prompt, t)) for t in candidates.texts], dtype=torch.float64)

    def keep(self, state: _CallableState, rows: torch.Tensor) -> None:
        return None


def concise(prompt: str, response: str) -> float:
    """A programmatic length reward: minus the response's words / 50 (0 for an empty answer)."""
    return -len(response.split()) / 50.0


# Programmatic objectives the CLI can name without a model: name -> fn(prompt, response).
PROGRAMMATIC = {"concise": concise}
