"""A transformers causal LM as a :class:`~mahalo.policy.protocol.Policy`."""

from __future__ import annotations

from typing import Any

import torch

from mahalo.chat import Messages, generation_prompt_ids, template_end_of_turn_ids
from mahalo.kv import KVRows, empty_rows, right_padded
from mahalo.policy.protocol import Policy, PolicyState

# Causal LMs whose forward is exactly ``lm_head(model(...).last_hidden_state)`` (no logit scale,
# soft-capping or bias). On a CPU the policy applies their head itself as ``W @ h.T``: for the few
# rows of a decode step CPU BLAS runs that much faster than ``F.linear`` (``h @ W.T``), and the
# head is the largest matrix of a small model. benchmarks/step_cost.py measured whole decode
# steps 1.1-1.4x faster at 2-16 rows (SmolLM2-135M, 2-core CPU).
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a response, taken from the model rather than from a list of names.

    The union of ``generation_config.eos_token_id`` (an int or a list: Llama 3.1 lists
    ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``), the tokenizer's EOS, the token the chat
    template writes after an assistant turn (``<|im_end|>``, ``<|eot_id|>``, Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``). The controller adds the user's ``stop_token_ids``.
    """
    ids = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(int(i) for i in ([] if eos is None else [eos] if isinstance(eos, int) else eos))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(template_end_of_turn_ids(tokenizer))
    return frozenset(ids)


class HFPolicy:
    """A transformers causal LM (``model``, ``tokenizer``) as a :class:`Policy`."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self._pad_id = next(iter(sorted(self.eos_ids)), 0)
        self._head = _plain_head_weight(model) if self.device.type == "cpu" else None  # (V, H) or None

    def prompt_ids(self, messages: Messages) -> list[int]:
        return generation_prompt_ids(self.tokenizer, messages)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> PolicyState:
        """Right-padded prefill: every prompt starts at column 0, shorter ones end in holes."""
        input_ids, new_mask = right_padded(prompts, self._pad_id, self.device)  # (P, T)
        kv = empty_rows(self.device, len(prompts))
        last = torch.tensor([len(ids) - 1 for ids in prompts], device=self.device)  # (P,)
        return PolicyState(kv, self._forward(kv, input_ids, new_mask, last))

    @torch.inference_mode()
    def forward(self, state: PolicyState, tokens: torch.Tensor, feed: torch.Tensor) -> None:
        feed = feed.to(self.device)
        tokens = torch.where(feed, tokens.to(self.device), self._pad_id)[:, None]  # (R, 1)
        logits = self._forward(state.kv, tokens, feed.long()[:, None])  # (R, V)
        state.logits = torch.where(feed[:, None], logits, state.logits)

    @torch.inference_mode()
    def hidden(self, kv: KVRows, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Forward ``input_ids`` (R, T) on ``kv`` (appending T columns) and return the backbone's
        last hidden states (R, T, H): what a reward head on this backbone reads."""
        mask, positions = kv.extend(new_mask)
        return self.model.base_model(
            input_ids=input_ids.to(self.device), attention_mask=mask, position_ids=positions, cache=kv.cache,
            use_cache=True,
        ).last_hidden_state

    def _forward(
        self, kv: KVRows, input_ids: torch.Tensor, new_mask: torch.Tensor, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward ``input_ids`` (R, T) on ``kv``; the logits (R, V) at column ``last[r]`` of the
        block (default: its last column)."""
        mask, positions = kv.extend(new_mask)
        inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=kv.cache, use_cache=True)
        rows = torch.arange(input_ids.shape[0], device=self.device)
        if self._head is None:
            if last is None:
                return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (R, V)
            keep, where = torch.unique(last, return_inverse=True)  # the columns some row reads
            return self.model(**inputs, logits_to_keep=keep).logits[rows, where].float()  # (R, V)
        hidden = self.model.model(**inputs).last_hidden_state  # (R, T, H)
        hidden = hidden[:, -1] if last is None else hidden[rows, last]  # (R, H)
        return torch.mm(self._head, hidden.T).T.float()  # (R, V)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _plain_head_weight(model: Any) -> torch.Tensor | None:
    """The output head's weight (V, H) when ``model`` is a plain-head architecture, else None."""
    head = model.get_output_embeddings()
    plain = type(model).__name__ in PLAIN_HEAD_ARCHITECTURES and type(head) is torch.nn.Linear
    return head.weight if plain and head.bias is None and hasattr(model, "model") else None


def as_policy(policy: Any) -> Policy:
    """Accept a :class:`Policy` or a ``(causal LM, tokenizer)`` pair.

    Raises:
        ValueError: anything else.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, tuple) and len(policy) == 2:
        return HFPolicy(*policy)
    raise ValueError(
        f"policy must be a mahalo Policy or a (causal LM, tokenizer) pair, got {type(policy).__name__}"
    )
