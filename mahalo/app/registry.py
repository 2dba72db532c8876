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

import torch

from mahalo.app import load, tiny
from mahalo.app.config import ModelConfig, ModelsConfig
from mahalo.policy import HFPolicy, Policy, as_policy
from mahalo.policy.multihead import load_multihead_state, mixing_weights
from mahalo.rewards import PROGRAMMATIC, RewardModel, SequenceClassifierReward, as_reward
from mahalo.rewards.judge import DEFAULT_QUESTION, judge_reward
from mahalo.rewards.probe import TokenProbeReward, probe_reward
from mahalo.rewards.seqcls import RewardOutput
from mahalo.rewards.shared_head import SharedHeadReward
from mahalo.rewards.step_prm import causal_lm_prm, token_classifier_prm
from mahalo.rewards.value_head import load_value_head, value_head_from, value_head_reward

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


def _multihead_policy(cfg: ModelConfig) -> Pair:
    """The base causal LM with the MAH-DPO checkpoint's backbone and its heads mixed into one."""
    mix = mixing_weights(cfg.num_heads, cfg.head_weights, cfg.head_index)
    state = load.multihead_checkpoint(cfg.path)
    model, tokenizer = load.load_causal_lm(cfg.base, None, cfg.dtype, cfg.device, cfg.attn_implementation)
    return load_multihead_state(model, state, cfg.num_heads, mix, cfg.path), tokenizer


POLICY_LOADERS: dict[str, Callable[[ModelConfig], Pair]] = {
    "hf": _hf_policy,
    "embedded": _embedded_policy,
    "tiny": _tiny_policy,
    "multihead": _multihead_policy,
}
REWARD_LOADERS: dict[str, Callable[[ModelConfig], Pair]] = {
    "hf": _hf_reward,
    "embedded": _embedded_reward,
    "tiny": _tiny_reward,
}


# The transformers class each reward family loads (kinds hf and embedded).
FAMILY_CLASSES = {
    "step_classifier": "AutoModelForTokenClassification",
    "step_lm": "AutoModelForCausalLM",
    "value_head": "AutoModel",
    "judge": "AutoModelForCausalLM",
}


def _family_model(cfg: ModelConfig) -> Pair:
    """The model of a non-classifier reward family, by kind."""
    if cfg.kind == "tiny":
        if cfg.family == "step_classifier":
            return _placed(tiny.tiny_token_classifier(seed=cfg.seed, tag=cfg.step_tag or "<extra_0>"), cfg)
        if cfg.family == "value_head":
            tag = (cfg.step_tag or "<extra_0>") if cfg.read_at == "steps" else None
            return _placed(tiny.tiny_backbone(seed=cfg.seed, tag=tag), cfg)
        return _placed(tiny.tiny_policy(seed=cfg.seed), cfg)
    auto_class = FAMILY_CLASSES[cfg.family]
    extra = {"num_labels": 2} if cfg.family == "step_classifier" and not cfg.trust_remote_code else {}
    if cfg.family == "step_classifier" and cfg.trust_remote_code:
        auto_class = "AutoModel"  # Qwen2.5-Math-PRM: its own Qwen2ForProcessRewardModel
    if cfg.kind == "embedded":
        gguf = load.find_embedded_gguf()
        path, gguf_file = str(gguf.parent), gguf.name
    else:
        path, gguf_file = cfg.path, cfg.gguf_file
    return load.load_pretrained(auto_class, path, gguf_file, cfg.dtype, cfg.device, cfg.attn_implementation,
                                cfg.device_map, cfg.max_memory, cfg.trust_remote_code, **extra)


def shares_policy_backbone(policy: ModelConfig, reward: ModelConfig) -> bool:
    """Is ``reward`` a head on exactly the policy's backbone (same checkpoint, dtype, device and
    attention, one device each)? Then :class:`SharedHeadReward` scores it without a second model."""
    head = reward.head_file is not None or reward.kind == "embedded"
    same = all(getattr(policy, f) == getattr(reward, f) for f in ("kind", "path", "gguf_file", "dtype", "device",
                                                                  "attn_implementation"))
    return (
        reward.family == "classifier" and reward.outputs is None and head and same
        and policy.kind in ("embedded", "hf") and policy.device_map is None and reward.device_map is None
    )


