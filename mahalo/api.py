"""The public library entry: :func:`guided_generate`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mahalo.chat import Messages, as_messages
from mahalo.config import GuideConfig, config_from_options
from mahalo.engine.controller import Controller
from mahalo.policy import as_policy
from mahalo.result import GuidedResult
from mahalo.rewards import as_reward


def guided_generate(
    policy: Any,
    prms: Mapping[str, Any] | None,
    prompt: str | Messages,
    *,
    config: GuideConfig | None = None,
    **options: Any,
) -> GuidedResult:
    """Answer ``prompt`` with ``policy``, guided step by step by the reward models ``prms``.

    Args:
        policy: a :class:`mahalo.policy.Policy` or a ``(causal LM, tokenizer)`` pair.
        prms: objective name -> reward model: a :class:`mahalo.rewards.RewardModel`, a
            ``(sequence-classification model, tokenizer)`` pair, or a callable
            ``(prompt, response) -> float``. Empty or None: unguided decoding.
        prompt: a user message, or a list of chat messages; the policy's chat template is applied.
        config: a base :class:`GuideConfig` (defaults: MAHALO's step best-of-5); ``options``
            override its fields.
        **options: ``strategy``, ``num_candidates``, ``beam_width``, ``weights``, ``normalize``,
            ``temperature``, ``top_k``, ``top_p``, ``step``, ``min_step_tokens``,
            ``max_step_tokens``, ``max_new_tokens``, ``seed`` (see :mod:`mahalo.config`).

    Returns:
        a :class:`GuidedResult`: the text, every step's candidates and scores, and the cost.

    Raises:
        ValueError: an invalid option, prompt, model or weight; the message says which.
    """
    cfg = config_from_options(config, **options)
    prms = dict(prms or {})
    rewards = {name: as_reward(obj, name) for name, obj in prms.items()}
    controller = Controller(as_policy(policy), rewards, cfg)
    return controller.run(as_messages(prompt))
