"""``python -m mahalo.decode``: the command line (the only module that imports Hydra).

    python -m mahalo.decode +objective=truth prompt="Can you see the Great Wall from space?"
    python -m mahalo.decode +objective=truth_concise prompts=qs.jsonl output=out.jsonl
    python -m mahalo.decode +objective=human_values models=llama3_8b search=step_beam

compose (Hydra) -> RunConfig (typed, validated) -> load models -> guided_generate per prompt
-> JSONL records -> rich summary. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mahalo.api import guided_generate
from mahalo.app.config import RunConfig
from mahalo.app.io import PromptItem, ResultWriter, done_keys, pending, read_prompts
from mahalo.app.registry import load_models
from mahalo.policy import as_policy
from mahalo.result import GuidedResult
from mahalo.rewards import PROGRAMMATIC, as_reward

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("models", "objective", "search")
USAGE = __doc__.split("\n\n")[1]
log = logging.getLogger("mahalo")


# --------------------------------------------------------------------------- compose


def group_options(group: str) -> list[str]:
    """The config names available in a group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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


def compose_config(overrides: list[str]) -> RunConfig:
    """Compose ``conf/decode.yaml`` with ``overrides`` into a validated :class:`RunConfig`.

    Raises:
        ValueError: an unknown group option, a bad override or an invalid value.
    """
    _check_group_overrides(overrides)
    # The typed schema is the first default of decode.yaml: every key exists and is type-checked.
    ConfigStore.instance().store(name="decode_schema", node=RunConfig)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="decode", overrides=overrides)
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


# --------------------------------------------------------------------------- run


def _resolve_objectives(cfg: RunConfig) -> list[str]:
    names = list(cfg.objective.weights)
    for name in names:
        if name not in cfg.models.rewards and name not in PROGRAMMATIC:
            raise ValueError(
                f"objective {name!r} needs a reward model that models={cfg.models.name} does not provide "
                f"(it has {sorted(cfg.models.rewards)}; programmatic: {sorted(PROGRAMMATIC)})"
            )
    if not names and cfg.search.strategy != "sample":
        log.info("no objective: unguided sampling (add +objective=truth to guide)")
        cfg.search.strategy = "sample"
    return names


def _record(item: PromptItem, res: GuidedResult, cfg: RunConfig) -> dict[str, Any]:
    return {
        "index": item.index,
        "prompt": item.prompt,
        "text": res.text,
        "stop_reason": res.stop_reason,
        "scores": res.scores,
        "stats": {**asdict(res.stats), "tokens_per_s": res.stats.tokens_per_s},
        "steps": [asdict(s) for s in res.steps],
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }


def run(cfg: RunConfig, console: Console) -> list[GuidedResult]:
    """Answer every pending prompt of ``cfg``; returns the new results."""
    objectives = _resolve_objectives(cfg)
    items = [PromptItem(0, cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts, cfg.prompt_field)
    todo = list(pending(items, done_keys(cfg.output)))
    if len(todo) < len(items):
        console.print(f"resuming: {len(items) - len(todo)} of {len(items)} prompts already in {cfg.output}", style="dim")
    if not todo:
        return []
    t0 = time.perf_counter()
    models = load_models(cfg.models, objectives)
    console.print(f"models loaded in {time.perf_counter() - t0:.1f} s", style="dim")
    policy = as_policy(models.policy)
    prms = {n: as_reward(models.rewards.get(n) or PROGRAMMATIC[n], n) for n in objectives}
    guide, results = cfg.guide(), []
    with ResultWriter(cfg.output) as writer, _progress(console, len(todo) > 1) as bar:
        task = bar.add_task("decoding", total=len(todo))
        for item in todo:
            res = guided_generate(policy, prms, item.prompt, config=guide)
            writer.write(_record(item, res, cfg))
            results.append(res)
            bar.advance(task)
    return results


def _progress(console: Console, show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not show, transient=False,
    )


# --------------------------------------------------------------------------- report


def show_single(res: GuidedResult, console: Console, verbose: bool) -> None:
    """Print one answer, and its steps with ``verbose``."""
    console.print(res.text, markup=False, highlight=False)
    scores = ", ".join(f"{k}={v:.3f}" for k, v in res.scores.items())
    s = res.stats
    console.print(
        f"[dim]{s.response_tokens} tokens, {s.steps} steps, {s.wall_s:.2f} s ({s.tokens_per_s:.1f} tok/s), "
        f"stop={res.stop_reason}{', ' + scores if scores else ''}[/dim]"
    )
    if verbose:
        console.print(_steps_table(res))


def _steps_table(res: GuidedResult) -> Table:
    objectives = list(res.scores)
    table = Table(title="steps (kept candidate)")
    for col in ["step", "kept", *objectives, "combined", "text"]:
        table.add_column(col, overflow="fold")
    for i, step in enumerate(res.steps):
        kept = step.chosen if isinstance(step.chosen, list) else [step.chosen]
        for k in kept:
            c = step.candidates[k]
            table.add_row(
                str(i), f"{k}/{len(step.candidates)}",
                *[f"{c.scores[o]:.3f}" for o in objectives], f"{c.combined:.3f}", repr(c.text),
            )
    return table


def show_summary(results: list[GuidedResult], console: Console) -> None:
    """A table over all prompts: count, mean reward per objective, tokens/s, time."""
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prompts", str(len(results)))
    for name in results[0].scores:
        mean = sum(r.scores[name] for r in results) / len(results)
        table.add_row(f"mean {name}", f"{mean:.3f}")
    tokens = sum(r.stats.response_tokens for r in results)
    wall = sum(r.stats.wall_s for r in results)
    table.add_row("response tokens/s", f"{tokens / wall:.1f}" if wall else "-")
    table.add_row("seconds per prompt", f"{wall / len(results):.2f}")
    table.add_row("total seconds", f"{wall:.1f}")
    console.print(table)


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\ngroups: " + "; ".join(f"{g}: {group_options(g)}" for g in GROUPS))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        cfg = compose_config(argv)
        results = run(cfg, console)
    except ValueError as e:
        print(f"mahalo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mahalo: interrupted; finished prompts are saved, re-run the same command to resume", file=sys.stderr)
        return 130
    if cfg.prompt is not None and results:
        show_single(results[0], console, cfg.verbose)
    elif results:
        show_summary(results, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
