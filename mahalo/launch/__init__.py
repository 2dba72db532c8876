"""Launchers: where a run's prompts are decoded. :mod:`~mahalo.launch.local` loads the models in
this process; :mod:`~mahalo.launch.ray` runs replicas on a Ray cluster (optional: ``mahalo[ray]``).
Either hands back ``(position, result, extra record fields)`` as prompts finish; the caller writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mahalo.result import GuidedResult

Answers = Iterator[tuple[int, GuidedResult | ValueError, dict[str, Any]]]


class Unanswered(RuntimeError):
    """Prompts a launcher could not get answered (their workers died every time); the answers
    already handed back stand, and a re-run of the same command retries the rest."""


def answers_here(cfg: Any, objectives: list[str], prompts: list[Any], console: Any) -> Answers:
    """``launcher=local`` (:mod:`mahalo.launch.local`)."""
    from mahalo.launch import local

    return local.answers(cfg, objectives, prompts, console)


def answers_on_ray(cfg: Any, objectives: list[str], prompts: list[Any], console: Any) -> Answers:
    """``launcher=ray`` (:mod:`mahalo.launch.ray`)."""
    from mahalo.launch import ray

    return ray.answers(cfg, objectives, prompts, console)
