"""From a config to a running engine: load the models, then build the engine the one way
(:mod:`mahalo.engine.build`). The server and Ray replicas start here; the command line's local
launcher goes through the library (:func:`mahalo.guided_generate_many`), which builds it the
same way."""

from __future__ import annotations

from collections.abc import Callable

from mahalo.app.config import GuidedModels
from mahalo.app.registry import load_guide
from mahalo.engine.build import engine_of
from mahalo.engine.scheduler import Engine


def load_engine(cfg: GuidedModels, objectives: list[str],
                on_stop: Callable[[BaseException], None] | None = None) -> Engine:
    """Load the policy and the reward models of ``objectives`` from ``cfg.models`` and start a
    threaded engine with ``cfg``'s options and limits.

    Raises:
        ValueError: a model that cannot be loaded or used, naming it.
    """
    policy, prms = load_guide(cfg.models, objectives)
    return engine_of(policy, prms, cfg.guide(), on_stop)
