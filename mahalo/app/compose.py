"""Hydra at the edge: compose ``conf/`` with command-line overrides into a typed, validated config.

The only module that imports Hydra. ``python -m mahalo.decode`` composes ``conf/decode.yaml``
into :class:`~mahalo.app.config.RunConfig`, ``python -m mahalo.serve`` composes
``conf/serve.yaml`` into :class:`~mahalo.app.config.ServeConfig`; library code never sees a
DictConfig (``OmegaConf.to_object`` into the dataclasses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mahalo.app.config import RunConfig


def _conf_dir() -> Path:
    """``conf/``: shipped inside the package by a wheel (``mahalo/conf``), at the repository's top
    level in a checkout or an editable install."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "conf"
    return shipped if (shipped / "decode.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
GROUPS = ("models", "objective", "search", "launcher")


def group_options(group: str) -> list[str]:
    """The config names available in a group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def preset_model(name: str) -> str:
    """The served model name of search preset ``name``: ``step_beam`` -> ``mahalo-step-beam``."""
    return "mahalo-" + name.replace("_", "-")


def search_presets() -> dict[str, dict[str, Any]]:
    """Served model name -> the search settings of its preset, one per ``conf/search/*.yaml``
    (the files ``search=NAME`` composes), in name order."""
    return {preset_model(p.stem): OmegaConf.to_container(OmegaConf.load(p), resolve=True)
            for p in sorted((CONF_DIR / "search").glob("*.yaml"))}


def _check_group_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.lstrip("+~")
        if not sep or group not in GROUPS:
            continue
        if group == "objective" and not key.startswith("+"):
            raise ValueError(f"write +objective={value} (objective is appended, not in the defaults list)")
        if value not in group_options(group):
            raise ValueError(f"unknown {group} {value!r}: choose one of {group_options(group)}")


def compose_config(overrides: list[str], config_name: str = "decode", schema: type = RunConfig) -> Any:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` into a validated ``schema``
    (:class:`RunConfig` for the CLI; ``mahalo.serve`` composes ``serve.yaml`` the same way).

    Raises:
        ValueError: an unknown group option, a bad override or an invalid value.
    """
    _check_group_overrides(overrides)
    # The typed schema is the first default of the yaml file: every key exists and is type-checked.
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(_one_line(err)) from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _one_line(err: BaseException) -> str:
    """One line from a Hydra/OmegaConf error: its first line, the cause's, and a hint."""
    line = _first_line(err)
    if err.__cause__ is not None:
        line += f": {_first_line(err.__cause__)}"
    if line.startswith("Could not override"):
        line += " The key is not in the config: check its spelling (python -m mahalo.decode --help)"
    return line
