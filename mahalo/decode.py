"""``python -m mahalo.decode``: the command line (the only module that imports Hydra).

    python -m mahalo.decode +objective=truth prompt="Can you see the Great Wall from space?"
    python -m mahalo.decode +objective=truth_concise prompts=qs.jsonl output=out.jsonl
    python -m mahalo.decode +objective=human_values models=llama3_8b search=step_beam

compose (Hydra) -> RunConfig (typed, validated) -> load models -> guided_generate_many (prompts in flight)
-> JSONL records -> rich summary. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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

from mahalo.api import guided_generate_many
from mahalo.app.config import RESUMABLE_KEYS, RunConfig, read_system_prompt
from mahalo.app.io import (
    Existing,
    PromptItem,
    ResultWriter,
    check_output,
    config_changes,
    existing,
    foreign,
    pending,
    read_prompts,
)
from mahalo.app.registry import check_provided, check_sources, load_guide
from mahalo.chat import as_messages, with_system
from mahalo.launch import Unanswered
from mahalo.result import GuidedResult


def _conf_dir() -> Path:
    """``conf/``: shipped inside the package by a wheel (``mahalo/conf``), at the repository's top
    level in a checkout or an editable install."""
    package = Path(__file__).resolve().parent
    shipped = package / "conf"
    return shipped if (shipped / "decode.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
GROUPS = ("models", "objective", "search", "launcher")
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


# --------------------------------------------------------------------------- run


def _resolve_objectives(cfg: RunConfig) -> list[str]:
    return check_provided(cfg.models, list(cfg.objective.weights))


def _record(item: PromptItem, res: GuidedResult, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": item.index,
        "prompt": item.prompt,
        **item.input_fields(),
        "text": res.text,
        "stop_reason": res.stop_reason,
        "scores": res.scores,
        "stats": {**asdict(res.stats), "tokens_per_s": res.stats.tokens_per_s},
        "steps": [asdict(s) for s in res.steps],
        "config": config,
    }


def _error_record(item: PromptItem, error: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"index": item.index, "prompt": item.prompt, **item.input_fields(), "error": error, "config": config}


@dataclass
class Outcome:
    """What one CLI run did: the new results and the prompts that failed (index, message)."""

    results: list[GuidedResult] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    elapsed_s: float = 0.0  # decoding (local: models loaded; ray: replicas start inside it)
    unanswered: str = ""  # ray: why some prompts got no record (a re-run retries them)


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _check_resume(cfg: RunConfig, found: Existing, config: dict[str, Any], items: list[PromptItem]) -> None:
    """Appending to ``cfg.output`` must continue the same run: its records answer these prompts
    (same index, same text) with this config. ``resume=force`` appends anyway."""
    if cfg.resume == "force":
        return
    other = foreign(items, found.keys)
    if other is not None:
        index, prompt = other
        given = {it.index: it.prompt for it in items}
        if cfg.prompt is not None and index in given:
            ours = f"not prompt={_short(cfg.prompt)}"
        elif cfg.prompt is not None:
            ours = "but prompt=\"...\" is one prompt (index 0)"
        elif index in given:
            ours = f"not {_short(given[index])} of {cfg.prompts}"
        else:
            ours = f"but {cfg.prompts} has {len(items)} prompt{'s' * (len(items) != 1)}"
        raise ValueError(
            f"{cfg.output} holds answers to other prompts (index {index} is {_short(prompt)}, {ours}): use another "
            "output file, or add resume=force to append anyway"
        )
    if found.config is None:
        return
    changes = config_changes(found.config, config, RESUMABLE_KEYS)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise ValueError(
            f"{cfg.output} was written with another config ({shown}): use another output file, "
            "or add resume=force to append to it anyway"
        )


def run(cfg: RunConfig, console: Console) -> Outcome:
    """Answer every pending prompt of ``cfg``, here or on Ray replicas (``cfg.launcher``); this
    process writes every record either way.

    A prompt whose decode raises ``ValueError`` (a reward model's NaN, a prompt longer than the
    context) gets an error record and the run goes on.
    """
    objectives = _resolve_objectives(cfg)
    system = read_system_prompt(cfg.system_prompt)
    check_output(cfg.output)
    items = [PromptItem(0, cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts, cfg.prompt_field)
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    found = existing(cfg.output)
    _check_resume(cfg, found, config, items)
    todo = list(pending(items, found.keys))
    if len(todo) < len(items):
        console.print(f"resuming: {len(items) - len(todo)} of {len(items)} prompts already in {cfg.output}", style="dim")
    outcome = Outcome()
    if not todo:
        return outcome
    launch = _on_ray if cfg.launcher.kind == "ray" else _here
    prompts = [with_system(as_messages(it.conversation), system) for it in todo]
    answers = launch(cfg, objectives, prompts, console)  # bad options raise here
    t1 = time.perf_counter()
    with ResultWriter(cfg.output) as writer, _progress(console, len(todo) > 1) as bar:
        task = bar.add_task("decoding", total=len(todo))
        try:
            for k, res, extra in answers:  # as each prompt finishes
                item = todo[k]
                if isinstance(res, ValueError):
                    print(f"mahalo: error: prompt {item.index}: {res}", file=sys.stderr)
                    writer.write({**_error_record(item, str(res), config), **extra})
                    outcome.errors.append((item.index, str(res)))
                else:
                    writer.write({**_record(item, res, config), **extra})
                    outcome.results.append(res)
                bar.advance(task)
        except Unanswered as err:
            outcome.unanswered = str(err)
    outcome.elapsed_s = time.perf_counter() - t1
    return outcome


Answers = Iterator[tuple[int, GuidedResult | ValueError, dict[str, Any]]]


def _here(cfg: RunConfig, objectives: list[str], prompts: list[Any], console: Console) -> Answers:
    """``launcher=local``: load the models in this process, decode with many prompts in flight."""
    t0 = time.perf_counter()
    policy, prms = load_guide(cfg.models, objectives)
    console.print(f"models loaded in {time.perf_counter() - t0:.1f} s", style="dim")
    answers = guided_generate_many(policy, prms, prompts, config=cfg.guide(), errors="return")
    return ((k, res, {}) for k, res in answers)


def _on_ray(cfg: RunConfig, objectives: list[str], prompts: list[Any], console: Console) -> Answers:
    """``launcher=ray``: join the cluster and check the options now; replicas load the models."""
    from mahalo.launch import ray as on_ray

    on_ray.require_ray()
    on_ray.check_models(cfg, objectives)
    if cfg.launcher.address is None:  # the replicas will run here: their model files must exist here
        check_sources(cfg.models, objectives)
    t0 = time.perf_counter()
    cluster = on_ray.connect(cfg.launcher)
    lc = cfg.launcher
    console.print(
        f"ray: {lc.replicas} replicas x ({lc.cpus_per_replica:g} CPU, {lc.gpus_per_replica:g} GPU) on a cluster of "
        f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs (joined in {time.perf_counter() - t0:.1f} s)", style="dim",
    )

    def answers() -> Answers:
        try:
            for a in on_ray.answer_many(cfg, objectives, prompts, cluster):
                yield a.k, a.result, {"replica": a.replica, "attempt": a.attempt}
        finally:
            cluster.close()

    return answers()


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


def show_summary(results: list[GuidedResult], console: Console, errors: int = 0, elapsed: float = 0.0) -> None:
    """A table over all prompts: count, errors, mean reward per objective, throughput, time."""
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prompts", str(len(results) + errors))
    if errors:
        table.add_row("errors (records with \"error\")", str(errors))
    if not results:
        console.print(table)
        return
    for name in results[0].scores:
        mean = sum(r.scores[name] for r in results) / len(results)
        table.add_row(f"mean {name}", f"{mean:.3f}")
    tokens = sum(r.stats.response_tokens for r in results)
    elapsed = elapsed or sum(r.stats.wall_s for r in results)
    table.add_row("response tokens/s", f"{tokens / elapsed:.1f}" if elapsed else "-")
    table.add_row("prompts per minute", f"{60 * (len(results) + errors) / elapsed:.1f}" if elapsed else "-")
    table.add_row("seconds per prompt in flight (mean)", f"{sum(r.stats.wall_s for r in results) / len(results):.2f}")
    table.add_row("total seconds", f"{elapsed:.1f}")
    console.print(table)


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0, 1 when some prompts failed (their records say why),
    2 for bad input (nothing decoded, nothing written), 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\ngroups: " + "; ".join(f"{g}: {group_options(g)}" for g in GROUPS))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        cfg = compose_config(argv)
        outcome = run(cfg, console)
    except ValueError as e:
        print(f"mahalo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mahalo: interrupted; finished prompts are saved, re-run the same command to resume", file=sys.stderr)
        return 130
    if cfg.prompt is not None and outcome.results:
        show_single(outcome.results[0], console, cfg.verbose)
    elif outcome.results or outcome.errors:
        show_summary(outcome.results, console, len(outcome.errors), outcome.elapsed_s)
    if outcome.unanswered:
        print(f"mahalo: error: {outcome.unanswered}", file=sys.stderr)
    if outcome.errors:
        where = f" (records with an \"error\" field in {cfg.output}; delete them to retry)" if cfg.output else ""
        print(f"mahalo: {len(outcome.errors)} of {len(outcome.errors) + len(outcome.results)} prompts failed{where}",
              file=sys.stderr)
    return 1 if outcome.errors or outcome.unanswered else 0


if __name__ == "__main__":
    sys.exit(main())
