"""Search strategies: how many beams and candidates, what a step is, and pure selection rules.

Every strategy runs in the one controller loop (:mod:`mahalo.engine.controller`); they differ
only by the numbers in :class:`Strategy` and by how :func:`select` ranks. One ranking rule holds
from the first step to the final pick (:func:`final_order`): the weighted sum
of normalised per-objective rewards, vetoed candidates (``-inf``) last, duplicates never kept twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mahalo.config import GuideConfig
from mahalo.rewards.combine import combine


@dataclass(frozen=True)
class Strategy:
    """The shape of a search."""

    beams: int  # B: beams carried from step to step (step_beam) or independent subtrees (dvts)
    candidates: int  # N: candidates per beam per step
    stepwise: bool  # True: steps end at boundaries; False: one step = the whole response
    per_beam: bool = False  # dvts: each beam's candidates compete only with each other; it keeps its best
    keep_ended: bool = False  # best_of_n: every ended candidate joins the finished pool

    @property
    def holds(self) -> int:
        """The most finished responses its pool can hold when it ends (the most choices a request
        can get): every candidate for best_of_n, one per beam (subtree) for step_beam and dvts,
        one for sample and step_best_of_n."""
        return self.candidates if self.keep_ended else self.beams


@dataclass(frozen=True)
class Selection:
    """Candidates kept by one step, by row index into that step's candidates."""

    active: list[int]  # continue to the next step, best first (dvts: by subtree)
    finished: list[int]  # ended (end-of-turn or budget) and kept aside, best first


def strategy_for(cfg: GuideConfig) -> Strategy:
    """The :class:`Strategy` of ``cfg.search.strategy``."""
    s = cfg.search
    b, n = s.shape
    shapes = {
        "sample": Strategy(beams=1, candidates=1, stepwise=False),
        "best_of_n": Strategy(beams=1, candidates=n, stepwise=False, keep_ended=True),
        "step_best_of_n": Strategy(beams=1, candidates=n, stepwise=True),
        "step_beam": Strategy(beams=b, candidates=n, stepwise=True),
        "dvts": Strategy(beams=b, candidates=n, stepwise=True, per_beam=True),
    }
    return shapes[s.strategy]


def first_copies(keys: list[object], groups: torch.Tensor) -> torch.Tensor:
    """(R,) bool: True for the first row of each (group, key); later copies are False."""
    seen: set[tuple[int, object]] = set()
    eligible = []
    for key, g in zip(keys, groups.tolist()):
        eligible.append((g, key) not in seen)
        seen.add((g, key))
    return torch.tensor(eligible, dtype=torch.bool)


def rank(combined: torch.Tensor, eligible: torch.Tensor) -> list[int]:
    """Eligible rows, best first (ties: lower index). Vetoed rows (``-inf``) come only when no
    eligible row is without a veto."""
    order = torch.sort(-combined, stable=True).indices.tolist()
    rows = [r for r in order if eligible[r]]
    allowed = [r for r in rows if combined[r] > float("-inf")]
    return allowed or rows


def select(
    strategy: Strategy, combined: torch.Tensor, ended: torch.Tensor, groups: torch.Tensor,
    eligible: torch.Tensor, finished: int,
) -> Selection:
    """The candidates one step keeps.

    Args:
        strategy: the search's shape.
        combined: (R,) combined reward per candidate (normalised within its group).
        ended: (R,) bool, the candidate's response has ended.
        groups: (R,) the beam (dvts subtree) each candidate belongs to.
        eligible: (R,) bool, False for duplicates.
        finished: responses already in the finished pool.
    """
    if strategy.per_beam:  # dvts: each subtree keeps its own best
        keep = []
        for g in groups.unique().tolist():
            members = groups == g
            ranked = rank(combined, eligible & members)
            keep += ranked[:1]
    else:
        ranked = rank(combined, eligible)
        keep = ranked if strategy.keep_ended else ranked[: strategy.beams - finished]
    return Selection(active=[r for r in keep if not ended[r]], finished=[r for r in keep if ended[r]])


def final_order(
    raw: dict[str, torch.Tensor], lengths: list[int], cfg: GuideConfig, weights: dict[str, float]
) -> tuple[list[int], torch.Tensor]:
    """The finished pool ranked by the same rule the steps rank by: the one place that decides
    which response is the answer and, for ``n > 1``, which come next.

    Args:
        raw: objective name -> raw scores (P,) of the P finished responses, in the order they ended.
        lengths: response tokens of each.
        cfg: ``objective.normalize`` (applied over the pool) and ``search.length_penalty``.
        weights: objective name -> weight.

    Returns:
        (every index of the pool, best first: vetoed responses last; the (P,) final scores).
    """
    pool = len(lengths)
    if not raw:  # unguided: the order they ended in
        return list(range(pool)), torch.zeros(pool, dtype=torch.float64)
    combined = combine(raw, weights, cfg.objective.normalize)  # (P,)
    if cfg.search.length_penalty:
        scale = torch.tensor(lengths, dtype=torch.float64).clamp_min(1) ** cfg.search.length_penalty
        combined = combined / scale
    allowed = rank(combined, torch.ones(pool, dtype=torch.bool))
    return allowed + [r for r in torch.sort(-combined, stable=True).indices.tolist() if r not in allowed], combined



def prune_rows(partial: torch.Tensor, groups: torch.Tensor, decoding: torch.Tensor, keep: float) -> list[int]:
    """Early rejection (``search.prune``): the rows to end now, given each candidate's partial
    score ``partial`` (n,), its beam ``groups`` (n,) and whether it is still ``decoding`` (n,).

    The best ``ceil(keep * n)`` candidates are kept, and the best of each beam (so every beam goes
    on); of the others, those still decoding are pruned (a candidate that ended its step already
    cost all it will cost). Ties go to the earlier row; a NaN score ranks last."""
    n = len(partial)
    scores = torch.nan_to_num(partial.double(), nan=-math.inf).tolist()
    order = sorted(range(n), key=lambda r: (-scores[r], r))
    kept = set(order[:math.ceil(keep * n - 1e-9)])
    best_of: dict[int, int] = {}
    for r in order:
        best_of.setdefault(int(groups[r]), r)
    kept |= set(best_of.values())
    return [r for r in range(n) if r not in kept and bool(decoding[r])]
