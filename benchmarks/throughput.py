"""Many prompts in flight: the token-level engine against the lockstep ablation, in counts,
seconds and a roofline model of the real workload.

For each strategy in ``--strategies`` (default: the truth default, ``+objective=truth``, and
MAHALO's ``step_best_of_n`` N=5), each engine in ``--engines`` and each ``max_prompts`` in
``--max-prompts`` (default 1,4,16,64) it answers the first ``--num-prompts`` TruthfulQA dev
questions (default 32) in a fresh process (so peak RSS is the run's own) and records:

* questions per minute (wall clock around the whole run) and peak RSS (sampled every 10 ms while
  it decodes, in a process that has done nothing else but load the models);
* policy forwards per question, rows fed per forward (overall, and in steady state: the forwards
  before the last prompt joined, while prompts still waited), and the decoding-row budget's fill;
* KV bytes held (peak) and read per forward (each slot read once per forward);
* whether every answer is token-identical to the first run of the same strategy;
* a *modelled* H200 time: each forward of the schedule trace priced as the real workload
  (Llama-3-8B policy + an 8B reward model in bf16; see :data:`ROOFLINE`), and from it modelled
  prompts per minute. A model, not a measurement.

Engines: ``token`` (each prompt moves through its own steps; prefixes shared; the decoding-row
budget ``--max-rows``, 0 = the device default) and ``lockstep`` (``step_barrier=true
share_prefix=false``, the ablation: every prompt waits for the others at each step and every row
holds its own prompt). ``token16`` is the token-level engine with the same cap of prompts in
flight and a budget large enough that the cap binds (``max_rows = max_prompts * B * N``).

Outputs (``--out-dir``): ``throughput.json``, ``throughput.csv``, ``throughput.png`` and the
schedule trace ``throughput_trace.jsonl`` (one line per run: per forward, rows fed, rows held, KV
tokens read; per scoring batch, what a reward model forwards).

Smoke run (tiny random models; numbers meaningless)::

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --models tiny --num-prompts 4 --max-prompts 1,2 \\
        --max-new-tokens 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from mahalo.chat import with_system  # noqa: E402
from mahalo.config import config_from_options  # noqa: E402
from mahalo.engine.build import controller_of  # noqa: E402
from mahalo.engine.scheduler import limits, schedule  # noqa: E402

log = logging.getLogger("benchmarks.throughput")

ENGINES = {
    "token": {},
    "token16": {},  # max_rows = max_prompts * B * N (the prompt cap binds)
    "lockstep": {"step_barrier": True, "share_prefix": False},
}
STRATEGIES = ("truth_default", "step_best_of_n")
ROW_FIELDS = ["strategy", "engine", "max_prompts", "max_rows", "questions", "wall_s", "questions_per_min", "forwards",
              "forwards_per_question", "rows_fed_per_forward", "steady_rows_fed_per_forward", "budget_fill",
              "kv_held_peak_mb", "kv_read_per_forward_mb", "peak_rss_mb", "response_tokens", "same_answers",
              "modelled_h200_s", "modelled_prompts_per_min"]

# The roofline model of the real workload (a model, not a measurement): a Llama-3-8B policy and an
# 8B reward model (Llama-3-8B sequence classifier) in bf16 on one H200. A forward costs
# max(bytes / bandwidth, flops / peak): bytes = the model's weights + the KV it reads, flops =
# 2 x parameters x tokens + the attention's 4 x hidden x layers per (query, key) pair. The policy's
# forwards are the trace's; a reward model forward runs once per scoring batch (the prompts whose
# steps ended together) and forwards each candidate's step tokens on its cached context (no prefix
# sharing on the reward side). Host work (sampling, bookkeeping) is not modelled.
ROOFLINE = {
    "weights_bytes": 16.06e9,  # per model
    "params": 8.03e9,
    "kv_bytes_per_token": 128 * 1024,  # 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes
    "hidden": 4096,
    "layers": 32,
    "bandwidth": 4.3e12,  # bytes/s (HBM3e)
    "flops": 990e12,  # dense bf16 FLOP/s
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, prompts_default=32)
    s = p.add_argument_group("runs")
    s.add_argument("--strategies", type=common.str_list, default=list(STRATEGIES),
                   help=f"comma-separated, of {list(STRATEGIES)} (default: both)")
    s.add_argument("--engines", type=common.str_list, default=["token", "token16", "lockstep"],
                   help=f"comma-separated, of {list(ENGINES)}")
    s.add_argument("--max-prompts", type=common.int_list, default=[1, 4, 16, 64],
                   help="comma-separated max_prompts values (default: 1,4,16,64)")
    s.add_argument("--token16-at", type=common.int_list, default=[16],
                   help="max_prompts at which the token16 engine runs (default: 16)")
    s.add_argument("--lockstep-at", type=common.int_list, default=None,
                   help="max_prompts at which the lockstep ablation runs (default: every --max-prompts value)")
    s.add_argument("--max-rows", type=int, default=0, help="the token engine's decoding-row budget (0: default)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--num-candidates", type=int, default=5, help="step_best_of_n's N")
    s.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (faster; peak RSS then mixes runs)")
    s.add_argument("--no-plot", action="store_true")
    s.add_argument("--verbose", action="store_true")
    s.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON in and out
    args = p.parse_args(argv)
    bad = sorted(set(args.strategies) - set(STRATEGIES)) + sorted(set(args.engines) - set(ENGINES))
    if bad:
        p.error(f"unknown strategy or engine {bad}")
    return args


def options(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """``guided_generate`` options of a strategy (the truth default's system turn included)."""
    if strategy == "truth_default":
        from benchmarks.truthfulqa import cli_truth_options

        opts = cli_truth_options()
    else:
        opts = dict(strategy="step_best_of_n", num_candidates=args.num_candidates, temperature=1.0, top_k=50,
                    min_step_tokens=8)
    return {**opts, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "weights": {"truth": 1.0}}


def run_one(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One (strategy, engine, max_prompts) run in this process: its row, its answers, its trace."""
    questions = common.read_questions(args.questions, args.num_prompts)
    models = common.load_bench_models(args.models, args.device, args.dtype, args.truth_head, shared=True)
    opts = options(spec["strategy"], args)
    system = opts.pop("system_prompt", None)
    cfg = config_from_options(None, **opts, **ENGINES[spec["engine"]])
    controller = controller_of(models.policy, {"truth": models.truth}, cfg)
    controller.counters.trace = []
    max_prompts = spec["max_prompts"]
    rows_per_prompt = controller.default.rows
    max_rows = max_prompts * rows_per_prompt if spec["engine"] == "token16" else args.max_rows
    max_prompts, max_rows = limits(controller, max_prompts, max_rows)
    prompts = [with_system([{"role": "user", "content": q.question}], system) for q in questions]
    answers, stats = {}, []
    with common.PeakMemory(models.device) as mem:
        t0 = time.perf_counter()
        for index, res in schedule(controller, prompts, max_prompts, max_rows):
            if isinstance(res, ValueError):
                raise res
            answers[index] = res.token_ids
            stats.append(res.stats)
        wall = time.perf_counter() - t0
    c = controller.counters
    trace, scoring = c.trace, c.scoring_trace or []
    n = len(questions)
    last_admit = next((i for i, t in enumerate(trace) if t["admitted"] == n), len(trace))
    steady = trace[:last_admit] if last_admit > 0 else trace
    bytes_per_token = controller.kv.bytes_per_token
    decode = [t for t in trace if t["rows_fed"]]
    row = {
        **spec, "max_rows": max_rows, "questions": n, "wall_s": wall, "questions_per_min": 60 * n / wall,
        "forwards": c.forwards, "forwards_per_question": c.forwards / n,
        "rows_fed_per_forward": c.rows_fed / max(c.forwards, 1),
        "steady_rows_fed_per_forward": sum(t["rows_fed"] for t in steady) / max(len(steady), 1),
        "kv_held_peak_mb": max((t["kv_tokens_held"] for t in trace), default=0) * bytes_per_token / 2**20,
        "kv_read_per_forward_mb": sum(t["kv_tokens_read"] for t in decode) / max(len(decode), 1) * bytes_per_token
        / 2**20,
        "peak_rss_mb": mem.peak_mb, "memory_method": mem.method,  # sampled while decoding, in the run's own process
        "response_tokens": sum(s.response_tokens for s in stats),
        "budget_fill": (sum(t["rows_fed"] for t in steady) / max(len(steady), 1)) / max_rows if max_rows else None,
    }
    modelled = modelled_seconds(trace, scoring)
    row.update(modelled_h200_s=modelled, modelled_prompts_per_min=60 * n / modelled if modelled else None)
    return {"row": row, "answers": answers, "trace": trace, "scoring": scoring}


def modelled_seconds(trace: list[dict[str, int]], scoring: list[dict[str, int]]) -> float:
    """Seconds the schedule would take on the modelled H200 (:data:`ROOFLINE`)."""
    m = ROOFLINE

    def cost(weights: float, kv_tokens: float, tokens: float, pairs: float) -> float:
        flops = 2 * m["params"] * tokens + 4 * m["hidden"] * m["layers"] * pairs
        return max((weights + kv_tokens * m["kv_bytes_per_token"]) / m["bandwidth"], flops / m["flops"])

    policy = sum(cost(m["weights_bytes"], t["kv_tokens_read"], t["tokens"] - t["head_tokens"], t["attended"])
                 for t in trace)
    reward = sum(cost(m["weights_bytes"], s["context"], s["step_tokens"] + 2 * s["rows"],
                      (s["step_tokens"] + 2 * s["rows"]) * (s["context"] / max(s["rows"], 1))) for s in scoring)
    return policy + reward


def _child(spec: dict[str, Any], argv: list[str], trace_dir: Path) -> dict[str, Any]:
    """Run one spec in a fresh process (its own peak RSS); the result comes back in a file."""
    out = trace_dir / f"run_{spec['strategy']}_{spec['engine']}_{spec['max_prompts']}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run-one", json.dumps({**spec, "out": str(out)})]
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="throughput: TruthfulQA dev questions, token-level engine vs lockstep ablation")
    cols = ("strategy", "engine", "max_prompts", "max_rows", "q/min", "forwards/q", "rows fed/fwd", "steady fed/fwd",
            "budget fill", "KV held MB", "KV read MB/fwd", "peak RSS MB", "same", "H200 model p/min")
    for col in cols:
        t.add_column(col, justify="left" if col in ("strategy", "engine") else "right")
    for r in rows:
        t.add_row(r["strategy"], r["engine"], str(r["max_prompts"]), str(r["max_rows"]),
                  common.fmt(r["questions_per_min"]), common.fmt(r["forwards_per_question"], 1),
                  common.fmt(r["rows_fed_per_forward"], 1), common.fmt(r["steady_rows_fed_per_forward"], 1),
                  common.fmt(r["budget_fill"]), common.fmt(r["kv_held_peak_mb"], 0),
                  common.fmt(r["kv_read_per_forward_mb"], 1), common.fmt(r["peak_rss_mb"], 0), str(r["same_answers"]),
                  common.fmt(r["modelled_prompts_per_min"], 1))
    return t


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    strategies = sorted({r["strategy"] for r in rows})
    fig, axes = plt.subplots(len(strategies), 3, figsize=(13, 3.6 * len(strategies)), squeeze=False)
    for ax_row, strategy in zip(axes, strategies):
        for engine in ENGINES:
            sel = sorted((r for r in rows if r["strategy"] == strategy and r["engine"] == engine),
                         key=lambda r: r["max_prompts"])
            if not sel:
                continue
            x = [r["max_prompts"] for r in sel]
            for ax, field in zip(ax_row, ("questions_per_min", "forwards_per_question", "modelled_prompts_per_min")):
                ax.plot(x, [r[field] for r in sel], "o-", label=engine)
        for ax, label in zip(ax_row, ("CPU questions / min (measured)", "policy forwards / question",
                                      "H200 prompts / min (roofline model)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max_prompts")
            ax.set_title(f"{strategy}: {label}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = common.start(args)
    if args.run_one is not None:  # a child: one run, written to the file the parent named
        spec = json.loads(args.run_one)
        out = Path(spec.pop("out"))
        out.write_text(json.dumps(run_one(spec, args)))
        return 0
    try:
        common.read_questions(args.questions, args.num_prompts)
        machine = common.machine_info(args.device, args.machine)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(common.machine_line(machine), style="dim", markup=False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    child_argv = [a for a in argv if a != "--no-plot"]
    stem = common.out_stem("throughput", args.tag)
    trace_path = args.out_dir / f"{stem}_trace.jsonl"
    rows = []
    with trace_path.open("w") as traces:
        for strategy in args.strategies:
            first = None
            for engine in args.engines:
                for max_prompts in args.max_prompts:
                    if engine == "token16" and max_prompts not in args.token16_at:
                        continue
                    if engine == "lockstep" and args.lockstep_at is not None and max_prompts not in args.lockstep_at:
                        continue
                    spec = {"strategy": strategy, "engine": engine, "max_prompts": max_prompts}
                    result = run_one(spec, args) if args.in_process else _child(spec, child_argv, args.out_dir)
                    row = result["row"]
                    first = result["answers"] if first is None else first
                    row["same_answers"] = result["answers"] == first
                    rows.append(row)
                    traces.write(json.dumps({**spec, "forwards": result["trace"], "scoring": result["scoring"]}) + "\n")
                    console.print(f"[dim]{strategy} {engine} max_prompts={max_prompts}: "
                                  f"{row['questions_per_min']:.2f} q/min, {row['forwards_per_question']:.1f} forwards/q, "
                                  f"{row['rows_fed_per_forward']:.1f} rows/forward, peak {row['peak_rss_mb']:.0f} MB[/dim]")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "roofline": ROOFLINE}
    json_path = common.write_json(args.out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", rows, ROW_FIELDS)
    png = None if args.no_plot else plot(rows, args.out_dir / f"{stem}.png")
    console.print(table(rows))
    console.print(f"wrote {json_path}, {csv_path}, {trace_path}" + (f", {png}" if png else ""), markup=False)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
