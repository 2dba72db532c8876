"""MAH-DPO multi-head policies: one backbone, several LM heads, logits mixed by user weights.

MAHALO's ``MultiHeadCausalLM`` keeps a causal LM as ``base_model`` and K heads ``heads.{i}``
(``Linear(H, V)``, with or without bias); its ``policy.pt`` holds that state dict, top-level or
under ``"state"``. The next-token logits are ``sum_i w_i * head_i(h)`` with the weights normalised
to sum 1. That sum is linear in the heads, so it is one head: ``(sum_i w_i W_i) h + sum_i w_i b_i``,
built once at load time. The backbone runs once per token and the head costs one matmul, whatever
the number of heads; the policy is then a plain :class:`~mahalo.policy.hf.HFPolicy`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_HEAD = re.compile(r"^heads\.(\d+)\.(weight|bias)$")


def mixing_weights(
    num_heads: int, head_weights: list[float] | None = None, head_index: int | None = None
) -> list[float]:
    """The weight of each head, summing to 1: ``head_weights`` normalised, one-hot at
    ``head_index``, or equal weights when neither is given.

    Raises:
        ValueError: a wrong length, negative or all-zero weights, an index out of range, or both given.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be at least 1, got {num_heads}")
    if head_weights is not None and head_index is not None:
        raise ValueError("give head_weights or head_index, not both")
    if head_index is not None:
        if not 0 <= head_index < num_heads:
            raise ValueError(f"head_index {head_index} is out of range for {num_heads} heads (0..{num_heads - 1})")
        return [1.0 if i == head_index else 0.0 for i in range(num_heads)]
    if head_weights is None:
        return [1.0 / num_heads] * num_heads
    weights = [float(w) for w in head_weights]
    if len(weights) != num_heads:
        raise ValueError(f"head_weights has {len(weights)} values for {num_heads} heads: give one weight per head")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"head_weights {weights} must be >= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def split_checkpoint(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """A MAH-DPO state dict -> (the causal LM's own state dict, head weights, head biases).

    Raises:
        ValueError: no heads, or heads that are not numbered 0..K-1.
    """
    if "state" in state and isinstance(state["state"], dict):
        state = state["state"]
    backbone = {k.removeprefix("base_model."): v for k, v in state.items() if k.startswith("base_model.")}
    weights: dict[int, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _HEAD.match(key)
        if m:
            (weights if m.group(2) == "weight" else biases)[int(m.group(1))] = value
    if not weights or sorted(weights) != list(range(len(weights))):
        raise ValueError(f"no heads.0.weight ... heads.K-1.weight in the checkpoint (found heads {sorted(weights)})")
    k = len(weights)
    return backbone, [weights[i] for i in range(k)], [biases.get(i) for i in range(k)]


@torch.no_grad()
def install_mixed_head(model: Any, heads: list[torch.Tensor], biases: list[torch.Tensor | None],
                       mix: list[float]) -> Any:
    """Replace ``model``'s output head by the mixture of ``heads`` (each (V, H)) with ``mix``."""
    if len(heads) != len(mix):
        raise ValueError(f"{len(mix)} weights for {len(heads)} heads")
    old = model.get_output_embeddings()
    shape = tuple(old.weight.shape)
    for i, w in enumerate(heads):
        if tuple(w.shape) != shape:
            raise ValueError(f"heads.{i}.weight has shape {tuple(w.shape)}, the model's head is {shape}")
    weight = sum(m * w.double() for m, w in zip(mix, heads))  # (V, H), mixed in float64
    has_bias = any(b is not None for b in biases)
    head = torch.nn.Linear(shape[1], shape[0], bias=has_bias, device=old.weight.device, dtype=old.weight.dtype)
    head.weight.copy_(weight.to(head.weight.dtype))
    if has_bias:
        bias = sum(m * (b.double() if b is not None else torch.zeros(shape[0], dtype=torch.float64))
                   for m, b in zip(mix, biases))
        head.bias.copy_(bias.to(head.bias.dtype))
    model.set_output_embeddings(head.requires_grad_(False))
    model.config.tie_word_embeddings = False
    return model


def load_multihead_state(model: Any, state: dict[str, Any], num_heads: int, mix: list[float], where: str) -> Any:
    """Load a MAH-DPO ``state`` into causal LM ``model`` and install its mixed head.

    Raises:
        ValueError: ``num_heads`` is not the checkpoint's, or its backbone does not fit ``model``.
    """
    backbone, heads, biases = split_checkpoint(state)
    if len(heads) != num_heads:
        raise ValueError(f"{where} has {len(heads)} heads but num_heads={num_heads}: set num_heads={len(heads)}")
    own = model.state_dict()
    backbone = {k: v for k, v in backbone.items() if not k.startswith("lm_head.")}  # replaced by the heads
    unknown = sorted(set(backbone) - set(own))
    missing = sorted(k for k in own if not k.startswith("lm_head.") and k not in backbone)
    if unknown or (backbone and missing):
        raise ValueError(
            f"{where} does not fit the base model: {len(unknown)} unknown keys (e.g. {unknown[:2]}), "
            f"{len(missing)} missing (e.g. {missing[:2]}): is base the model it was trained from?"
        )
    if backbone:
        model.load_state_dict(backbone, strict=False)
    return install_mixed_head(model, heads, biases, mix)
