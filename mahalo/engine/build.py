"""One way to build the engine, for the library, the command line, the server and Ray replicas.

    controller_of(policy, prms, cfg)   a policy and reward models (objects, pairs or functions) ->
                                       the step loop (mahalo.engine.controller)
    engine_of(policy, prms, cfg)       the same behind a thread, fed from any thread
                                       (mahalo.engine.scheduler.Engine: servers, Ray replicas)

``mahalo.app.build`` loads models from a config and calls these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mahalo.config import GuideConfig
from mahalo.engine.controller import Controller
from mahalo.engine.scheduler import Engine
from mahalo.policy import as_policy
from mahalo.rewards import as_reward


def controller_of(policy: Any, prms: Mapping[str, Any] | None, cfg: GuideConfig) -> Controller:
    """The controller of ``policy`` (a Policy or a (causal LM, tokenizer) pair) guided by ``prms``
    (objective -> reward model, (model, tokenizer) pair or function), decoding with ``cfg``.

    Raises:
        ValueError: a model or option the engine cannot use, naming it.
    """
    rewards = {name: as_reward(obj, name) for name, obj in dict(prms or {}).items()}
    policy = as_policy(policy)
    if cfg.engine.compile:
        if not hasattr(policy, "compile"):
            raise ValueError(f"engine.compile=true: {type(policy).__name__} cannot be compiled")
        policy.compile()
    return Controller(policy, rewards, cfg)


def engine_of(policy: Any, prms: Mapping[str, Any] | None, cfg: GuideConfig,
              on_stop: Callable[[BaseException], None] | None = None) -> Engine:
    """A threaded :class:`Engine` on :func:`controller_of`, within ``cfg.batch``'s limits."""
    return Engine(controller_of(policy, prms, cfg), cfg.batch.max_prompts, cfg.batch.max_rows, on_stop)
