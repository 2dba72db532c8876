"""The policy protocol: what the controller needs from the model that proposes tokens.

The controller only talks to :class:`Policy`; :mod:`mahalo.policy.hf` adapts transformers causal
LMs. A policy prefills the prompt once, then forwards one token per row for a batch of rows that
share or fork that prefix, with holes for rows that are idle (see :mod:`mahalo.kv`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mahalo.chat import Messages
from mahalo.kv import KVRows


@dataclass
class PolicyState:
    """The policy's rows: their cache and each row's next-token logits."""

    kv: KVRows
    logits: torch.Tensor  # (R, V) float32: next-token logits of each row

    @property
    def rows(self) -> int:
        return self.kv.rows

    def select(self, index: torch.Tensor) -> None:
        """Keep (or fan out to) rows ``index`` (R',)."""
        self.kv.select(index)
        self.logits = self.logits[index.to(self.logits.device)]

    def take(self, index: torch.Tensor) -> PolicyState:
        """A new state holding copies of rows ``index`` (these rows stay)."""
        return PolicyState(self.kv.take(index), self.logits[index.to(self.logits.device)])

    def place(self, at: torch.Tensor, others: list[tuple[PolicyState, torch.Tensor]]) -> None:
        """Merge rows back in one copy: these rows go to positions ``at`` and each ``(state,
        positions)`` of ``others`` to its positions (see :meth:`KVRows.place`)."""
        total = len(at) + sum(len(p) for _, p in others)
        logits = self.logits.new_empty(total, self.logits.shape[1])
        for state, pos in [(self, at), *others]:
            logits[pos.to(logits.device)] = state.logits.to(logits)
        self.kv.place(at, [(state.kv, pos) for state, pos in others])
        self.logits = logits

    def cat(self, other: PolicyState) -> None:
        """Append ``other``'s rows (another batch of prompts) after these."""
        self.logits = other.logits if self.rows == 0 else torch.cat([self.logits, other.logits.to(self.logits)])
        self.kv.cat(other.kv)


@runtime_checkable
class Policy(Protocol):
    """What the controller needs from a policy."""

    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int | None

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of the chat prompt to continue."""
        ...

    def prefill(self, prompts: list[list[int]]) -> PolicyState:
        """Forward several prompts once, together.

        Returns:
            a state with one row per prompt, in order, whose logits predict each prompt's first
            response token.
        """
        ...

    def forward(self, state: PolicyState, tokens: torch.Tensor, feed: torch.Tensor) -> None:
        """Forward one token per row and update the fed rows' logits in place.

        Args:
            state: R rows.
            tokens: (R,) token ids; the value at an unfed row is ignored.
            feed: (R,) bool; False rows get a hole and keep their previous logits.
        """
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens skipped)."""
        ...
