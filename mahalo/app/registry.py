"""Build the models a :class:`~mahalo.app.config.ModelsConfig` names, by kind, from a registry.

The policy comes back as a ``(model, tokenizer)`` pair; each reward model as a ready
:class:`~mahalo.rewards.RewardModel` adapter that reads the conversation where its checkpoint was
trained to (``score_at``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mahalo.app import load, tiny
from mahalo.app.config import ModelConfig, ModelsConfig
from mahalo.policy import Policy, as_policy
from mahalo.rewards import PROGRAMMATIC, RewardModel, SequenceClassifierReward, as_reward

log = logging.getLogger(__name__)

Pair = tuple[Any, Any]  # (model, tokenizer)


def _hf_policy(cfg: ModelConfig) -> Pair:
    return load.load_causal_lm(cfg.path, cfg.gguf_file, cfg.dtype, cfg.device, cfg.attn_implementation,
                               cfg.device_map, cfg.max_memory)


def _hf_reward(cfg: ModelConfig) -> Pair:
    return load.load_reward_model(cfg.path, cfg.gguf_file, cfg.head_file, cfg.num_labels, cfg.dtype, cfg.device,
                                  cfg.attn_implementation, cfg.device_map, cfg.max_memory)


def _embedded_policy(cfg: ModelConfig) -> Pair:
    gguf = load.find_embedded_gguf()
    return load.load_causal_lm(str(gguf.parent), gguf.name, cfg.dtype, cfg.device, cfg.attn_implementation,
                               cfg.device_map, cfg.max_memory)


def _embedded_reward(cfg: ModelConfig) -> Pair:
    gguf = load.find_embedded_gguf()
    head = cfg.head_file or str(load.EMBEDDED_TRUTH_HEAD)
    return load.load_reward_model(str(gguf.parent), gguf.name, head, cfg.num_labels, cfg.dtype, cfg.device,
                                  cfg.attn_implementation, cfg.device_map, cfg.max_memory)


def _placed(pair: Pair, cfg: ModelConfig) -> Pair:
    """A tiny model on ``cfg``'s device and dtype (``auto``: its own float32)."""
    dtype = load.resolve_dtype(cfg.dtype)
    model = pair[0].to(load.resolve_device(cfg.device))
    return (model if dtype == "auto" else model.to(dtype)), pair[1]


def _tiny_policy(cfg: ModelConfig) -> Pair:
    return _placed(tiny.tiny_policy(seed=cfg.seed), cfg)


def _tiny_reward(cfg: ModelConfig) -> Pair:
    return _placed(tiny.tiny_reward(seed=cfg.seed, num_labels=cfg.num_labels), cfg)


POLICY_LOADERS: dict[str, Callable[[ModelConfig], Pair]] = {
    "hf": _hf_policy,
    "embedded": _embedded_policy,
    "tiny": _tiny_policy,
}
REWARD_LOADERS: dict[str, Callable[[ModelConfig], Pair]] = {
    "hf": _hf_reward,
    "embedded": _embedded_reward,
    "tiny": _tiny_reward,
}


def head_score_at(head_file: str | Path) -> str | None:
    """The ``score_at`` a head file's metadata (``<head>.json`` beside it) declares, if any."""
    meta = Path(head_file).with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("score_at")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def score_at_of(cfg: ModelConfig) -> str:
    """Where a reward model reads the conversation: the config's choice, else its head file's
    declared point (the embedded truth head: ``end_of_turn``), else ``last_token``."""
    if cfg.score_at is not None:
        return cfg.score_at
    head = cfg.head_file or (str(load.EMBEDDED_TRUTH_HEAD) if cfg.kind == "embedded" else None)
    return (head_score_at(head) if head else None) or "last_token"


@dataclass
class LoadedModels:
    """The policy pair and one reward adapter per model-backed objective."""

    policy: Pair
    rewards: dict[str, RewardModel]


def load_models(cfg: ModelsConfig, objectives: list[str]) -> LoadedModels:
    """Load the policy and the reward models of ``objectives`` that ``cfg`` provides.

    Objectives that ``cfg.rewards`` does not name are left to the caller (programmatic ones).
    Identical reward configs are loaded once and shared.
    """
    policy = POLICY_LOADERS[cfg.policy.kind](cfg.policy)
    rewards: dict[str, RewardModel] = {}
    loaded: dict[str, RewardModel] = {}
    for name in objectives:
        if name not in cfg.rewards:
            continue
        rcfg = cfg.rewards[name]
        key = repr(rcfg)
        if key not in loaded:
            log.info("loading reward model %r (%s)", name, rcfg.kind)
            loaded[key] = SequenceClassifierReward(*REWARD_LOADERS[rcfg.kind](rcfg), score_at=score_at_of(rcfg))
        rewards[name] = loaded[key]
    return LoadedModels(policy, rewards)


def load_guide(cfg: ModelsConfig, objectives: list[str]) -> tuple[Policy, dict[str, RewardModel]]:
    """The policy and one reward per objective, ready for the engine: model-backed ones loaded
    from ``cfg``, the rest programmatic (:data:`mahalo.rewards.PROGRAMMATIC`)."""
    models = load_models(cfg, objectives)
    prms = {n: as_reward(models.rewards.get(n) or PROGRAMMATIC[n], n) for n in objectives}
    return as_policy(models.policy), prms


def check_sources(cfg: ModelsConfig, objectives: list[str]) -> None:
    """Cheap checks that the models ``objectives`` need exist on this machine, without loading
    them: local paths, GGUF and head files, the embedded package. (Run where the models will be
    loaded: before Ray replicas start on this machine.)

    Raises:
        ValueError: the first missing file, with the fix.
    """
    models = [(cfg.policy, False)] + [(cfg.rewards[n], True) for n in objectives if n in cfg.rewards]
    for model, reward in models:
        if model.kind == "embedded":
            load.find_embedded_gguf()
        if model.kind == "hf":
            if model.gguf_file is None:
                load._check_local(model.path)
            elif load._check_local(model.path) is not None or Path(model.gguf_file).expanduser().is_absolute():
                load._gguf_path(model.path, model.gguf_file)
        head = model.head_file if reward and model.kind != "tiny" else None
        if head is not None and not Path(head).expanduser().is_file():
            raise ValueError(f"score head file not found: {head}")
