"""Typed configuration: every knob of a guided decode, documented where declared.

Validation only: each dataclass checks itself in ``__post_init__`` and raises ``ValueError``
with a one-line message naming the field and the fix. The command line's own options (models,
prompts, output) live in :mod:`mahalo.app.config`; library code only ever sees these dataclasses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from mahalo.steps import BOUNDARIES
from mahalo.stops import MAX_STOP

STRATEGIES = ("sample", "step_best_of_n", "step_beam", "dvts", "best_of_n")
NORMALIZERS = ("none", "zscore")
MIN_TEMPERATURE = 0.01  # below this (and above 0) logits / T overflow: clamped, with a warning
# The most policy rows (B*N) one prompt may hold when batch.max_rows is 0: a typo such as
# num_candidates=100000 is refused before anything is allocated (set max_rows to go higher).
MAX_PROMPT_ROWS = 1024

log = logging.getLogger(__name__)


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
    """Softmax temperature, >= 0. 0 means greedy (argmax); 1 leaves the logits unchanged. A value
    in (0, 0.01) is raised to 0.01 with a warning (smaller ones overflow to inf/NaN probabilities).
    Greedy decoding makes every candidate the same, so it needs N = B = 1 (or ``sample``)."""
    top_k: int = 50
    """Keep only the k most likely tokens, >= 0. 0 disables top-k."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with mass >= top_p, in (0, 1].
    1.0 disables it."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a response, on top of the model's own: its
    ``generation_config.eos_token_id`` (one or several), the tokenizer's EOS and the token its chat
    template writes after an assistant turn."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (OpenAI's ``stop``): at most 4 non-empty strings (a single string is taken as
    a list of one). A candidate whose text reaches one ends there, in every strategy, as if it had
    ended its turn (end reason ``stop``): its text is cut where the stop string starts and its
    tokens after it are dropped (a token that straddles the cut is kept; its text is cut). The
    check runs per token on the new characters only (:mod:`mahalo.stops`)."""

    def __post_init__(self) -> None:
        _check(
            _is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}",
        )
        if 0 < self.temperature < MIN_TEMPERATURE:
            log.warning("temperature %g is below %g: using %g (0 means greedy)", self.temperature,
                        MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        _check(
            isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
            f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}",
        )
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(
            isinstance(self.stop, (list, tuple)) and len(self.stop) <= MAX_STOP
            and all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a string or a list of at most {MAX_STOP} non-empty strings, got {self.stop!r}",
        )
        self.stop = list(self.stop)
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
    """How candidates compete. All run in one step loop and differ only by their selection rule:

    * ``sample``: plain sampling, no reward (greedy at temperature 0);
    * ``step_best_of_n``: MAHALO: N candidates per step, the best is kept;
    * ``step_beam``: B beams x N candidates per step, the top B of all of them are kept; a beam
      that ends is set aside and the search goes on with fewer beams;
    * ``dvts``: diverse verifier tree search (search-and-learn): B independent subtrees, each
      expanding its one beam into N candidates per step and keeping its own best; subtrees never
      compete, and the answer is the best leaf. search-and-learn's ``n`` / ``beam_width`` are
      B*N / N here;
    * ``best_of_n``: N whole responses in one batch, the best at the end.

    The answer is picked among the ended responses (the *finished pool*: B of them for
    ``step_beam`` and ``dvts``, N for ``best_of_n``) by the rule every step ranks by: the weighted
    sum of per-objective scores normalised (``objective.normalize``) over the pool, divided by
    ``len ** length_penalty``. Ties go to the response that ended first."""
    num_candidates: int = 5
    """N: candidates sampled per beam per step (whole responses for ``best_of_n``), >= 1.
    Ignored by ``sample``."""
    beam_width: int = 1
    """B: beams kept per step (``step_beam``) or independent subtrees (``dvts``), >= 1. Ignored by
    the other strategies."""
    max_new_tokens: int = 128
    """Response token budget, >= 1."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same output."""
    dedupe: bool = True
    """Candidates of a step with the same token ids (and the same end) compete once: the first is
    eligible, its copies are never kept, so B beams are B different texts."""
    length_penalty: float = 0.0
    """Final pick only (vLLM's definition): the pool's combined reward is divided by
    ``response_tokens ** length_penalty``. 0 disables it; > 0 favours longer answers when rewards
    are negative, as with log-probabilities."""
    prune: bool = False
    """Early rejection inside a step (Speculative Rejection for ``best_of_n``): every
    ``prune_every`` tokens of a step, the candidates still decoding whose partial score trails are
    ended and their rows freed at once. The partial score is read from rewards scored at every
    token (``family: probe``: a probe on the policy's own hidden states, no reward-model tokens),
    or from a separate reward model that ``prune_by`` names (at the cost of its forwards); see
    ``prune_by``. A pruned candidate leaves the step: it is not scored, not recorded among the
    step's candidates, and counted in ``Stats.pruned_rows`` / ``pruned_tokens``."""
    prune_every: int = 8
    """Tokens of a step between two prunings, >= 1 (the first at token ``prune_every``)."""
    prune_keep: float = 0.5
    """Fraction of a step's candidates (decoding or already ended) kept at each pruning, in (0, 1]:
    the best ``ceil(prune_keep * n)`` by partial score, and at least the best of each beam's
    (``dvts``: subtree's) candidates. Candidates that already ended their step are never pruned."""
    prune_by: str | None = None
    """The objective whose score ranks partial candidates. It is read anyway, and weighted in the
    step's selection only when ``objective.weights`` names it (unlike other objectives, which
    default to weight 1). None: the weighted sum of the token-level objectives (probes) the search
    is guided by. A probe costs nothing. A separate reward model (any with ``merge``: ``seqcls``,
    step PRMs, value heads, judges, programmatic rewards) scores each candidate still decoding on
    the response it has drawn so far, and one that ended its step once, on a copy of the prompt's
    state that is then dropped (its step-end scores are unchanged); the tokens it forwards are
    billed in ``Stats.prm_tokens`` and counted in ``Stats.prune_prm_tokens``. A reward head on the
    policy's own backbone (``share_backbone``) forwards only the scoring suffixes, through the
    policy, in one extra forward per pruning. A model without ``merge`` is refused."""

    def __post_init__(self) -> None:
        _check(isinstance(self.prune, bool), f"prune must be true or false, got {self.prune!r}")
        _check(_is_int(self.prune_every) and self.prune_every >= 1,
               f"prune_every must be an integer >= 1, got {self.prune_every!r}")
        _check(_is_number(self.prune_keep) and 0 < self.prune_keep <= 1,
               f"prune_keep must be a number in (0, 1], got {self.prune_keep!r}")
        _check(self.prune_by is None or (isinstance(self.prune_by, str) and self.prune_by != ""),
               f"prune_by must be an objective name or null, got {self.prune_by!r}")
        _check(
            self.strategy in STRATEGIES,
            f"unknown strategy {self.strategy!r}: choose one of {list(STRATEGIES)}",
        )
        _check(_is_int(self.num_candidates) and self.num_candidates >= 1, f"num_candidates (N) must be an integer >= 1, got {self.num_candidates!r}")
        _check(_is_int(self.beam_width) and self.beam_width >= 1, f"beam_width (B) must be an integer >= 1, got {self.beam_width!r}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(isinstance(self.dedupe, bool), f"dedupe must be true or false, got {self.dedupe!r}")
        _check(
            _is_number(self.length_penalty) and math.isfinite(self.length_penalty),
            f"length_penalty must be a finite number (0 disables it), got {self.length_penalty!r}",
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(B, N) as the strategy uses them: ``sample`` (1, 1), ``step_best_of_n`` and ``best_of_n``
        (1, N), ``step_beam`` and ``dvts`` (B, N)."""
        n = 1 if self.strategy == "sample" else self.num_candidates
        b = self.beam_width if self.strategy in ("step_beam", "dvts") else 1
        return b, n


@dataclass
class ObjectiveConfig:
    """How per-objective rewards become one number per candidate."""

    weights: dict[str, float] = field(default_factory=dict)
    """Objective name -> weight (finite, >= 0). An objective missing here gets weight 1.
    Combined reward = sum_k w_k * norm_k(r_k)."""
    normalize: str = "none"
    """``none`` (raw scores) or ``zscore`` (standardised across the candidates that compete: a
    step's candidates, a DVTS subtree's, or the finished pool at the final pick; a zero-variance
    objective contributes 0).

    Non-finite scores: ``-inf`` is a veto (the candidate is never kept while a candidate without a
    veto competes, and the mean and spread are taken over the other candidates); NaN or ``+inf``
    is a fault of that reward model and raises ``ValueError`` naming it and the step."""

    def __post_init__(self) -> None:
        _check(self.normalize in NORMALIZERS, f"normalize must be one of {list(NORMALIZERS)}, got {self.normalize!r}")
        for name, w in self.weights.items():
            _check(
                _is_number(w) and math.isfinite(w) and w >= 0,
                f"weight of objective {name!r} must be a finite number >= 0, got {w!r}",
            )


@dataclass
class BatchConfig:
    """How many prompts decode together (:func:`mahalo.guided_generate_many`, prompt files, the
    server, Ray replicas).

    Prompts in flight share every policy forward (one token of every decoding row per forward)
    and the reward models' forwards; each moves through its own steps, and a prompt that finishes
    makes room for the next at the following token. A prompt's answer does not depend on which
    prompts share its batch (:mod:`mahalo.engine.scheduler`).
    """

    max_prompts: int = 0
    """Prompts in flight at once, >= 0 (it bounds the KV they hold). 0 picks for the policy's
    device (``mahalo.engine.scheduler.DEVICE_LIMITS``: 64 on a CPU, 256 on a GPU)."""
    max_rows: int = 0
    """The budget of decoding rows, >= 0: rows fed at the next token (a new prompt's first step
    counts B*N). Rows that ended their step and wait for their siblings do not count, so more
    prompts join to keep the batch full. 0 picks for the device (256 on a CPU and a GPU); with
    ``engine.step_barrier`` it bounds all rows held, and 0 means no bound. When it is 0, one
    prompt's B*N is at most ``MAX_PROMPT_ROWS`` (1024)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.max_prompts) and self.max_prompts >= 0,
               f"max_prompts must be an integer >= 0 (0 = pick for the device), got {self.max_prompts!r}")
        _check(_is_int(self.max_rows) and self.max_rows >= 0,
               f"max_rows must be an integer >= 0 (0 = no limit), got {self.max_rows!r}")


@dataclass
class EngineConfig:
    """How the engine computes; none of these changes an answer (only what it costs)."""

    share_prefix: bool = True
    """Store a prompt's keys and values once for all its rows, a beam's accepted steps once for
    its candidates, and a prefix common to several prompts (a system turn) once for all of them
    (:mod:`mahalo.cascade`). False: every row holds a private copy of its prompt and beam, as a
    per-row cache does (an ablation)."""
    step_barrier: bool = False
    """Every prompt in flight waits for the others at each step: scoring, selection and admission
    happen only between global steps (the lockstep engine, kept as an ablation). False: each
    prompt moves through its own steps, and a prompt joins at the next token."""
    prefill_chunk: int = 512
    """Prompt tokens prefilled per forward at most, >= 1: a long prompt joins over several
    forwards, so the rows already decoding are never stalled by it."""
    compile: bool = False
    """Compile the policy's forward with ``torch.compile`` (dynamic shapes; the attention itself
    stays eager). Measured in benchmarks/README.md §4."""

    def __post_init__(self) -> None:
        for name in ("share_prefix", "step_barrier", "compile"):
            _check(isinstance(getattr(self, name), bool), f"engine.{name} must be true or false, got {getattr(self, name)!r}")
        _check(_is_int(self.prefill_chunk) and self.prefill_chunk >= 1,
               f"engine.prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")


@dataclass
class GuideConfig:
    """Everything :func:`mahalo.guided_generate` needs besides models and prompt."""

    search: SearchConfig = field(default_factory=SearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        b, n = self.search.shape
        _check(
            self.batch.max_rows == 0 or self.batch.max_rows >= b * n,
            f"max_rows ({self.batch.max_rows}) is below the {b * n} rows one prompt needs (B*N = {b}*{n}): "
            "raise max_rows or set it to 0",
        )
        _check(
            self.batch.max_rows > 0 or b * n <= MAX_PROMPT_ROWS,
            f"one prompt would hold B*N = {b}*{n} = {b * n} rows, above the default bound of {MAX_PROMPT_ROWS} "
            "(batch.max_rows=0): lower num_candidates or beam_width, or set max_rows to allow it",
        )
        _check(
            self.sampling.temperature > 0 or (b == 1 and n == 1),
            f"temperature=0 (greedy) makes all {b * n} candidates of {self.search.strategy} the same token for "
            f"token, at {b * n}x the cost of one: use temperature > 0, or strategy=sample, or "
            "num_candidates=1 and beam_width=1",
        )

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
    "dedupe": ("search", "dedupe"),
    "length_penalty": ("search", "length_penalty"),
    "prune": ("search", "prune"),
    "prune_every": ("search", "prune_every"),
    "prune_keep": ("search", "prune_keep"),
    "prune_by": ("search", "prune_by"),
    "stop_token_ids": ("sampling", "stop_token_ids"),
    "stop": ("sampling", "stop"),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "step": ("step", "kind"),
    "min_step_tokens": ("step", "min_step_tokens"),
    "max_step_tokens": ("step", "max_step_tokens"),
    "weights": ("objective", "weights"),
    "normalize": ("objective", "normalize"),
    "max_prompts": ("batch", "max_prompts"),
    "max_rows": ("batch", "max_rows"),
    "share_prefix": ("engine", "share_prefix"),
    "step_barrier": ("engine", "step_barrier"),
    "prefill_chunk": ("engine", "prefill_chunk"),
    "compile": ("engine", "compile"),
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
        "batch": dict(vars(base.batch)),
        "engine": dict(vars(base.engine)),
    }
    for key, value in options.items():
        section, name = OPTIONS[key]
        sections[section][name] = value
    return GuideConfig(
        search=SearchConfig(**sections["search"]),
        sampling=SamplingConfig(**sections["sampling"]),
        step=StepConfig(**sections["step"]),
        objective=ObjectiveConfig(**sections["objective"]),
        batch=BatchConfig(**sections["batch"]),
        engine=EngineConfig(**sections["engine"]),
    )
