"""``python -m mahalo.serve``: an OpenAI-compatible server with guidance per request.

    python -m mahalo.serve                                   # embedded models, 127.0.0.1:8000
    python -m mahalo.serve models=llama3_8b +objective=truth server.port=8080
    MAHALO_API_KEY=secret python -m mahalo.serve server.host=0.0.0.0

compose (Hydra) -> ServeConfig (typed, validated) -> load the models once -> one many-prompt
engine -> FastAPI on uvicorn. Requests: ``POST /v1/chat/completions`` (see
:mod:`mahalo.app.server`), ``GET /v1/models``, ``GET /health``. Bad configuration ends with one
line on stderr and exit code 2. Needs the ``serve`` extra: ``pip install 'mahalo[serve]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Any

from mahalo.app.compose import compose_config, group_options
from mahalo.app.config import ServeConfig, read_system_prompt
from mahalo.engine.scheduler import Engine

USAGE = __doc__.split("\n\n")[1]
GROUPS = ("models", "objective", "search")
log = logging.getLogger("mahalo.serve")


def compose_serve_config(overrides: list[str]) -> ServeConfig:
    """Compose ``conf/serve.yaml`` with ``overrides`` into a validated :class:`ServeConfig`.

    Raises:
        ValueError: an unknown group option, a bad override or an invalid value.
    """
    return compose_config(overrides, "serve", ServeConfig)


def require_server() -> None:
    """Raises ValueError naming the install command when FastAPI or uvicorn is missing."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed: pip install 'mahalo[serve]'")


def build_engine(cfg: ServeConfig) -> tuple[Engine, list[str]]:
    """Load the models once and start the engine; returns it and the objectives it can weight."""
    from mahalo.app.build import load_engine
    from mahalo.app.registry import check_provided

    objectives = check_provided(cfg.models, cfg.loaded_objectives())
    return load_engine(cfg, objectives), objectives


def build_server(cfg: ServeConfig, engine: Engine, objectives: list[str], system_prompt: str | None = None) -> Any:
    """The :class:`~mahalo.app.server.Server` of ``cfg`` on ``engine`` (``system_prompt``: the
    text of ``cfg.system_prompt``, read by :func:`read_system_prompt`)."""
    from mahalo.app.server import Server

    key = cfg.server.api_key or os.environ.get("MAHALO_API_KEY") or None
    return Server(engine, cfg.guide(), objectives, cfg.server, cfg.server.model_name or cfg.models.name, key,
                  system_prompt)


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit code (2: bad configuration)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\ngroups: " + "; ".join(f"{g}: {group_options(g)}" for g in GROUPS))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        require_server()
        cfg = compose_serve_config(argv)
        system = read_system_prompt(cfg.system_prompt)  # a missing file fails before the models load
        if not cfg.verbose:
            logging.getLogger().setLevel(logging.WARNING)
        engine, objectives = build_engine(cfg)
        server = build_server(cfg, engine, objectives, system)
    except ValueError as e:
        print(f"mahalo: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from mahalo.app.server import create_app

    where = f"http://{cfg.server.host}:{cfg.server.port}/v1"
    print(f"mahalo: serving {server.model_id} (objectives {objectives}) at {where}", file=sys.stderr, flush=True)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host=cfg.server.host, port=cfg.server.port,
                                        log_level="info" if cfg.verbose else "warning"))
    # The engine stopping on its own (a bug, out of memory) ends the process (exit 1), so that a
    # supervisor restarts it instead of a server that accepts requests it can never answer.
    engine.on_stop = lambda err: setattr(web, "should_exit", True)
    if engine.stopped is not None:  # stopped before the callback was set
        web.should_exit = True
    try:
        web.run()
    finally:
        engine.close()
    if engine.stopped is not None:
        err = engine.stopped
        print(f"mahalo: error: the engine stopped ({type(err).__name__}: {err}); exiting", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
