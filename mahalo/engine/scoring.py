"""Scoring a step: each reward model scores the candidates of every prompt whose step ended, in one
batch, and a fault stays with its prompt.

    for each source (a reward model, and the objectives read from it):
      score   merge the prompts' states (a copy), one ``score`` of all their candidates
              RowFaults: those prompts fail, the others are scored again without them
              any other exception: each prompt is scored alone, so only the culprit fails
      keep    after selection: the survivors' rows, split back into one state per prompt

Each prompt keeps its own state per reward model (one row per beam), so a prompt that fails, is
cancelled or finishes just drops its states, and the others' states are never touched by a batch
that raised (``merge`` copies). A model without ``merge`` scores each prompt alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.result import PromptError
from mahalo.rewards import Candidates, RewardModel, RowCost, RowFaults
from mahalo.rewards.seqcls import RewardOutput

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One reward model and the objectives read from it: one objective, or several outputs of a
    multi-output model (``column`` is the output; None: the model's one score)."""

    model: RewardModel
    outputs: list[tuple[str, int | None]]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def used_by(self, weights: dict[str, float]) -> bool:
        """Does a prompt guided by ``weights`` read this source?"""
        return any(name in weights for name, _ in self.outputs)

    def columns(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw scores (R,) or (R, K) of this source -> objective -> (R,) float64."""
        raw = raw.double().cpu()
        return {name: raw if column is None else raw[:, column] for name, column in self.outputs}


def sources_of(rewards: dict[str, RewardModel]) -> list[Source]:
    """Group objectives by the model that computes them: a :class:`RewardOutput` by its source,
    any other reward by identity."""
    groups: dict[int, Source] = {}
    for name, rm in rewards.items():
        model, column = (rm.source, rm.column) if isinstance(rm, RewardOutput) else (rm, None)
        groups.setdefault(id(model), Source(model, []))
        groups[id(model)].outputs.append((name, column))
    return list(groups.values())


@dataclass
class Scored:
    """One source's scores of a group of prompts, until their survivors are kept."""

    source: Source
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt (position in the group) -> raw
    errors: dict[int, ValueError] = field(default_factory=dict)  # prompt -> why it fails
    costs: dict[int, RowCost] = field(default_factory=dict)  # prompt -> what its rows cost
    merged: Any = None  # the merged state the members were scored in (None: each in its own)
    members: list[int] = field(default_factory=list)


def concat(parts: list[Candidates], beams: list[int]) -> Candidates:
    """The candidates of several prompts as one batch: each part's parents index its own prompt's
    ``beams[i]`` state rows, which follow one another in the merged state."""
    offsets = [sum(beams[:i]) for i in range(len(beams))]

    def joined(name: str) -> list | None:
        values = [getattr(c, name) for c in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    parents = torch.cat([c.parents + off for c, off in zip(parts, offsets)])
    return Candidates(parents, joined("token_ids"), joined("texts"), joined("steps"), joined("held"))


def score(source: Source, states: list[Any], candidates: list[Candidates], beams: list[int],
          scratch: bool = False) -> Scored:
    """Score each prompt's ``candidates`` (parents: its own ``beams[i]`` state rows) with one
    source; a prompt whose candidates cannot be scored gets an error instead of scores.

    ``scratch``: score copies of the states (``merge``, a prompt scored alone too) and never keep
    them, so ``states`` stay exactly as they were (early rejection scores partial candidates so);
    the model must have ``merge``."""
    out = Scored(source)
    model = source.model
    todo = list(range(len(states)))
    while len(todo) > 1 and hasattr(model, "merge"):
        try:
            merged = model.merge([states[j] for j in todo])
            raw = model.score(merged, concat([candidates[j] for j in todo], [beams[j] for j in todo]))
        except RowFaults as faults:  # raised before the merged state changed: drop those prompts, rescore
            culprits = _prompts_of(faults, [len(candidates[j].texts) for j in todo])
            for at, why in culprits.items():
                out.errors[todo[at]] = _fault(source, faults, why)
            todo = [j for at, j in enumerate(todo) if at not in culprits]
            continue
        except Exception as err:  # noqa: BLE001 - a reward model's fault belongs to the prompts it scored
            _fatal_if_shared(model, err)
            log.warning("reward model for %s failed on %d prompts at once (%s: %s): scoring each alone",
                        source.names, len(todo), type(err).__name__, err)
            break
        start, cost = 0, getattr(merged, "cost", None)
        for j in todo:
            n = len(candidates[j].texts)
            out.scores[j] = raw[start:start + n]
            if cost is not None:
                out.costs[j] = _slice(cost, start, start + n)
            start += n
        out.merged, out.members = merged, todo
        return out
    for j in todo:
        state = states[j]
        try:
            if scratch:
                state = model.merge([state])
            out.scores[j] = model.score(state, candidates[j])
        except RowFaults as faults:
            out.errors[j] = _fault(source, faults, next(iter(faults.rows.values()), str(faults)))
            continue
        except Exception as err:  # noqa: BLE001 - as above: this prompt's fault
            _fatal_if_shared(model, err)
            out.errors[j] = ValueError(f"reward model for {source.names} failed: {type(err).__name__}: {err}")
            continue
        cost = getattr(state, "cost", None)
        if cost is not None:
            out.costs[j] = cost
    return out


def keep(scored: Scored, states: list[Any], survivors: dict[int, list[int]]) -> None:
    """Keep each scored prompt's surviving candidates (rows of its own candidates, in order) as
    its new state rows, in ``states`` in place; a prompt with no survivors keeps none."""
    model = scored.source.model
    if scored.merged is not None:
        rows, start = [], 0
        for j in scored.members:
            rows += [start + r for r in survivors.get(j, [])]
            start += len(scored.scores[j])
        model.keep(scored.merged, torch.tensor(rows, dtype=torch.long))
        parts = model.split(scored.merged, [len(survivors.get(j, [])) for j in scored.members])
        for j, part in zip(scored.members, parts):
            states[j] = part
        return
    for j in scored.scores:
        model.keep(states[j], torch.tensor(survivors.get(j, []), dtype=torch.long))


def add(source: Source, messages: Any) -> tuple[Any, RowCost | None]:
    """A new prompt's state for ``source`` (one row) and what its prefill cost.

    Raises:
        ValueError: the model could not take the prompt (the prompt's own fault).
    """
    state = source.model.start()
    try:
        source.model.add(state, [messages])
    except Exception as err:  # noqa: BLE001 - as in score: this prompt's fault
        _fatal_if_shared(source.model, err)
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"reward model for {source.names} failed: {type(err).__name__}: {err}") from err
    return state, getattr(state, "cost", None)


def charge(stats: Any, cost: RowCost | None) -> None:
    """Add one prompt's reward-model cost to its stats."""
    if cost is None:
        return
    stats.prm_tokens += sum(cost.tokens)
    stats.prm_tokens_padded += sum(cost.padded)
    stats.prm_full_rescore_tokens += sum(cost.full)


def _prompts_of(faults: RowFaults, sizes: list[int]) -> dict[int, str]:
    """Candidate rows of a merged batch -> the prompts (positions) they belong to, and why."""
    out: dict[int, str] = {}
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    for row, why in sorted(faults.rows.items()):
        at = next(i for i, b in enumerate(bounds) if row < b)
        out.setdefault(at, why)
    return out


def _fault(source: Source, faults: RowFaults, why: str) -> ValueError:
    """A prompt's error for candidates its reward model could not score (a PromptError when they
    exceed the model's context: the prompt is too long for it)."""
    kind = PromptError if faults.too_long else ValueError
    return kind(f"objective(s) {source.names}: {why}")


def _slice(cost: RowCost, start: int, end: int) -> RowCost:
    return RowCost(cost.tokens[start:end], cost.padded[start:end], cost.full[start:end])


def _fatal_if_shared(model: Any, err: BaseException) -> None:
    """A model that forwards through the policy's own rows may have left them changed: stop."""
    if getattr(model, "shares_policy", False):
        raise err