def build_reward(cfg: ModelConfig, policy_cfg: ModelConfig, policy: Pair, where: str) -> RewardModel:
    """The reward adapter of one ``models.rewards`` entry (``where``: its key, for messages)."""
    if cfg.family == "probe":
        return _probe(cfg, policy_cfg, policy, where)
    if cfg.family == "classifier":
        shared = shares_policy_backbone(policy_cfg, cfg)
        if cfg.share_backbone and not shared:
            raise ValueError(
                f"{where}.share_backbone=true needs a head_file on the policy's own checkpoint (same kind, path, "
                "dtype, device and attention, no device_map): set it to null or false"
            )
        if shared and cfg.share_backbone is not False:
            head_file = cfg.head_file or str(load.EMBEDDED_TRUTH_HEAD)
            weight = load.read_head_weight(head_file, cfg.num_labels)  # (num_labels, H)
            model = policy[0]
            head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            head.weight.data.copy_(weight)
            param = next(model.parameters())
            head = head.to(param.device, param.dtype).requires_grad_(False)
            log.info("%s: a head on the policy's backbone (no second model)", where)
            return SharedHeadReward(HFPolicy(*policy), head, cfg.num_labels, score_at_of(cfg))
        pair = REWARD_LOADERS[cfg.kind](cfg)
        return SequenceClassifierReward(*pair, score_at=score_at_of(cfg), outputs=cfg.outputs is not None)
    head_file = None
    if cfg.family == "value_head" and cfg.head_file is not None:  # before the model: a missing head fails fast
        head_file = load.repository_file(cfg.path if cfg.kind == "hf" else "", cfg.head_file, "value head file")
    model, tokenizer = _family_model(cfg)
    if cfg.family == "step_classifier":
        return token_classifier_prm(model, tokenizer, cfg.step_tag or "<extra_0>", cfg.aggregate, cfg.step_join or "")
    if cfg.family == "step_lm":
        return causal_lm_prm(model, tokenizer, cfg.step_tag or " ки", cfg.good_token, cfg.bad_token, cfg.aggregate,
                             "\n" if cfg.step_join is None else cfg.step_join, cfg.step_template or "plain")
    if cfg.family == "value_head":
        hidden = int(model.config.hidden_size)
        if head_file is None:
            head = value_head_from(tiny.tiny_value_head(seed=cfg.seed + 1, hidden_size=hidden), hidden)
        else:
            head = load_value_head(head_file, hidden)
        return value_head_reward(model, tokenizer, head, cfg.read_at or "last_token", cfg.step_tag or "<extra_0>",
                                 cfg.aggregate)
    return judge_reward(model, tokenizer, cfg.judge_question or DEFAULT_QUESTION, cfg.yes_token, cfg.no_token)


def _probe(cfg: ModelConfig, policy_cfg: ModelConfig, policy: Pair, where: str) -> RewardModel:
    """A probe on the policy's own hidden states (no model of its own, so its ``kind`` is not
    read): ``head_file``, else the embedded truth probe for the embedded policy, else (a ``tiny``
    policy) a random probe on its middle layer."""
    if cfg.head_file is not None:
        return probe_reward(policy, cfg.head_file)
    if policy_cfg.kind == "tiny":
        config = policy[0].config
        weight = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(cfg.seed + 7))
        param = next(policy[0].parameters())
        return TokenProbeReward(weight, 0.0, max(1, config.num_hidden_layers // 2)).to(param.device, param.dtype)
    if policy_cfg.kind == "embedded":
        return probe_reward(policy)
    raise ValueError(
        f"{where}.head_file is needed: the embedded truth probe fits only the embedded policy; train a probe for "
        f"this policy (scripts/probe_study.py export) and give its file")


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
        found = cfg.provider(name)
        if found is None:
            continue
        entry, column = found
        rcfg = cfg.rewards[entry]
        key = repr(rcfg)
        if key not in loaded:
            log.info("loading reward model %r (%s, %s)", entry, rcfg.kind, rcfg.family)
            loaded[key] = build_reward(rcfg, cfg.policy, policy, f"models.rewards.{entry}")
        rewards[name] = loaded[key] if column is None else RewardOutput(loaded[key], column)
    return LoadedModels(policy, rewards)


def check_provided(cfg: ModelsConfig, objectives: list[str]) -> list[str]:
    """``objectives``, each provided by a reward model of ``cfg`` or programmatic.

    Raises:
        ValueError: an objective neither provides, naming what ``cfg`` has.
    """
    for name in objectives:
        if cfg.provider(name) is None and name not in PROGRAMMATIC:
            raise ValueError(
                f"objective {name!r} needs a reward model that models={cfg.name} does not provide "
                f"(it has {sorted(cfg.objectives())}; programmatic: {sorted(PROGRAMMATIC)})"
            )
    return list(objectives)


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
    entries = {found[0] for found in map(cfg.provider, objectives) if found is not None}
    models = [(cfg.policy, False)] + [(cfg.rewards[k], True) for k in sorted(entries)]
    for model, reward in models:
        if model.kind == "embedded":
            load.find_embedded_gguf()
        if model.kind == "multihead":
            load._check_local(model.base)
            if load._looks_local(model.path) and not Path(model.path).expanduser().exists():
                raise ValueError(f"multi-head checkpoint not found: {model.path} (give the MAH-DPO policy.pt)")
        if model.kind == "hf":
            if model.gguf_file is None:
                load._check_local(model.path)
            elif load._check_local(model.path) is not None or Path(model.gguf_file).expanduser().is_absolute():
                load._gguf_path(model.path, model.gguf_file)
        head = model.head_file if reward and model.kind != "tiny" else None
        if head is not None and model.family == "value_head" and model.kind == "hf":
            if load._check_local(model.path) is not None:  # a hub repository's file is fetched at load time
                load.repository_file(model.path, head, "value head file")
        elif head is not None and not Path(head).expanduser().is_file():
            raise ValueError(f"{'value' if model.family == 'value_head' else 'score'} head file not found: {head}")
