"""A truth probe on the policy's own hidden states, scored at every token for free.

A linear probe (``score = h @ w + b``, a logit of P(truthful)) reads the output of one decoder
layer of the policy at a response's last token. The policy's decode step computes that state for
every row at every token anyway, so the engine applies the probe to each row after each forward
(``H`` multiply-adds per row and token) and never forwards a token for it: no scoring suffix, no
second model, zero reward-model tokens. At the end of a step the candidate's score is the probe at
its last fed token (its response without end of turn; a candidate ended by the token budget is
read at its last fed token, the one before its last); during a step the same value ranks partial
candidates for early rejection (``search.prune``).

The embedded asset (``mahalo/assets/smollm2_135m_truth_probe.safetensors``) was trained on
TruthfulQA train answers and their prefixes at 25/50/75/100 % (``scripts/probe_study.py export``;
numbers in ``scripts/PROBE_STUDY.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mahalo.chat import Messages
from mahalo.rewards.protocol import Candidates, RowCost

EMBEDDED_TRUTH_PROBE = Path(__file__).resolve().parent.parent / "assets" / "smollm2_135m_truth_probe.safetensors"


@dataclass
class _ProbeState:
    cost: RowCost = field(default_factory=lambda: RowCost.free(0))


class TokenProbeReward:
    """A probe (``weight`` (H,), ``bias``) on the output of decoder layer ``layer`` (1-based, as
    transformers' ``hidden_states[layer]``) of the policy it was built for; read by the engine
    (``reads_layer``), never forwarded."""

    score_at = "token"

    def __init__(self, weight: torch.Tensor, bias: float, layer: int) -> None:
        self.weight = weight.reshape(-1)
        self.bias = float(bias)
        self.reads_layer = int(layer)

    def to(self, device: torch.device, dtype: torch.dtype) -> TokenProbeReward:
        return TokenProbeReward(self.weight.to(device, dtype), self.bias, self.reads_layer)

    @torch.inference_mode()
    def probe(self, states: torch.Tensor) -> torch.Tensor:
        """Scores (n,) float32 of layer states (n, H), on their device."""
        return (states @ self.weight.to(states)).float() + self.bias

    # -- the RewardModel protocol: nothing to forward, nothing to keep ------------------------

    def start(self) -> _ProbeState:
        return _ProbeState()

    def merge(self, states: list[_ProbeState]) -> _ProbeState:
        return _ProbeState()

    def split(self, state: _ProbeState, sizes: list[int]) -> list[_ProbeState]:
        return [_ProbeState() for _ in sizes]

    def add(self, state: _ProbeState, prompts: list[Messages]) -> None:
        state.cost = RowCost.free(len(prompts))

    def score(self, state: _ProbeState, candidates: Candidates) -> torch.Tensor:
        """Not called: the engine reads the probe from its own forwards."""
        raise ValueError("a token-level probe is read inside the engine (it needs the policy's hidden states)")

    def keep(self, state: _ProbeState, rows: torch.Tensor) -> None:
        return None


def read_probe(path: str | Path) -> tuple[torch.Tensor, float, int]:
    """``(weight (H,), bias, layer)`` of a probe file and the metadata beside it (``.json``).

    Raises:
        ValueError: a missing or malformed file, naming it and the fix.
    """
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    meta_file = file.with_suffix(".json")
    if not file.is_file() or not meta_file.is_file():
        raise ValueError(f"probe file {file} (and its metadata {meta_file.name} beside it) not found: "
                         "give head_file the path of a probe written by scripts/probe_study.py export")
    tensors = load_file(str(file))
    try:
        meta = json.loads(meta_file.read_text())
        weight, bias, layer = tensors["probe.weight"], tensors["probe.bias"], int(meta["layer"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"probe file {file} is malformed ({type(err).__name__}: {err}): it needs 'probe.weight', "
                         "'probe.bias' and a 'layer' in its metadata (scripts/probe_study.py export)") from err
    return weight.reshape(-1).float(), float(bias.reshape(-1)[0]), layer


def probe_reward(policy: Any, path: str | Path | None = None) -> TokenProbeReward:
    """The probe in ``path`` (default: the embedded truth probe) for ``policy`` (a ``(causal LM,
    tokenizer)`` pair or an :class:`~mahalo.policy.hf.HFPolicy`), on its device and dtype.

    Raises:
        ValueError: the probe does not fit the policy (hidden size or layer count), naming the fix.
    """
    model = policy[0] if isinstance(policy, tuple) else policy.model
    weight, bias, layer = read_probe(path or EMBEDDED_TRUTH_PROBE)
    config = model.config
    if weight.numel() != config.hidden_size or not 1 <= layer <= config.num_hidden_layers:
        raise ValueError(
            f"the probe {Path(path or EMBEDDED_TRUTH_PROBE).name} reads layer {layer} of hidden size {weight.numel()}; "
            f"the policy has {config.num_hidden_layers} layers of size {config.hidden_size}: train a probe for this "
            "policy (scripts/probe_study.py) and give it as head_file"
        )
    param = next(model.parameters())
    return TokenProbeReward(weight, bias, layer).to(param.device, param.dtype)
