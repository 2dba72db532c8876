"""Multi-objective rewards: per-objective normalisation and weighting into one number per candidate.

Non-finite scores have a meaning: ``-inf`` is a veto (the candidate's combined reward is ``-inf``
for every objective of weight > 0, and normalisation ignores it), while NaN and ``+inf`` are
faults of the reward model (:func:`check_scores` raises).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def check_scores(raw: dict[str, torch.Tensor], step: int) -> None:
    """Raise ``ValueError`` when an objective returned NaN or ``+inf`` (``-inf`` is a veto).

    Args:
        raw: objective name -> raw scores (R,) of one step's candidates.
        step: the step's index, for the message.
    """
    for name, scores in raw.items():
        bad = torch.isnan(scores) | (scores == math.inf)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"objective {name!r} returned {float(scores[r])} for candidate {r} at step {step}: a reward "
                "must be a finite number, or -inf to veto a candidate"
            )


def normalize(scores: torch.Tensor, how: str, among: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise one objective's raw scores (R,) across the candidates that compete.

    ``zscore`` maps scores to zero mean and unit variance, the mean and spread taken over the
    finite scores of the rows ``among`` (default: all); a constant objective (zero variance)
    becomes all zeros, so it cannot move the choice. ``-inf`` (a veto) stays ``-inf``.
    """
    if how == "none":
        return scores
    if how != "zscore":
        raise ValueError(f"unknown normalisation {how!r}: choose 'none' or 'zscore'")
    finite = torch.isfinite(scores)
    basis = finite if among is None else finite & among
    if not bool(basis.any()):
        return scores.masked_fill(finite, 0.0)
    values = scores[basis]
    std = values.std(unbiased=False)
    z = (scores - values.mean()) / std if std > 1e-12 else torch.zeros_like(scores)
    return torch.where(finite, z, scores)


def combine(
    raw: dict[str, torch.Tensor], weights: dict[str, float], how: str, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Combined reward = sum_k w_k * norm_k(r_k) over objectives -> (R,).

    A candidate with ``-inf`` from an objective of weight > 0 is vetoed: its combined reward is
    ``-inf`` and the others are normalised among themselves.

    Args:
        raw: objective name -> raw scores (R,), float64.
        weights: objective name -> weight (every key of ``raw`` must be present).
        how: ``none`` or ``zscore``.
        groups: (R,) ids of candidates that compete with each other (normalised together);
            None: all of them.
    """
    if not raw:
        raise ValueError("combine needs at least one objective")
    rows = len(next(iter(raw.values())))
    groups = torch.zeros(rows, dtype=torch.long) if groups is None else groups
    veto = torch.zeros(rows, dtype=torch.bool)
    for name, scores in raw.items():
        if float(weights[name]) > 0:
            veto |= scores == NEG_INF
    total = torch.zeros(rows, dtype=torch.float64)
    for name, scores in raw.items():
        scores, w = scores.double(), float(weights[name])
        z = torch.empty_like(scores)
        for g in groups.unique():
            members = groups == g
            z[members] = normalize(scores[members], how, ~veto[members])
        total += w * z.masked_fill(z == NEG_INF, 0.0)
    return total.masked_fill(veto, NEG_INF)
