"""Cost of one policy decode step vs the number of rows decoded together.

What a forward of R rows costs relative to one of a few rows decides how much batching saves.
This script times the policy's decode step as the engine runs it (:meth:`HFPolicy.run` of one
token per row, R rows reading one cached prompt from the shared-prefix cache, then the head) for
each R in ``--rows``, on up to three paths: the output head applied as ``W @ h.T`` (mahalo's CPU
path for plain Llama-family heads), the model's own head (``F.linear``), and, with
``--compile``, the backbone compiled by ``torch.compile`` (``engine.compile=true``). It prints a
table (median ms per step over ``--repeats`` timed blocks of ``--steps`` steps each), writes
``step_cost.csv`` and ``step_cost.png``.

Example::

    OMP_NUM_THREADS=2 python benchmarks/step_cost.py --rows 1,2,3,5,8,10,16 --threads 2
    OMP_NUM_THREADS=2 python benchmarks/step_cost.py --rows 5,40,160 --compile --threads 2 --tag compile
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
from mahalo.cascade import PROMPT as PROMPT_LEVEL  # noqa: E402
from mahalo.cascade import ROW, Item  # noqa: E402
from mahalo.policy import HFPolicy  # noqa: E402

log = logging.getLogger("benchmarks.step_cost")

PROMPT = "What happens if you eat watermelon seeds? Answer in detail, please."
PATHS = ("head W@h.T", "model forward", "compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="step_cost.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, prompts_default=1)
    p.add_argument("--rows", type=common.int_list, default=[1, 2, 3, 5, 8, 10, 16], help="batch sizes R")
    p.add_argument("--steps", type=int, default=10, help="decode steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per (R, path); the median is reported")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd backbone (engine.compile)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    return args


def time_step(policy: HFPolicy, ids: list[int], rows: int, steps: int, repeats: int) -> float:
    """Median milliseconds of one decode step of ``rows`` rows reading one cached prompt (its
    forward and its head), a fresh set of rows per timed block."""
    times = []
    none = (-1, 0)
    for _ in range(repeats + 1):  # the first block warms up (and compiles) and is dropped
        kv = policy.shared_kv()
        prompt = kv.prompt.alloc()
        policy.run(kv, [Item(ids, 0, (PROMPT_LEVEL, prompt, 0), (none,) * 4)])
        slots = [kv.row.alloc() for _ in range(rows)]
        reads = (none, (prompt, len(ids)), none, none)
        t0 = time.perf_counter()
        for step in range(steps):
            items = [Item([100], len(ids) + step, (ROW, slot, step), reads) for slot in slots]
            policy.logits(policy.run(kv, items)[0])
        times.append(1000.0 * (time.perf_counter() - t0) / steps)
    return common.median(times[1:])


def measure(models: common.BenchModels, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per (path, R)."""
    fast = HFPolicy(*models.policy)
    if fast._head is None:
        raise ValueError("this policy has no plain output head on this device: nothing to compare")
    plain = HFPolicy(*models.policy)
    plain._head = None  # the model's own F.linear head
    policies = [fast, plain]
    if args.compile:
        compiled = HFPolicy(*models.policy)
        compiled.compile()
        policies.append(compiled)
    ids = fast.prompt_ids([{"role": "user", "content": PROMPT}])
    records = []
    for rows in args.rows:
        for path, policy in zip(PATHS, policies):
            ms = time_step(policy, ids, rows, args.steps, args.repeats)
            records.append({"path": path, "rows": rows, "ms_per_step": ms, "ms_per_row": ms / rows})
            log.info("%s R=%d: %.1f ms/step", path, rows, ms)
    base = {r["path"]: r["ms_per_step"] for r in records if r["rows"] == min(args.rows)}
    for r in records:
        r["vs_smallest_batch"] = r["ms_per_step"] / base[r["path"]]
    return records


def table(records: list[dict[str, Any]]) -> Table:
    """Rows x paths: ms per step, and each path's cost relative to its smallest batch."""
    paths = [p for p in PATHS if any(r["path"] == p for r in records)]
    t = Table(title="policy decode step cost (median ms per step)")
    for col in ("R", *(f"{p} ms" for p in paths), *(f"{p} / R=min" for p in paths), "head speed-up"):
        t.add_column(col, justify="right")
    by = {(r["path"], r["rows"]): r for r in records}
    for rows in sorted({r["rows"] for r in records}):
        here = [by[(p, rows)] for p in paths]
        t.add_row(str(rows), *(common.fmt(r["ms_per_step"], 1) for r in here),
                  *(common.fmt(r["vs_smallest_batch"]) for r in here),
                  common.fmt(here[1]["ms_per_step"] / here[0]["ms_per_step"]))
    return t


def write_plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """ms per step vs R, one line per path."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in PATHS:
        sel = sorted((r["rows"], r["ms_per_step"]) for r in records if r["path"] == p)
        if not sel:
            continue
        ax.plot([x for x, _ in sel], [y for _, y in sel], marker="o", label=p)
    ax.set_xlabel("rows decoded together (R = B*N)")
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Measure, print, write CSV (and PNG)."""
    args = parse_args(argv)
    console = common.start(args)
    try:
        models = common.load_bench_models(args.models, args.device, args.dtype, args.truth_head)
        machine = common.machine_info(models.device, args.machine)
        console.print(common.machine_line(machine), style="dim", markup=False)
        records = measure(models, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stem = common.out_stem("step_cost", args.tag)
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", records)
    common.write_json(args.out_dir / f"{stem}.json", {"meta": {"args": vars(args), "machine": machine},
                                                      "records": records})
    plot = None if args.no_plot else write_plot(records, args.out_dir / f"{stem}.png")
    console.print(table(records))
    console.print(f"wrote {csv_path}" + (f" and {plot}" if plot else ""), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
