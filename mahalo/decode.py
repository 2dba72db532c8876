"""``python -m mahalo.decode``: the command line.

    python -m mahalo.decode +objective=truth prompt="Can you see the Great Wall from space?"
    python -m mahalo.decode +objective=truth_concise prompts=qs.jsonl output=out.jsonl
    python -m mahalo.decode +objective=human_values models=llama3_8b search=step_beam

compose (Hydra, mahalo.app.compose) -> RunConfig (typed, validated) -> a launcher (mahalo.launch: this
process, or Ray replicas) -> JSONL records -> rich summary. Bad input ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mahalo import launch as launchers
from mahalo.app.compose import CONF_DIR, GROUPS, compose_config, group_options  # noqa: F401 - the CLI's names
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
from mahalo.app.registry import check_provided
from mahalo.chat import as_messages, with_system
from mahalo.launch import Unanswered
from mahalo.result import GuidedResult


USAGE = __doc__.split("\n\n")[1]
log = logging.getLogger("mahalo")


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
        "answer_path": res.answer_path,  # the answer's candidate in each step (python -m mahalo.tree draws it)
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
    launch = launchers.answers_on_ray if cfg.launcher.kind == "ray" else launchers.answers_here
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


def show_tree_hint(cfg: RunConfig, console: Console) -> None:
    """Where to see a prompt's search drawn (``verbose=true``)."""
    index = "0" if cfg.prompt is not None else "I"
    if cfg.output:
        line = f"draw a prompt's search: python -m mahalo.tree {cfg.output} --index {index} --out tree.html (or tree.png)"
    else:
        line = (f"to draw the search, add output=FILE.jsonl, then: python -m mahalo.tree FILE.jsonl --index {index} "
                "--out tree.html (or tree.png)")
    console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)


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
    if cfg.verbose:
        show_tree_hint(cfg, console)
    if outcome.unanswered:
        print(f"mahalo: error: {outcome.unanswered}", file=sys.stderr)
    if outcome.errors:
        where = f" (records with an \"error\" field in {cfg.output}; delete them to retry)" if cfg.output else ""
        print(f"mahalo: {len(outcome.errors)} of {len(outcome.errors) + len(outcome.results)} prompts failed{where}",
              file=sys.stderr)
    return 1 if outcome.errors or outcome.unanswered else 0


if __name__ == "__main__":
    sys.exit(main())
