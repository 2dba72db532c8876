"""Sequence-classification reward models (Bradley-Terry logits, 2-label probabilities)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import ConversationParts, Messages, conversation_parts
from mahalo.kv import KVRows, empty_rows
from mahalo.rewards.protocol import Candidates, RewardCounters


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _SeqClsState:
    kv: KVRows  # rows = beams (after keep) or candidates (after score)
    parts: ConversationParts
    shares_vocab: bool
    accepted: list[list[int]]  # reward-side response ids per row
    counters: RewardCounters = field(default_factory=RewardCounters)
    pending_ids: list[list[int]] = field(default_factory=list)  # per scored row
    pending_start: torch.Tensor | None = None  # (R,) first column of each row's suffix


class SequenceClassifierReward:
    """A sequence-classification reward model scored at the conversation's last token.

    ``num_labels == 1``: the logit (Bradley-Terry). ``num_labels == 2``: P(class 1).
    The cache holds the chat prefix and the accepted response; each step forwards only the
    candidates' new tokens plus the end-of-turn suffix, in one batch. The hidden state is
    gathered at each row's true last token (not by pad-token search, which fails when the pad
    token is the end-of-turn token). ``keep`` turns the suffix and padding of the survivors into
    holes, so the chosen chunk is never forwarded twice.

    Token sharing: when the policy's vocabulary equals the reward model's, the policy's ids are
    used as they are. Otherwise the response text is re-tokenised with the reward tokenizer;
    the cache is reused up to the longest common prefix with the previously accepted tokens
    (a merge across the old chunk boundary only costs re-forwarding the changed tail).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        num_labels = int(model.config.num_labels)
        if num_labels not in (1, 2):
            raise ValueError(f"a reward classifier needs num_labels 1 or 2, got {num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_labels = num_labels
        self.head = self.head_of(model)
        self.base = model.base_model
        self.device = next(model.parameters()).device
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._vocab_cache: dict[int, bool] = {}

    @staticmethod
    def head_of(model: Any) -> Any:
        """The classification head (``score`` in Llama/Qwen/Mistral, ``classifier`` elsewhere)."""
        head = getattr(model, "score", None)
        return head if head is not None else getattr(model, "classifier", None)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """A model with a base model, a classification head and 1 or 2 labels."""
        config = getattr(model, "config", None)
        return (
            cls.head_of(model) is not None
            and hasattr(model, "base_model")
            and getattr(config, "num_labels", None) in (1, 2)
        )

    def _shares_vocab(self, policy_tokenizer: Any) -> bool:
        key = id(policy_tokenizer)
        if key not in self._vocab_cache:
            self._vocab_cache[key] = policy_tokenizer is self.tokenizer or (
                policy_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            )
        return self._vocab_cache[key]

    @torch.inference_mode()
    def start(self, messages: Messages, policy_tokenizer: Any) -> _SeqClsState:
        parts = conversation_parts(self.tokenizer, messages)
        state = _SeqClsState(empty_rows(self.device), parts, self._shares_vocab(policy_tokenizer), [[]])
        prefix = torch.tensor([parts.prefix_ids], device=self.device)  # (1, P)
        self._forward(state.kv, prefix, torch.ones_like(prefix))
        state.counters.tokens += prefix.numel()
        state.counters.padded_tokens += prefix.numel()
        return state

    def _response_ids(self, state: _SeqClsState, candidates: Candidates) -> list[list[int]]:
        if state.shares_vocab:
            return [list(ids) for ids in candidates.token_ids]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in candidates.texts]

    @torch.inference_mode()
    def score(self, state: _SeqClsState, candidates: Candidates) -> torch.Tensor:
        # 1. reward-side ids; reuse the cached accepted tokens up to the common prefix
        ids = self._response_ids(state, candidates)
        parents = candidates.parents.tolist()
        reuse = [_common_prefix(state.accepted[p], r) for p, r in zip(parents, ids)]
        new = [r[k:] + state.parts.suffix_ids for r, k in zip(ids, reuse)]
        # 2. fan the beams' rows out to their candidates; stale accepted tails become holes
        length = state.kv.length
        acc_len = torch.tensor([len(state.accepted[p]) for p in parents], device=self.device)
        state.kv.select(candidates.parents)
        state.kv.drop_columns_from(length - acc_len + torch.tensor(reuse, device=self.device))
        # 3. one forward of every candidate's new tokens (right-padded)
        width = max(len(n) for n in new)
        block = torch.full((len(new), width), self._pad_id, device=self.device)  # (R, T)
        block_mask = torch.zeros_like(block)
        for i, n in enumerate(new):
            block[i, : len(n)] = torch.tensor(n, device=self.device)
            block_mask[i, : len(n)] = 1
        self._check_context(length + width)
        hidden = self._forward(state.kv, block, block_mask)  # (R, T, H)
        # 4. the score head at each row's true last token
        last = torch.tensor([len(n) - 1 for n in new], device=self.device)
        scores = self._head(hidden[torch.arange(len(new), device=self.device), last])  # (R,)
        # 5. remember where each suffix starts, for keep()
        suffix_len = len(state.parts.suffix_ids)
        state.pending_ids = ids
        state.pending_start = length + last + 1 - suffix_len
        self._count(state, ids, new, width)
        return scores

    def _count(self, state: _SeqClsState, ids: list[list[int]], new: list[list[int]], width: int) -> None:
        c, parts = state.counters, state.parts
        c.tokens += sum(len(n) for n in new)
        c.padded_tokens += len(new) * width
        c.full_rescore_tokens += sum(
            len(parts.prefix_ids) + len(r) + len(parts.suffix_ids) for r in ids
        )

    @torch.inference_mode()
    def keep(self, state: _SeqClsState, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        state.kv.select(rows)
        state.kv.drop_columns_from(state.pending_start[rows])
        state.kv.compact()
        state.accepted = [state.pending_ids[r] for r in rows.tolist()]

    def _forward(self, kv: KVRows, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        mask, positions = kv.extend(new_mask)
        out = self.base(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=kv.cache, use_cache=True
        )
        return out.last_hidden_state  # (R, T, H)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden.to(self.head.weight.dtype)).double()  # (R, num_labels)
        if self.num_labels == 1:
            return logits[:, 0]
        return torch.softmax(logits, dim=-1)[:, 1]

    def _check_context(self, length: int) -> None:
        if self.max_context is not None and length > self.max_context:
            raise ValueError(
                f"the reward model's input ({length} tokens) exceeds its context "
                f"({self.max_context}): lower max_new_tokens or shorten the prompt"
            )
