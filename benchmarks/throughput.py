"""Questions per minute with many prompts in flight: mahalo's ``max_prompts`` sweep.

For each ``max_prompts`` in ``--max-prompts`` (default 1,2,4,8,16) it answers the first
``--num-prompts`` TruthfulQA dev questions (default 32) with ``step_best_of_n`` (N=5, 128 new
tokens, the truth reward model) through :func:`mahalo.guided_generate_many`, and records:

* questions per minute (wall clock around the whole run),
* policy and reward-model tokens per second (real tokens, summed over prompts),
* peak memory (RSS sampled by a thread on a CPU, ``max_memory_allocated`` on a GPU),
* whether every answer is token-identical to the first run's (``max_prompts=1`` by default):
  batch composition must not change an answer.

In the same run the paper's loop (``reference_decoder.py``) answers the first
``--reference-prompts`` questions (default 8, one at a time, as it always does) for its questions
per minute.

Outputs (``--out-dir``): ``throughput.json``, ``throughput.csv``, ``throughput.png``.

Smoke run (tiny random models; numbers meaningless)::

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --models tiny --num-prompts 4 --max-prompts 1,2 \\
        --max-new-tokens 16 --reference-prompts 1 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.reference_decoder import reference_decode  # noqa: E402
from mahalo.api import guided_generate_many  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402

log = logging.getLogger("benchmarks.throughput")

ROW_FIELDS = ["engine", "max_prompts", "questions", "wall_s", "questions_per_min", "policy_tokens_per_s",
              "rm_tokens_per_s", "response_tokens", "peak_mb", "memory_method", "same_as_first"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, prompts_default=32)
    s = p.add_argument_group("search")
    s.add_argument("--max-prompts", type=common.int_list, default=[1, 2, 4, 8, 16],
                   help="comma-separated max_prompts values (default: 1,2,4,8,16)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--num-candidates", type=int, default=5)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--min-step-tokens", type=int, default=8)
    s.add_argument("--reference-prompts", type=int, default=8,
                   help="questions the paper's loop answers in the same run (0: skip it)")
    s.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up decodes (default: 1)")
    s.add_argument("--no-plot", action="store_true")
    s.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if any(m < 1 for m in args.max_prompts):
        p.error("--max-prompts values must be >= 1")
    return args


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(strategy="step_best_of_n", num_candidates=args.num_candidates, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, min_step_tokens=args.min_step_tokens, seed=args.seed)


def run_mahalo(models: common.BenchModels, prompts: list[str], max_prompts: int, args: argparse.Namespace
               ) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """All ``prompts`` with ``max_prompts`` in flight; the row and every answer's token ids."""
    policy, truth = as_policy(models.policy), models.truth
    answers, stats = {}, []
    with common.PeakMemory(models.device) as mem:
        t0 = time.perf_counter()
        for index, res in guided_generate_many(policy, {"truth": truth}, prompts, max_prompts=max_prompts,
                                               **_options(args)):
            answers[index] = res.token_ids
            stats.append(res.stats)
        wall = time.perf_counter() - t0
    row = {
        "engine": "mahalo", "max_prompts": max_prompts, "questions": len(prompts), "wall_s": wall,
        "questions_per_min": 60 * len(prompts) / wall,
        "policy_tokens_per_s": sum(s.policy_tokens for s in stats) / wall,
        "rm_tokens_per_s": sum(s.prm_tokens for s in stats) / wall,
        "response_tokens": sum(s.response_tokens for s in stats),
        "peak_mb": mem.peak_mb, "memory_method": mem.method,
    }
    return row, answers


def run_reference(models: common.BenchModels, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The paper's loop on ``prompts``, one at a time."""
    (pm, pt), truth = models.policy, models.truth
    policy_tokens = rm_tokens = response = 0
    with common.PeakMemory(models.device) as mem:
        t0 = time.perf_counter()
        for prompt in prompts:
            res = reference_decode(pm, pt, truth.model, truth.tokenizer, prompt, num_candidates=args.num_candidates,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed, min_step_tokens=args.min_step_tokens, score_at=truth.score_at)
            policy_tokens, rm_tokens, response = (policy_tokens + res.policy_tokens, rm_tokens + res.rm_tokens,
                                                  response + len(res.token_ids))
        wall = time.perf_counter() - t0
    return {
        "engine": "reference", "max_prompts": 1, "questions": len(prompts), "wall_s": wall,
        "questions_per_min": 60 * len(prompts) / wall, "policy_tokens_per_s": policy_tokens / wall,
        "rm_tokens_per_s": rm_tokens / wall, "response_tokens": response, "peak_mb": mem.peak_mb,
        "memory_method": mem.method, "same_as_first": None,
    }


def table(rows: list[dict[str, Any]]) -> Table:
    base = next((r["questions_per_min"] for r in rows if r["engine"] == "mahalo" and r["max_prompts"] == 1), None)
    t = Table(title="throughput: TruthfulQA dev questions, step_best_of_n")
    for col in ("engine", "max_prompts", "questions", "wall s", "questions/min", "vs max_prompts=1",
                "policy tok/s", "RM tok/s", "peak MB", "same answers as first"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        t.add_row(r["engine"], str(r["max_prompts"]), str(r["questions"]), common.fmt(r["wall_s"], 1),
                  common.fmt(r["questions_per_min"]), common.fmt(common.ratio(r["questions_per_min"], base)),
                  common.fmt(r["policy_tokens_per_s"], 0), common.fmt(r["rm_tokens_per_s"], 0),
                  common.fmt(r["peak_mb"], 0), "-" if r["same_as_first"] is None else str(r["same_as_first"]))
    return t


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    mahalo = [r for r in rows if r["engine"] == "mahalo"]
    ax.plot([r["max_prompts"] for r in mahalo], [r["questions_per_min"] for r in mahalo], "o-", label="mahalo")
    for r in rows:
        if r["engine"] == "reference":
            ax.axhline(r["questions_per_min"], color="grey", ls="--", label="paper's loop")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max_prompts (prompts in flight)")
    ax.set_ylabel("questions per minute")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("throughput vs prompts in flight")
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = common.start(args)
    try:
        questions, models, machine = common.load_run(args, console)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [q.question for q in questions]
    for _ in range(args.warmup):
        run_mahalo(models, prompts[:1], 1, argparse.Namespace(**{**vars(args), "max_new_tokens": 16}))
    rows, first = [], None
    for max_prompts in args.max_prompts:
        row, answers = run_mahalo(models, prompts, max_prompts, args)
        first = answers if first is None else first
        row["same_as_first"] = answers == first
        rows.append(row)
        console.print(f"[dim]max_prompts={max_prompts}: {row['questions_per_min']:.2f} questions/min, "
                      f"peak {row['peak_mb']:.0f} MB[/dim]")
    if args.reference_prompts:
        rows.append(run_reference(models, prompts[: args.reference_prompts], args))
    stem = common.out_stem("throughput", args.tag)
    meta = {"args": vars(args), "machine": machine, "models": models.description}
    json_path = common.write_json(args.out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", rows, ROW_FIELDS)
    png = None if args.no_plot else plot(rows, args.out_dir / f"{stem}.png")
    console.print(table(rows))
    console.print(f"wrote {json_path}, {csv_path}" + (f", {png}" if png else ""), markup=False)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
