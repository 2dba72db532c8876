"""The policy protocol: what the engine needs from the model that proposes tokens.

The engine only talks to :class:`Policy`; :mod:`mahalo.policy.hf` adapts transformers causal
LMs. A policy forwards *items* (decode tokens, prompt chunks, a reward head's scoring suffix)
packed into one sequence on a shared-prefix cache (:mod:`mahalo.cascade`): every row reads its
prompt, its beam and its own step from their slots, so rows that share a prefix share its keys
and values.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from mahalo.cascade import Item, Packed, SharedKV
from mahalo.chat import Messages


@runtime_checkable
class Policy(Protocol):
    """What the engine needs from a policy."""

    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int | None
    vocab_size: int
    device: torch.device

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of the chat prompt to continue."""
        ...

    def shared_kv(self) -> SharedKV:
        """An empty cache shaped for this model."""
        ...

    def run(self, kv: SharedKV, items: list[Item], extra: list[int] | None = None) -> tuple[torch.Tensor, Packed]:
        """Forward ``items`` packed into one sequence (their keys and values written into their
        slots); the last hidden states (n_out, H) of the tokens they ask for, in order, and the
        forward's description (``extra`` integers on the device as ``Packed.extra``)."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V) float32 of hidden states from :meth:`run`."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens skipped)."""
        ...
