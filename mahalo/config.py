"""Typed configuration: every knob of a guided decode, documented where declared.

Validation only: each dataclass checks itself in ``__post_init__`` and raises ``ValueError``
with a one-line message naming the field and the fix. The command line's own options (models,
prompts, output) live in :mod:`mahalo.app.config`; library code only ever sees these dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mahalo.steps import BOUNDARIES

STRATEGIES = ("sample", "step_best_of_n", "step_beam", "best_of_n")
NORMALIZERS = ("none", "zscore")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingConfig:
    """How one token is drawn from the policy's logits."""

    temperature: float = 1.0
    """Softmax temperature, >= 0. 0 means greedy (argmax); 1 leaves the logits unchanged."""
    top_k: int = 50
    """Keep only the k most likely tokens, >= 0. 0 disables top-k."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with mass >= top_p, in (0, 1].
    1.0 disables it."""

    def __post_init__(self) -> None:
        _check(
            _is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}",
        )
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")


@dataclass
class StepConfig:
    """What a step is: when a candidate chunk stops and gets scored."""

    kind: str = "sentence"
    """Boundary detector: ``sentence`` (MAHALO's sentence end / blank line), ``double_newline``
    (step-by-step reasoning) or ``max_tokens`` (fixed-size chunks). End-of-turn always ends a
    step."""
    min_step_tokens: int = 8
    """A boundary counts only after this many tokens of the step, >= 0 (0 disables it)."""
    max_step_tokens: int = 64
    """A step always ends after this many tokens, >= 1."""

    def __post_init__(self) -> None:
        _check(
            self.kind in BOUNDARIES,
            f"unknown step boundary {self.kind!r}: choose one of {sorted(BOUNDARIES)}",
        )
        _check(_is_int(self.min_step_tokens) and self.min_step_tokens >= 0, f"min_step_tokens must be an integer >= 0, got {self.min_step_tokens!r}")
        _check(_is_int(self.max_step_tokens) and self.max_step_tokens >= 1, f"max_step_tokens must be an integer >= 1, got {self.max_step_tokens!r}")
        _check(
            self.min_step_tokens <= self.max_step_tokens,
            f"min_step_tokens ({self.min_step_tokens}) must not exceed max_step_tokens "
            f"({self.max_step_tokens})",
        )


@dataclass
class SearchConfig:
    """The search over candidates: which strategy, how wide, how long."""

    strategy: str = "step_best_of_n"
    """``sample`` (no reward), ``step_best_of_n`` (MAHALO: best of N per step), ``step_beam``
    (B beams x N candidates per step) or ``best_of_n`` (N whole responses, best at the end)."""
    num_candidates: int = 5
    """N: candidates sampled per beam per step (whole responses for ``best_of_n``), >= 1.
    Ignored by ``sample``."""
    beam_width: int = 1
    """B: beams kept per step, >= 1. Only ``step_beam`` uses B > 1."""
    max_new_tokens: int = 128
    """Response token budget, >= 1."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same output."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in STRATEGIES,
            f"unknown strategy {self.strategy!r}: choose one of {list(STRATEGIES)}",
        )
        _check(_is_int(self.num_candidates) and self.num_candidates >= 1, f"num_candidates (N) must be an integer >= 1, got {self.num_candidates!r}")
        _check(_is_int(self.beam_width) and self.beam_width >= 1, f"beam_width (B) must be an integer >= 1, got {self.beam_width!r}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")


@dataclass
class ObjectiveConfig:
    """How per-objective rewards become one number per candidate."""

    weights: dict[str, float] = field(default_factory=dict)
    """Objective name -> weight (finite, >= 0). An objective missing here gets weight 1.
    Combined reward = sum_k w_k * norm_k(r_k)."""
    normalize: str = "none"
    """``none`` (raw scores) or ``zscore`` (standardised across the candidates of a step; a
    zero-variance objective contributes 0)."""

    def __post_init__(self) -> None:
        _check(self.normalize in NORMALIZERS, f"normalize must be one of {list(NORMALIZERS)}, got {self.normalize!r}")
        for name, w in self.weights.items():
            _check(
                _is_number(w) and math.isfinite(w) and w >= 0,
                f"weight of objective {name!r} must be a finite number >= 0, got {w!r}",
            )


@dataclass
class GuideConfig:
    """Everything :func:`mahalo.guided_generate` needs besides models and prompt."""

    search: SearchConfig = field(default_factory=SearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def check_objectives(self, names: list[str]) -> None:
        """Weights may only name objectives that have a reward model.

        Raises:
            ValueError: a weight names an unknown objective.
        """
        unknown = sorted(set(self.objective.weights) - set(names))
        _check(
            not unknown,
            f"weights name unknown objective(s) {unknown}: known objectives are {sorted(names)}",
        )

    def weight(self, name: str) -> float:
        """The weight of objective ``name`` (1.0 when not given)."""
        return float(self.objective.weights.get(name, 1.0))


# Keyword options of guided_generate -> (section, field).
OPTIONS: dict[str, tuple[str, str]] = {
    "strategy": ("search", "strategy"),
    "num_candidates": ("search", "num_candidates"),
    "beam_width": ("search", "beam_width"),
    "max_new_tokens": ("search", "max_new_tokens"),
    "seed": ("search", "seed"),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "step": ("step", "kind"),
    "min_step_tokens": ("step", "min_step_tokens"),
    "max_step_tokens": ("step", "max_step_tokens"),
    "weights": ("objective", "weights"),
    "normalize": ("objective", "normalize"),
}


def config_from_options(base: GuideConfig | None = None, **options: object) -> GuideConfig:
    """Build a validated :class:`GuideConfig` from keyword options (see :data:`OPTIONS`).

    Raises:
        ValueError: an unknown option or an invalid value.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    _check(not unknown, f"unknown option(s) {unknown}: valid options are {sorted(OPTIONS)}")
    base = base or GuideConfig()
    sections: dict[str, dict[str, object]] = {
        "search": dict(vars(base.search)),
        "sampling": dict(vars(base.sampling)),
        "step": dict(vars(base.step)),
        "objective": dict(vars(base.objective)),
    }
    for key, value in options.items():
        section, name = OPTIONS[key]
        sections[section][name] = value
    return GuideConfig(
        search=SearchConfig(**sections["search"]),
        sampling=SamplingConfig(**sections["sampling"]),
        step=StepConfig(**sections["step"]),
        objective=ObjectiveConfig(**sections["objective"]),
    )
