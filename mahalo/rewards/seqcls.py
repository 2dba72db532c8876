"""Sequence-classification reward models (Bradley-Terry logits, 2-label probabilities)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import SCORE_AT, Messages, ScoringFormat, scoring_format, scoring_ids
from mahalo.kv import KVRows, empty_rows, right_padded
from mahalo.rewards.protocol import Candidates, RowCost


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _SeqClsState:
    kv: KVRows  # rows = beams of every prompt (after keep) or candidates (after score)
    formats: list[ScoringFormat] = field(default_factory=list)  # per row: its prompt's scoring format
    ids: list[list[int]] = field(default_factory=list)  # per row: the ids its valid columns hold, in order
    cost: RowCost = field(default_factory=RowCost)  # of the last add / score, per row
    pending: list[list[int]] = field(default_factory=list)  # per scored row: its scoring ids


class SequenceClassifierReward:
    """A sequence-classification reward model, scored as a plain forward would score it.

    ``num_labels == 1``: the logit (Bradley-Terry). ``num_labels == 2``: P(class 1).

    What is scored: the conversation as ``apply_chat_template(messages + [assistant response],
    tokenize=True)`` tokenises it, read at its last token (``score_at="last_token"``, the default)
    or with the template's trailing whitespace removed, at the end-of-turn token
    (``score_at="end_of_turn"``); see :mod:`mahalo.chat`. The response is the candidate's *text*,
    re-tokenised by this model's tokenizer, so the reward model reads exactly what its trainer saw
    even where the policy sampled a non-canonical split of the same text or uses another
    vocabulary.

    Cost: each cache row holds the token ids of a conversation already forwarded; rows of all the
    prompts in flight share one cache. A candidate forwards only its ids after the longest common
    prefix with its beam's row (at least its last token), all candidates of all prompts in one
    batch. The hidden state is gathered at each row's true last token
    (not by pad-token search, which fails when the pad token is the end-of-turn token).
    """

    def __init__(self, model: Any, tokenizer: Any, score_at: str = "last_token") -> None:
        num_labels = int(model.config.num_labels)
        if num_labels not in (1, 2):
            raise ValueError(f"a reward classifier needs num_labels 1 or 2, got {num_labels}")
        if score_at not in SCORE_AT:
            raise ValueError(f"unknown score_at {score_at!r}: choose one of {list(SCORE_AT)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_labels = num_labels
        self.score_at = score_at
        self.head = self.head_of(model)
        self.base = model.base_model
        self.device = next(model.parameters()).device
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

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

    def start(self) -> _SeqClsState:
        return _SeqClsState(empty_rows(self.device, 0))

    @torch.inference_mode()
    def add(self, state: _SeqClsState, prompts: list[Messages]) -> None:
        """Prefill each prompt's conversation prefix (right-padded, one forward) as new rows."""
        formats = [scoring_format(self.tokenizer, messages, self.score_at) for messages in prompts]
        prefixes = [f.prefix_ids(self.tokenizer) for f in formats]
        self._check_context(max(len(p) for p in prefixes))
        rows = empty_rows(self.device, len(prompts))
        block, block_mask = right_padded(prefixes, self._pad_id, self.device)  # (P, T)
        self._forward(rows, block, block_mask)
        state.kv.cat(rows)
        state.formats += formats
        state.ids += prefixes
        width = block.shape[1]
        state.cost = RowCost([len(p) for p in prefixes], [width] * len(prefixes), [0] * len(prefixes))

    @torch.inference_mode()
    def score(self, state: _SeqClsState, candidates: Candidates) -> torch.Tensor:
        # 1. scoring ids of every candidate under its prompt's format; reuse its beam's cached ids
        #    up to the common prefix, but always forward the last token (its hidden state is the score)
        parents = candidates.parents.tolist()
        formats = [state.formats[p] for p in parents]
        ids = scoring_ids(self.tokenizer, formats, candidates.texts)  # (R, *)
        reuse = [min(_common_prefix(state.ids[p], r), len(r) - 1) for p, r in zip(parents, ids)]
        new = [r[k:] for r, k in zip(ids, reuse)]
        self._check_context(max(len(r) for r in ids))
        # 2. fan the beams' rows out to their candidates; cached ids past the reuse become holes
        state.kv.select(candidates.parents)
        state.kv.keep_valid(torch.tensor(reuse, device=self.device))
        state.formats = formats
        # 3. one forward of every candidate's new tokens (right-padded)
        block, block_mask = right_padded(new, self._pad_id, self.device)  # (R, T)
        hidden = self._forward(state.kv, block, block_mask)  # (R, T, H)
        # 4. the score head at each row's true last token
        last = torch.tensor([len(n) - 1 for n in new], device=hidden.device)  # a spread model ends elsewhere
        scores = self._head(hidden[torch.arange(len(new), device=hidden.device), last])  # (R,)
        state.pending = ids
        state.cost = RowCost([len(n) for n in new], [block.shape[1]] * len(new), [len(r) for r in ids])
        return scores

    @torch.inference_mode()
    def keep(self, state: _SeqClsState, rows: torch.Tensor) -> None:
        """Keep the scored rows ``rows``: their whole conversations (end of turn included) stay
        cached; the next ``score`` reuses them up to where the candidates differ."""
        rows = rows.to(self.device)
        state.kv.select(rows)
        state.kv.tidy()
        kept = rows.tolist()
        state.ids = [state.pending[r] for r in kept]
        state.formats = [state.formats[r] for r in kept]

    def _forward(self, kv: KVRows, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        mask, positions = kv.extend(new_mask)
        out = self.base(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=kv.cache, use_cache=True
        )
        return out.last_hidden_state  # (R, T, H)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden.to(self.head.weight.device, self.head.weight.dtype)).double()  # (R, num_labels)
        if self.num_labels == 1:
            return logits[:, 0]
        return torch.softmax(logits, dim=-1)[:, 1]

    def _check_context(self, length: int) -> None:
        if self.max_context is not None and length > self.max_context:
            raise ValueError(
                f"the reward model's input ({length} tokens) exceeds its context "
                f"({self.max_context}): lower max_new_tokens or shorten the prompt"
            )
