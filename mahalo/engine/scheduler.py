"""Many prompts in flight: continuous batching at step granularity.

    while prompts remain or any is in flight:
      admit    as many waiting prompts as fit (max_prompts, max_rows), prefilled together
      step     every prompt in flight advances one step together (mahalo.engine.controller)
      yield    the prompts that ended; their rows are freed for the next admissions

Prompts are read lazily from any iterable, so a dataset streams through; results come back as
they finish, each with its input index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from mahalo.chat import as_messages
from mahalo.engine.controller import Controller
from mahalo.result import GuidedResult

# max_prompts=0 picks by the policy's device. CPU: benchmarks/throughput.py on the 2-core sandbox
# (embedded models, N=5, 128 tokens, 32 questions) was fastest at 16 of 1-16 (12.2 questions/min,
# 2.0x max_prompts=1). GPU: not measured (no GPU was available to this project yet); 32 keeps an
# 8B decode step near its weight-read floor (5 rows x 32 = 160 rows).
DEVICE_MAX_PROMPTS = {"cpu": 16, "cuda": 32}


def max_prompts_for(controller: Controller, requested: int) -> int:
    """``requested``, or the device's default for 0."""
    if requested:
        return requested
    device = getattr(controller.policy, "device", torch.device("cpu"))
    return DEVICE_MAX_PROMPTS.get(torch.device(device).type, DEVICE_MAX_PROMPTS["cpu"])


def schedule(
    controller: Controller, prompts: Iterable[object], max_prompts: int, max_rows: int = 0
) -> Iterator[tuple[int, GuidedResult | ValueError]]:
    """Decode ``prompts`` (strings or message lists) with at most ``max_prompts`` in flight and at
    most ``max_rows`` policy rows (0: no row limit).

    Yields:
        (input index, result) as each prompt finishes, or (input index, ValueError) for a prompt
        that failed (a malformed or too long prompt, a reward model's NaN).
    """
    strategy = controller.strategy
    per_prompt = strategy.beams * strategy.candidates  # rows a prompt may hold (its first step)
    waiting = enumerate(prompts)
    exhausted = False
    while True:
        batch: list[tuple[int, object]] = []
        while not exhausted and _fits(controller.in_flight + len(batch) + 1, per_prompt, max_prompts, max_rows):
            item = next(waiting, None)
            if item is None:
                exhausted = True
                break
            index, prompt = item
            try:
                batch.append((index, as_messages(prompt)))
            except ValueError as err:
                yield index, err
        if batch:
            yield from controller.admit(batch)
        if not controller.in_flight:
            if exhausted:
                return
            continue
        yield from controller.step()


def _fits(prompts: int, per_prompt: int, max_prompts: int, max_rows: int) -> bool:
    return prompts <= max_prompts and (max_rows == 0 or prompts * per_prompt <= max_rows)
