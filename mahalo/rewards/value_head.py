"""Value heads: a backbone (``AutoModel``) plus a small head loaded from a file, read at the last
token of the conversation or at every step separator (MAHALO's math value model: a
Qwen2.5-Math-PRM-7B backbone, ``Linear -> ReLU -> Linear`` read at each ``<extra_0>``).

Head files (safetensors or a torch state dict; a ``value_head.`` prefix is ignored):

* linear: ``weight`` (1, H) and optionally ``bias`` (1,);
* MLP (``nn.Sequential(Linear, ReLU, Linear)``): ``0.weight`` (H', H), ``0.bias``, ``2.weight``
  (1, H'), ``2.bias``.

The head runs in float32 whatever the backbone's dtype (as MAHALO trains it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mahalo.rewards.backbone import BackboneReward, HeadReader
from mahalo.rewards.seqcls import ChatLayout
from mahalo.rewards.step_prm import StepLayout, step_tag_id

READ_AT = ("last_token", "end_of_turn", "steps")


def _read_tensors(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ValueError(f"value head file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict):
        raise ValueError(f"{path} must hold a state dict of tensors")
    return {k.removeprefix("value_head."): v for k, v in tensors.items()}


def value_head_from(tensors: dict[str, torch.Tensor], hidden_size: int, where: str = "value head") -> torch.nn.Module:
    """A linear or MLP value head (one output) built from a state dict, float32, frozen.

    Raises:
        ValueError: the keys or shapes fit neither layout, or not ``hidden_size``.
    """
    if set(tensors) in ({"weight"}, {"weight", "bias"}):
        w = tensors["weight"]
        head = torch.nn.Linear(w.shape[-1], 1, bias="bias" in tensors)
        expected = {"weight": (1, hidden_size), "bias": (1,)}
    elif set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        inner = tensors["0.weight"].shape[0]
        head = torch.nn.Sequential(torch.nn.Linear(hidden_size, inner), torch.nn.ReLU(), torch.nn.Linear(inner, 1))
        expected = {"0.weight": (inner, hidden_size), "0.bias": (inner,), "2.weight": (1, inner), "2.bias": (1,)}
    else:
        raise ValueError(
            f"{where} holds {sorted(tensors)}: expected a linear head (weight [, bias]) or MAHALO's MLP "
            "(0.weight, 0.bias, 2.weight, 2.bias)"
        )
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.float().eval().requires_grad_(False)


def load_value_head(file: str | os.PathLike[str], hidden_size: int) -> torch.nn.Module:
    """:func:`value_head_from` a file."""
    return value_head_from(_read_tensors(file), hidden_size, str(file))


def value_head_reward(
    backbone: Any, tokenizer: Any, head: torch.nn.Module, read_at: str = "last_token",
    step_tag: str = "<extra_0>", aggregate_how: str = "last",
) -> BackboneReward:
    """A value model: ``backbone`` (``AutoModel``: returns ``last_hidden_state``) and ``head``
    read at the conversation's last token (``last_token`` / ``end_of_turn``, see
    :mod:`mahalo.chat`) or at every ``step_tag`` (``steps``, aggregated by ``aggregate_how``)."""
    if read_at not in READ_AT:
        raise ValueError(f"unknown read_at {read_at!r}: choose one of {list(READ_AT)}")
    head = head.to(next(backbone.parameters()).device)
    if read_at == "steps":
        layout = StepLayout(step_tag, step_tag_id(tokenizer, step_tag), "", "chat", aggregate_how)
    else:
        layout = ChatLayout(read_at)
    return BackboneReward(backbone.base_model, tokenizer, layout, HeadReader(head, "logit"),
                          getattr(backbone.config, "max_position_embeddings", None))
