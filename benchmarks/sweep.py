"""Sweep search strategy x beam width B x candidates N: reward, time, tokens, memory.

Combinations (``--strategies``, ``--beams``, ``--candidates``): ``step_beam`` runs every
(B, N); ``step_best_of_n`` and ``best_of_n`` run every N at B = 1 (B means nothing to them);
``sample`` runs once (B = N = 1). ``step_beam`` at B = 1 is the same search as
``step_best_of_n`` and is kept as the first point of the beam-width curves.

Every (combination, prompt) decode is one JSONL record in ``sweep_prompts.jsonl``, appended and
flushed as soon as it finishes; a re-run with the same settings skips what is already there
(``--fresh`` starts over). From the records it writes ``sweep_runs.csv`` / ``sweep_runs.jsonl``
(one row per combination: mean and median reward per objective, wall seconds per prompt,
policy and reward-model tokens, tokens/s, peak memory) and three plots (needs matplotlib):
``sweep_reward_vs_beam.png``, ``sweep_time_vs_beam.png``, ``sweep_reward_vs_compute.png``.

Example (smoke run, tiny random models)::

    OMP_NUM_THREADS=1 python benchmarks/sweep.py --models tiny --num-prompts 1 \\
        --max-new-tokens 16 --beams 1,2 --candidates 1,2 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from mahalo.api import guided_generate  # noqa: E402
from mahalo.config import STRATEGIES  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402

log = logging.getLogger("benchmarks.sweep")

PER_BEAM_STRATEGIES = ("step_beam",)


@dataclass(frozen=True)
class Combo:
    """One point of the sweep."""

    strategy: str
    beam_width: int
    num_candidates: int

    @property
    def label(self) -> str:
        return f"{self.strategy} B={self.beam_width} N={self.num_candidates}"


def combos(strategies: list[str], beams: list[int], candidates: list[int]) -> list[Combo]:
    """The meaningful (strategy, B, N) points, in the given order, without duplicates."""
    out: list[Combo] = []
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: choose from {list(STRATEGIES)}")
        if strategy == "sample":
            points = [(1, 1)]
        elif strategy in PER_BEAM_STRATEGIES:
            points = [(b, n) for b in beams for n in candidates]
        else:
            points = [(1, n) for n in candidates]
        out += [Combo(strategy, b, n) for b, n in points if Combo(strategy, b, n) not in out]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="sweep.py",
        description="Sweep strategy x beam width x candidates over TruthfulQA dev prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common.add_common_args(p, prompts_default=10)
    s = p.add_argument_group("sweep")
    s.add_argument("--strategies", type=common.str_list, default=["step_beam", "step_best_of_n", "best_of_n"],
                   help=f"comma-separated, from {list(STRATEGIES)}")
    s.add_argument("--beams", type=common.int_list, default=[1, 2, 4, 8], help="beam widths B (step_beam only)")
    s.add_argument("--candidates", type=common.int_list, default=[1, 2, 4, 8], help="candidates N")
    s.add_argument("--max-new-tokens", type=int, default=128, help="response token budget")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--warmup", type=int, default=1, help="unrecorded 16-token warm-up decodes before the sweep")
    s.add_argument("--fresh", action="store_true", help="discard earlier records in the output JSONL")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    try:
        args.combos = combos(args.strategies, args.beams, args.candidates)
    except ValueError as err:
        p.error(str(err))
    return args


# --------------------------------------------------------------------------- records


def record_key(rec: dict[str, Any]) -> tuple:
    """What identifies a decode: resume skips records with the same key."""
    return (rec["models"], rec["strategy"], rec["beam_width"], rec["num_candidates"], rec["prompt_index"],
            rec["prompt"], rec["max_new_tokens"], rec["seed"], rec["temperature"], rec["top_k"])


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"models": args.models, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "temperature": args.temperature, "top_k": args.top_k}


def decode_one(engine: tuple[Any, dict[str, Any]], combo: Combo, prompt: str, index: int,
               args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """One guided decode, measured; returns its JSONL record."""
    policy, prms = engine
    with common.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        res = guided_generate(
            policy, prms, prompt, strategy=combo.strategy, beam_width=combo.beam_width,
            num_candidates=combo.num_candidates, max_new_tokens=args.max_new_tokens, seed=args.seed,
            temperature=args.temperature, top_k=args.top_k,
        )
        wall = time.perf_counter() - t0
    s = res.stats
    return {
        **_settings(args), "strategy": combo.strategy, "beam_width": combo.beam_width,
        "num_candidates": combo.num_candidates, "prompt_index": index, "prompt": prompt,
        "wall_s": wall, "policy_tokens": s.policy_tokens, "policy_tokens_padded": s.policy_tokens_padded,
        "rm_tokens": s.prm_tokens, "rm_tokens_padded": s.prm_tokens_padded,
        "response_tokens": s.response_tokens, "steps": s.steps, "policy_s": s.policy_s, "rm_s": s.prm_s,
        "scores": dict(res.scores), "peak_mb": mem.peak_mb, "peak_delta_mb": mem.delta_mb,
        "memory_method": mem.method, "stop_reason": res.stop_reason, "text": res.text,
    }


def run_sweep(args: argparse.Namespace, models: common.BenchModels, prompts: list[str], path: Path,
              console: Any) -> None:
    """Decode every pending (combination, prompt), appending each record to ``path``."""
    common.repair_jsonl_tail(path)
    done = {record_key(r) for r in common.read_jsonl(path)}
    settings = _settings(args)
    engine = (as_policy(models.policy), {"truth": as_reward(models.truth, "truth")})
    todo = [(c, i, p) for c in args.combos for i, p in enumerate(prompts)
            if record_key({**settings, "strategy": c.strategy, "beam_width": c.beam_width,
                           "num_candidates": c.num_candidates, "prompt_index": i, "prompt": p}) not in done]
    console.print(f"{len(todo)} decodes to run, {len(args.combos) * len(prompts) - len(todo)} already in {path}",
                  markup=False)
    if todo and args.warmup:
        for _ in range(args.warmup):
            guided_generate(engine[0], engine[1], prompts[0], strategy="step_best_of_n",
                            num_candidates=2, max_new_tokens=16, seed=args.seed)
    for n, (combo, i, prompt) in enumerate(todo, 1):
        try:
            rec = decode_one(engine, combo, prompt, i, args, models.device)
        except ValueError as err:  # e.g. prompt + budget over the context: skip, say why
            log.error("%s prompt %d failed: %s", combo.label, i, err)
            continue
        common.append_jsonl(path, rec)
        console.print(f"[{n}/{len(todo)}] {combo.label} prompt {i}: {rec['wall_s']:.2f} s, "
                      f"{rec['response_tokens']} tok, truth {common.fmt(rec['scores'].get('truth'), 3)}",
                      style="dim", markup=False)


# --------------------------------------------------------------------------- aggregation


def aggregate(records: list[dict[str, Any]], combo_list: list[Combo], n_prompts: int) -> list[dict[str, Any]]:
    """One row per combination from its prompt records (those of the current settings)."""
    rows = []
    for c in combo_list:
        sel = [r for r in records if (r["strategy"], r["beam_width"], r["num_candidates"])
               == (c.strategy, c.beam_width, c.num_candidates) and r["prompt_index"] < n_prompts]
        if not sel:
            continue
        row: dict[str, Any] = {"strategy": c.strategy, "beam_width": c.beam_width,
                               "num_candidates": c.num_candidates, "prompts": len(sel)}
        for obj in sorted({k for r in sel for k in r["scores"]}):
            vals = [r["scores"].get(obj) for r in sel]
            row[f"mean_{obj}"], row[f"median_{obj}"] = common.mean(vals), common.median(vals)
        wall = [r["wall_s"] for r in sel]
        row.update({
            "mean_wall_s_per_prompt": common.mean(wall), "median_wall_s_per_prompt": common.median(wall),
            "mean_policy_tokens": common.mean(r["policy_tokens"] for r in sel),
            "mean_rm_tokens": common.mean(r["rm_tokens"] for r in sel),
            "mean_response_tokens": common.mean(r["response_tokens"] for r in sel),
            "tokens_per_s": common.ratio(sum(r["response_tokens"] for r in sel), sum(wall)),
            "peak_mb": max(common.finite(r["peak_mb"] for r in sel), default=math.nan),
            "peak_delta_mb": max(common.finite(r["peak_delta_mb"] for r in sel), default=math.nan),
            "memory_method": sel[0]["memory_method"],
        })
        row["mean_compute_tokens"] = row["mean_policy_tokens"] + row["mean_rm_tokens"]
        rows.append(row)
    return rows


def growth_factor(rows: list[dict[str, Any]], strategy: str = "step_best_of_n") -> tuple[int, int, float] | None:
    """(N_low, N_high, median wall at N_high / at N_low) for ``strategy``; N=1 and N=8 when swept."""
    by_n = {r["num_candidates"]: r["median_wall_s_per_prompt"] for r in rows if r["strategy"] == strategy}
    if len(by_n) < 2:
        return None
    lo = 1 if 1 in by_n else min(by_n)
    hi = 8 if 8 in by_n else max(by_n)
    return lo, hi, common.ratio(by_n[hi], by_n[lo])


def runs_table(rows: list[dict[str, Any]], objective: str) -> Table:
    """The per-combination table."""
    table = Table(title="sweep (per prompt: mean unless said)")
    cols = ("strategy", "B", "N", "prompts", f"mean {objective}", f"median {objective}", "wall s (median)",
            "policy tok", "RM tok", "resp tok", "tok/s", "peak MB", "peak Δ MB")
    for col in cols:
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=col == "strategy")
    for r in rows:
        table.add_row(
            r["strategy"], str(r["beam_width"]), str(r["num_candidates"]), str(r["prompts"]),
            common.fmt(r.get(f"mean_{objective}"), 3), common.fmt(r.get(f"median_{objective}"), 3),
            common.fmt(r["median_wall_s_per_prompt"]), common.fmt(r["mean_policy_tokens"], 0),
            common.fmt(r["mean_rm_tokens"], 0), common.fmt(r["mean_response_tokens"], 0),
            common.fmt(r["tokens_per_s"], 1), common.fmt(r["peak_mb"], 0), common.fmt(r["peak_delta_mb"], 0),
        )
    return table


# --------------------------------------------------------------------------- plots


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both less compute and more reward."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _by_beam(ax: Any, rows: list[dict[str, Any]], field: str) -> None:
    """Lines over B per (strategy, N); strategies without B show as points at B = 1."""
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        for n in sorted({r["num_candidates"] for r in rows if r["strategy"] == strategy}):
            sel = sorted((r for r in rows if r["strategy"] == strategy and r["num_candidates"] == n),
                         key=lambda r: r["beam_width"])
            style = "-o" if strategy in PER_BEAM_STRATEGIES else "x"
            ax.plot([r["beam_width"] for r in sel], [r.get(field, math.nan) for r in sel], style,
                    label=f"{strategy} N={n}")
    ax.set_xscale("log", base=2)
    beams = sorted({r["beam_width"] for r in rows})
    ax.set_xticks(beams, [str(b) for b in beams])
    ax.minorticks_off()
    ax.set_xlabel("beam width B")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)


def write_plots(rows: list[dict[str, Any]], objective: str, out_dir: Path, stem: str) -> list[Path]:
    """The three PNGs; none (with a warning) when matplotlib is missing."""
    plt = common.pyplot()
    if plt is None:
        return []
    paths = []
    for field, ylabel, name in ((f"mean_{objective}", f"mean {objective} reward", "reward_vs_beam"),
                                ("median_wall_s_per_prompt", "median wall s per prompt", "time_vs_beam")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _by_beam(ax, rows, field)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs beam width")
        paths.append(common.save_figure(fig, out_dir / f"{stem}_{name}.png"))
    paths.append(_compute_plot(plt, rows, objective, out_dir / f"{stem}_reward_vs_compute.png"))
    return paths


def _compute_plot(plt: Any, rows: list[dict[str, Any]], objective: str, path: Path) -> Path:
    """Reward vs policy + reward-model tokens per prompt, with the Pareto front."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    field = f"mean_{objective}"
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        sel = [r for r in rows if r["strategy"] == strategy]
        ax.scatter([r["mean_compute_tokens"] for r in sel], [r.get(field, math.nan) for r in sel], label=strategy)
        for r in sel:
            ax.annotate(f"B{r['beam_width']}N{r['num_candidates']}", (r["mean_compute_tokens"], r.get(field, math.nan)),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    pts = [(r["mean_compute_tokens"], r[field]) for r in rows if math.isfinite(r.get(field, math.nan))]
    front = _pareto(pts)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", ls="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("policy + reward-model tokens per prompt (mean)")
    ax.set_ylabel(f"mean {objective} reward")
    ax.set_title("reward vs compute")
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the sweep, then print and write the per-combination results."""
    args = parse_args(argv)
    console = common.start(args)
    stem = common.out_stem("sweep", args.tag)
    prompts_path = args.out_dir / f"{stem}_prompts.jsonl"
    if args.fresh and prompts_path.exists():
        prompts_path.unlink()
    try:
        questions, models, machine = common.load_run(args, console)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [q.question for q in questions]
    run_sweep(args, models, prompts, prompts_path, console)
    settings = _settings(args)
    records = [r for r in common.read_jsonl(prompts_path)
               if all(r.get(k) == v for k, v in settings.items())
               and r["prompt_index"] < len(prompts) and r["prompt"] == prompts[r["prompt_index"]]]
    rows = aggregate(records, args.combos, len(prompts))
    for row in rows:
        row.update({"max_new_tokens": args.max_new_tokens, "models": args.models, "seed": args.seed})
    common.write_csv(args.out_dir / f"{stem}_runs.csv", rows)
    common.write_jsonl(args.out_dir / f"{stem}_runs.jsonl", rows)
    common.write_json(args.out_dir / f"{stem}_meta.json",
                      {"args": vars(args) | {"combos": [c.label for c in args.combos]},
                       "machine": machine, "models": models.description})
    plots = [] if args.no_plots or not rows else write_plots(rows, "truth", args.out_dir, stem)
    console.print(runs_table(rows, "truth"))
    console.print(f"wrote {args.out_dir / (stem + '_runs.csv')}, {stem}_runs.jsonl, {prompts_path.name}, "
                  f"{stem}_meta.json" + "".join(f", {p.name}" for p in plots), markup=False)
    growth = growth_factor(rows)
    if growth:
        lo, hi, factor = growth
        print(f"step_best_of_n median wall time per prompt grows x{common.fmt(factor)} from N={lo} to N={hi}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
