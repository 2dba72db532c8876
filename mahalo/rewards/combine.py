"""Multi-objective rewards: per-objective normalisation and weighting into one number per candidate."""

from __future__ import annotations

import torch


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Normalise one objective's raw scores (R,) across the candidates of a step.

    ``zscore`` maps to zero mean and unit variance; a constant objective (zero variance)
    becomes all zeros, so it cannot move the choice.
    """
    if how == "none":
        return scores
    if how == "zscore":
        centred = scores - scores.mean()
        std = scores.std(unbiased=False)
        return centred / std if std > 1e-12 else torch.zeros_like(scores)
    raise ValueError(f"unknown normalisation {how!r}: choose 'none' or 'zscore'")


def combine(
    raw: dict[str, torch.Tensor], weights: dict[str, float], how: str
) -> torch.Tensor:
    """Combined reward = sum_k w_k * norm_k(r_k) over objectives -> (R,).

    Args:
        raw: objective name -> raw scores (R,), float64.
        weights: objective name -> weight (every key of ``raw`` must be present).
        how: ``none`` or ``zscore``.
    """
    if not raw:
        raise ValueError("combine needs at least one objective")
    total = None
    for name, scores in raw.items():
        term = weights[name] * normalize(scores.double(), how)
        total = term if total is None else total + term
    return total
