"""``launcher=local``: the models in this process, many prompts in flight on one engine."""

from __future__ import annotations

import time
from typing import Any

from mahalo.api import guided_generate_many
from mahalo.app.config import RunConfig
from mahalo.app.registry import load_guide
from mahalo.launch import Answers


def answers(cfg: RunConfig, objectives: list[str], prompts: list[Any], console: Any) -> Answers:
    """Load the models here and decode ``prompts``; a prompt's fault is its answer (a ValueError)."""
    t0 = time.perf_counter()
    policy, prms = load_guide(cfg.models, objectives)
    console.print(f"models loaded in {time.perf_counter() - t0:.1f} s", style="dim")
    results = guided_generate_many(policy, prms, prompts, config=cfg.guide(), errors="return")
    return ((k, res, {}) for k, res in results)
