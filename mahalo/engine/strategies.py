"""Search strategies: how many beams and candidates, what a step is, and a pure selection rule.

Every strategy runs in the one controller loop (:mod:`mahalo.engine.controller`); they differ
only by the numbers in :class:`Strategy` and by :func:`select_top`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mahalo.config import GuideConfig


@dataclass(frozen=True)
class Strategy:
    """The shape of a search."""

    beams: int  # B: beams carried from step to step
    candidates: int  # N: candidates per beam per step
    stepwise: bool  # True: steps end at boundaries; False: one step = the whole response


@dataclass(frozen=True)
class Selection:
    """Candidates kept by one step, by row index into that step's candidates."""

    active: list[int]  # continue to the next step, best first
    finished: list[int]  # ended (end-of-turn or budget) and kept aside, best first


def strategy_for(cfg: GuideConfig) -> Strategy:
    """The :class:`Strategy` of ``cfg.search.strategy``."""
    s = cfg.search
    shapes = {
        "sample": Strategy(beams=1, candidates=1, stepwise=False),
        "best_of_n": Strategy(beams=1, candidates=s.num_candidates, stepwise=False),
        "step_best_of_n": Strategy(beams=1, candidates=s.num_candidates, stepwise=True),
        "step_beam": Strategy(beams=s.beam_width, candidates=s.num_candidates, stepwise=True),
    }
    return shapes[s.strategy]


def select_top(combined: torch.Tensor, ended: torch.Tensor, slots: int) -> Selection:
    """Keep the ``slots`` best candidates by combined reward; ended ones are set aside.

    Ties go to the lower index, so with equal rewards the first candidate wins.

    Args:
        combined: (R,) combined reward per candidate.
        ended: (R,) bool, the candidate's response has ended.
        slots: how many candidates to keep (beams not yet finished).
    """
    order = torch.sort(-combined, stable=True).indices[:slots].tolist()
    return Selection(
        active=[r for r in order if not ended[r]],
        finished=[r for r in order if ended[r]],
    )
