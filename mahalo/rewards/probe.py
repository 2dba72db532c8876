"""A truth probe on the policy's own hidden states, scored at every token for free.

A probe (a logit of P(truthful)) reads the output of one decoder layer of the policy (or of a
few, side by side) at a response's last token: linear (``score = h @ w + b``) or with one
hidden layer (``score = gelu(h @ W1.T + b1) @ w + b``). The policy's decode step computes those
states for every row at every token anyway, so the engine applies the probe to each row after
each forward (``H`` multiply-adds per row and token, ``K * H`` with a hidden layer of ``K``) and
never forwards a token for it: no scoring suffix, no second model, zero reward-model tokens. At
the end of a step the candidate's score is the probe at its last fed token (its response
without end of turn; a candidate ended by the token budget is read at its last fed token, the one
before its last); during a step the same value ranks partial candidates for early rejection
(``search.prune``).

The embedded asset (``mahalo/assets/smollm2_135m_truth_probe.safetensors``: three one-hidden-layer
probes on layers 16 and 20 read together, folded into one of 192 GELU units) was trained on every
TruthfulQA train answer and its prefixes at 25/50/75/100 % (``scripts/probe_study.py export
--export-layer 16+20 --export-mlp 64 --export-seeds 3``; numbers in ``scripts/PROBE_STUDY.md``).
The probes it replaced are kept beside it: ``smollm2_135m_truth_probe_l20.safetensors`` (one
hidden layer on layer 20, 227 train questions; the early-rejection study of
``benchmarks/EARLY_REJECTION_PLAN.md``) and ``smollm2_135m_truth_probe_linear.safetensors`` (the
pruning curves of ``benchmarks/README.md`` §3b).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mahalo.chat import Messages
from mahalo.rewards.protocol import Candidates, RowCost

EMBEDDED_TRUTH_PROBE = Path(__file__).resolve().parent.parent / "assets" / "smollm2_135m_truth_probe.safetensors"
EMBEDDED_LINEAR_PROBE = EMBEDDED_TRUTH_PROBE.with_name("smollm2_135m_truth_probe_linear.safetensors")


@dataclass
class _ProbeState:
    cost: RowCost = field(default_factory=lambda: RowCost.free(0))


class TokenProbeReward:
    """A probe on the output of decoder layer ``layer`` (1-based, as transformers'
    ``hidden_states[layer]``) of the policy it was built for, or of several layers read together
    (a sequence: their states concatenated in that order, ``H = len(layers) * hidden size``); read
    by the engine (``reads_layers``), never forwarded. Linear: ``weight`` (H,), ``bias``. With
    ``hidden = (W1 (K, H), b1 (K,))``: a GELU layer first, then ``weight`` (K,), ``bias``."""

    score_at = "token"

    def __init__(self, weight: torch.Tensor, bias: float, layer: int | Sequence[int],
                 hidden: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.weight = weight.reshape(-1)
        self.bias = float(bias)
        self.reads_layers = (int(layer),) if isinstance(layer, int) else tuple(int(k) for k in layer)
        if not self.reads_layers:
            raise ValueError("a probe reads at least one layer")
        self.hidden = None if hidden is None else (hidden[0], hidden[1].reshape(-1))
        if self.hidden is not None and self.hidden[0].shape[0] != self.weight.numel():
            raise ValueError(f"probe hidden layer gives {self.hidden[0].shape[0]} features, its output weight "
                             f"takes {self.weight.numel()}")

    @property
    def in_features(self) -> int:
        """H: the size of the (concatenated) layer states it reads."""
        return self.weight.numel() if self.hidden is None else self.hidden[0].shape[1]

    def to(self, device: torch.device, dtype: torch.dtype) -> TokenProbeReward:
        hidden = None if self.hidden is None else tuple(t.to(device, dtype) for t in self.hidden)
        return TokenProbeReward(self.weight.to(device, dtype), self.bias, self.reads_layers, hidden)

    def features(self, states: dict[int, torch.Tensor], n: int) -> torch.Tensor:
        """(n, H): the first ``n`` rows of the states of the layers it reads (``states[k]`` (>= n, h)
        for layer k), concatenated in its order."""
        parts = [states[k][:n] for k in self.reads_layers]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    @torch.inference_mode()
    def probe(self, states: torch.Tensor) -> torch.Tensor:
        """Scores (n,) float32 of layer states (n, H), on their device."""
        x = states
        if self.hidden is not None:
            w1, b1 = self.hidden
            x = torch.nn.functional.gelu(x @ w1.to(x).T + b1.to(x))  # (n, K)
        return (x @ self.weight.to(x)).float() + self.bias

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


def read_probe(path: str | Path) -> TokenProbeReward:
    """The probe of a probe file (float32, on the CPU) and the metadata beside it (``.json``):
    keys ``probe.weight`` (1, F) and ``probe.bias`` (1,), plus ``probe.hidden.weight`` (K, H) and
    ``probe.hidden.bias`` (K,) for a probe with a hidden layer (then F = K); in the metadata
    ``layer`` (one decoder layer) or ``layers`` (several, read together in that order).

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
        weight, bias = tensors["probe.weight"], tensors["probe.bias"]
        layer = [int(k) for k in meta["layers"]] if "layers" in meta else int(meta["layer"])
        hidden = None
        if "probe.hidden.weight" in tensors:
            hidden = (tensors["probe.hidden.weight"].float(), tensors["probe.hidden.bias"].float())
        return TokenProbeReward(weight.reshape(-1).float(), float(bias.reshape(-1)[0]), layer, hidden)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"probe file {file} is malformed ({type(err).__name__}: {err}): it needs 'probe.weight', "
                         "'probe.bias' and a 'layer' (or 'layers') in its metadata "
                         "(scripts/probe_study.py export)") from err


def probe_reward(policy: Any, path: str | Path | None = None) -> TokenProbeReward:
    """The probe in ``path`` (default: the embedded truth probe) for ``policy`` (a ``(causal LM,
    tokenizer)`` pair or an :class:`~mahalo.policy.hf.HFPolicy`), on its device and dtype.

    Raises:
        ValueError: the probe does not fit the policy (hidden size or layer count), naming the fix.
    """
    model = policy[0] if isinstance(policy, tuple) else policy.model
    probe = read_probe(path or EMBEDDED_TRUTH_PROBE)
    config = model.config
    layers = probe.reads_layers
    if probe.in_features != len(layers) * config.hidden_size or not all(
            1 <= k <= config.num_hidden_layers for k in layers):
        raise ValueError(
            f"the probe {Path(path or EMBEDDED_TRUTH_PROBE).name} reads layer(s) {', '.join(map(str, layers))} "
            f"({probe.in_features} features); the policy has {config.num_hidden_layers} layers of size "
            f"{config.hidden_size}: train a probe for this policy (scripts/probe_study.py) and give it as head_file"
        )
    param = next(model.parameters())
    return probe.to(param.device, param.dtype)
