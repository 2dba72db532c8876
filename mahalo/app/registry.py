"""Build the models a :class:`~mahalo.config.ModelsConfig` names, by kind, from a registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from mahalo.app import load, tiny
from mahalo.app.config import ModelConfig, ModelsConfig

log = logging.getLogger(__name__)

Pair = tuple[Any, Any]  # (model, tokenizer)


def _hf_policy(cfg: ModelConfig) -> Pair:
    return load.load_causal_lm(cfg.path, cfg.gguf_file, cfg.dtype, cfg.device)


def _hf_reward(cfg: ModelConfig) -> Pair:
    return load.load_reward_model(cfg.path, cfg.gguf_file, cfg.head_file, cfg.num_labels, cfg.dtype, cfg.device)


def _embedded_policy(cfg: ModelConfig) -> Pair:
    gguf = load.find_embedded_gguf()
    return load.load_causal_lm(str(gguf.parent), gguf.name, cfg.dtype, cfg.device)


def _embedded_reward(cfg: ModelConfig) -> Pair:
    gguf = load.find_embedded_gguf()
    head = cfg.head_file or str(load.EMBEDDED_TRUTH_HEAD)
    return load.load_reward_model(str(gguf.parent), gguf.name, head, cfg.num_labels, cfg.dtype, cfg.device)


def _tiny_policy(cfg: ModelConfig) -> Pair:
    return tiny.tiny_policy(seed=cfg.seed)


def _tiny_reward(cfg: ModelConfig) -> Pair:
    return tiny.tiny_reward(seed=cfg.seed, num_labels=cfg.num_labels)


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


@dataclass
class LoadedModels:
    """The policy pair and one reward pair per model-backed objective."""

    policy: Pair
    rewards: dict[str, Pair]


def load_models(cfg: ModelsConfig, objectives: list[str]) -> LoadedModels:
    """Load the policy and the reward models of ``objectives`` that ``cfg`` provides.

    Objectives that ``cfg.rewards`` does not name are left to the caller (programmatic ones).
    Identical reward configs are loaded once and shared.
    """
    policy = POLICY_LOADERS[cfg.policy.kind](cfg.policy)
    rewards: dict[str, Pair] = {}
    loaded: dict[str, Pair] = {}
    for name in objectives:
        if name not in cfg.rewards:
            continue
        rcfg = cfg.rewards[name]
        key = repr(rcfg)
        if key not in loaded:
            log.info("loading reward model %r (%s)", name, rcfg.kind)
            loaded[key] = REWARD_LOADERS[rcfg.kind](rcfg)
        rewards[name] = loaded[key]
    return LoadedModels(policy, rewards)
