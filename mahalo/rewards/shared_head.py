"""A reward head on the policy's own backbone: no second model.

When a reward model is a head on the same backbone and weights as the policy (the embedded pair:
SmolLM2-135M-Instruct and SmolLM2 plus a trained linear truth head), its hidden states are the
policy's. So when a step ends, the scoring suffix of each candidate (the end-of-turn tokens the
reward model reads after the response) is forwarded through the policy, in the same forward as
the other rows' next tokens, written after the candidate's own tokens, and the head reads the
last one. Those columns are never counted as the row's: the policy goes on exactly as if they had
never been there. The reward model's cache, its prefill and its copy of the weights are gone, and
scoring costs no forward of its own.

Exactness: the reward model reads ``apply_chat_template(messages + [assistant text])`` tokenised
(:mod:`mahalo.chat`). A policy row holds the generation prompt and the response ids it sampled;
where those are a prefix of the reward model's ids (the usual case: the template's generation
prompt and a canonical tokenisation) only the rest is forwarded. A row whose ids differ (a
non-canonical split of the text) is copied, cut back to the common prefix and forwarded from
there. Either way each score is what the separate reward model gives, to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import SCORE_AT, Messages, ScoringFormat, scoring_format, scoring_ids
from mahalo.rewards.backbone import HeadReader, common_prefix
from mahalo.rewards.protocol import Candidates, RowCost


@dataclass
class _SharedState:
    formats: list[ScoringFormat] = field(default_factory=list)  # per beam row
    prompts: list[list[int]] = field(default_factory=list)  # per beam row: the policy's prompt ids
    cost: RowCost = field(default_factory=RowCost)


class SharedHeadReward:
    """A reward head (``head``: (num_labels, H)) read from the policy's hidden states.

    Args:
        policy: an :class:`~mahalo.policy.hf.HFPolicy` (it has ``hidden``); its tokenizer is the
            reward model's.
        head: the score head module (``Linear(H, num_labels)``).
        num_labels: 1 (the logit) or 2 (P(class 1)).
        score_at: where the conversation is read (:mod:`mahalo.chat`).
    """

    def __init__(self, policy: Any, head: Any, num_labels: int = 1, score_at: str = "last_token") -> None:
        if not hasattr(policy, "run"):
            raise ValueError(f"{type(policy).__name__} cannot lend its hidden states to a reward head")
        if num_labels not in (1, 2):
            raise ValueError(f"a reward head needs num_labels 1 or 2, got {num_labels}")
        if score_at not in SCORE_AT:
            raise ValueError(f"unknown score_at {score_at!r}: choose one of {list(SCORE_AT)}")
        self.policy, self.tokenizer, self.score_at = policy, policy.tokenizer, score_at
        self.reader = HeadReader(head, "logit" if num_labels == 1 else "prob")
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    shares_policy = True  # score forwards through the policy's rows (see mahalo.rewards.protocol)

    def start(self) -> _SharedState:
        return _SharedState()

    def merge(self, states: list[_SharedState]) -> _SharedState:
        return _SharedState([f for st in states for f in st.formats], [p for st in states for p in st.prompts])

    def split(self, state: _SharedState, sizes: list[int]) -> list[_SharedState]:
        out, start = [], 0
        for n in sizes:
            out.append(_SharedState(state.formats[start:start + n], state.prompts[start:start + n]))
            start += n
        return out

    def context_need(self, messages: Messages, response_tokens: int, steps: int) -> tuple[int, int | None]:
        """The policy's prompt, the response and the scoring suffix, against the policy's context."""
        fmt = scoring_format(self.tokenizer, messages, self.score_at)
        suffix = len(scoring_ids(self.tokenizer, [fmt], [""])[0]) - len(fmt.prefix_ids(self.tokenizer))
        prompt = len(self.policy.prompt_ids(messages))
        return prompt + response_tokens + max(suffix, 1), getattr(self.policy, "max_context", None)

    def add(self, state: _SharedState, prompts: list[Messages]) -> None:
        """Nothing to forward: the policy's prefill holds the prompt."""
        state.formats += [scoring_format(self.tokenizer, m, self.score_at) for m in prompts]
        state.prompts += [self.policy.prompt_ids(m) for m in prompts]
        state.cost = RowCost.free(len(prompts))

    def targets(self, state: _SharedState, candidates: Candidates) -> list[tuple[list[int], int]]:
        """For each candidate: the reward model's ids of its conversation, and how many of them
        its policy row already holds (at most all but the last: the head reads a forwarded token).
        The engine forwards the rest with the policy's next tokens (a row whose ids differ from
        its held ones from a scratch copy cut back to their common prefix) and hands the hidden
        states at each candidate's last id to :meth:`read`. The state becomes the candidates'."""
        parents = candidates.parents.tolist()
        formats = [state.formats[p] for p in parents]
        ids = scoring_ids(self.tokenizer, formats, candidates.texts)  # (R, *)
        held = [state.prompts[p] + t[:n] for p, t, n in zip(parents, candidates.token_ids, candidates.held)]
        reuse = [min(common_prefix(h, r), len(r) - 1) for h, r in zip(held, ids)]
        state.formats = formats
        state.prompts = [state.prompts[p] for p in parents]
        forwarded = [len(r) - k for r, k in zip(ids, reuse)]
        state.cost = RowCost(forwarded, [max(forwarded, default=0)] * len(ids), [len(r) for r in ids])
        return list(zip(ids, reuse))

    @torch.inference_mode()
    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores (R,) float64 of the hidden states (R, H) at each candidate's last scoring id."""
        return self.reader(hidden)[:, 0].cpu()

    def score(self, state: _SharedState, candidates: Candidates) -> torch.Tensor:
        """Not called: the engine forwards the scoring suffixes with its own tokens (:meth:`targets`,
        :meth:`read`)."""
        raise ValueError("a reward head on the policy's backbone scores inside the engine (it needs the policy's rows)")

    def keep(self, state: _SharedState, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        state.formats = [state.formats[r] for r in kept]
        state.prompts = [state.prompts[r] for r in kept]
