"""Scale-out: the local launcher (1 process, 2 threads) against Ray with 2 replicas (1 thread each).

Both answer the same first ``--num-prompts`` TruthfulQA dev questions (default 24) with the run
config ``python -m mahalo.decode +objective=truth`` composes (embedded models, step best-of-5,
``search.max_new_tokens``), through the code the CLI runs for ``launcher=local`` and
``launcher=ray``. Each repeat records:

* local: model load, decode, total; ray: cluster start (``ray.init`` of a fresh local instance),
  replicas ready (actors started and models loaded, from the dataset's start), decode (from the
  last replica ready to the last answer), total (cluster start to last answer) and shutdown;
* questions per minute over the total (what a user waits for) and over the decode alone;
* whether Ray's answer text equals the local one for every question.

Repeats alternate local and Ray; the table gives medians. Outputs (``--out-dir``):
``scale_out.json``, ``scale_out.csv``, ``scale_out.png``.

Smoke run (tiny random models; numbers meaningless)::

    python benchmarks/scale_out.py --models tiny --num-prompts 4 --max-new-tokens 16 --repeats 1 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from mahalo.api import guided_generate_many  # noqa: E402
from mahalo.app.config import RunConfig  # noqa: E402
from mahalo.app.registry import load_guide  # noqa: E402

log = logging.getLogger("benchmarks.scale_out")

ROW_FIELDS = ["launcher", "repeat", "questions", "cluster_start_s", "load_s", "decode_s", "total_s", "shutdown_s",
              "questions_per_min", "decode_questions_per_min", "same_text_as_local"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, prompts_default=24)
    s = p.add_argument_group("run")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--replicas", type=int, default=2, help="Ray replicas (default 2)")
    s.add_argument("--local-threads", type=int, default=2, help="torch threads of the local launcher (default 2)")
    s.add_argument("--replica-cpus", type=int, default=1, help="CPUs (= torch threads) per replica (default 1)")
    s.add_argument("--repeats", type=int, default=2, help="local/Ray pairs, alternating (default 2)")
    s.add_argument("--no-plot", action="store_true")
    s.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.replicas < 1:
        p.error("--repeats and --replicas must be >= 1")
    return args


def run_config(args: argparse.Namespace, prompts_file: Path, ray: bool) -> RunConfig:
    """What ``python -m mahalo.decode +objective=truth prompts=FILE [launcher=ray ...]`` composes."""
    from mahalo.decode import compose_config

    overrides = ["+objective=truth", f"prompts={prompts_file}", f"search.max_new_tokens={args.max_new_tokens}",
                 f"search.seed={args.seed}", f"models={args.models}"]
    if args.models == "embedded" and args.truth_head:
        overrides.append(f"models.rewards.truth.head_file={args.truth_head}")
    if ray:
        overrides += ["launcher=ray", f"launcher.replicas={args.replicas}",
                      f"launcher.cpus_per_replica={args.replica_cpus}"]
    return compose_config(overrides)


def run_local(cfg: RunConfig, prompts: list[str], threads: int) -> tuple[dict[str, Any], dict[int, str]]:
    """``launcher=local``: load in this process, decode with many prompts in flight."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    policy, prms = load_guide(cfg.models, ["truth"])
    t1 = time.perf_counter()
    texts = {k: res.text for k, res in guided_generate_many(policy, prms, prompts, config=cfg.guide())}
    t2 = time.perf_counter()
    del policy, prms
    row = {"launcher": "local", "cluster_start_s": 0.0, "load_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
           "shutdown_s": 0.0}
    return row, texts


def run_ray(cfg: RunConfig, prompts: list[str]) -> tuple[dict[str, Any], dict[int, str]]:
    """``launcher=ray`` on a fresh local Ray instance: start it, answer, shut it down."""
    from mahalo.launch import ray as on_ray

    t0 = time.perf_counter()
    cluster = on_ray.connect(cfg.launcher)
    t1 = time.perf_counter()
    texts, ready = {}, set()
    wall_t1 = time.time()
    for a in on_ray.answer_many(cfg, ["truth"], prompts, cluster):
        texts[a.k] = a.result.text
        ready.add(a.ready)
    t2 = time.perf_counter()
    last_ready = max(ready) - wall_t1  # replicas started and loaded, from the dataset's start
    cluster.close()
    t3 = time.perf_counter()
    row = {"launcher": f"ray x{cfg.launcher.replicas}", "cluster_start_s": t1 - t0, "load_s": last_ready,
           "decode_s": (t2 - t1) - last_ready, "total_s": t2 - t0, "shutdown_s": t3 - t2}
    return row, texts


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every timing per launcher."""
    out = []
    for name in dict.fromkeys(r["launcher"] for r in rows):
        mine = [r for r in rows if r["launcher"] == name]
        med = {k: statistics.median(r[k] for r in mine) for k in ROW_FIELDS
               if k not in ("launcher", "repeat", "same_text_as_local", "questions")}
        out.append({"launcher": name, "repeats": len(mine), "questions": mine[0]["questions"], **med,
                    "same_text_as_local": all(r["same_text_as_local"] for r in mine)})
    return out


def table(medians: list[dict[str, Any]]) -> Table:
    t = Table(title="scale-out: TruthfulQA dev questions, step best-of-5, medians")
    for col in ("launcher", "runs", "cluster start s", "replicas ready / load s", "decode s", "total s",
                "q/min (total)", "q/min (decode)", "same text as local"):
        t.add_column(col, justify="left" if col == "launcher" else "right")
    for m in medians:
        t.add_row(m["launcher"], str(m["repeats"]), common.fmt(m["cluster_start_s"], 1), common.fmt(m["load_s"], 1),
                  common.fmt(m["decode_s"], 1), common.fmt(m["total_s"], 1), common.fmt(m["questions_per_min"]),
                  common.fmt(m["decode_questions_per_min"]), str(m["same_text_as_local"]))
    return t


def plot(medians: list[dict[str, Any]], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [m["launcher"] for m in medians]
    left = [0.0] * len(medians)
    for key, label, color in (("cluster_start_s", "cluster start", "#c44e52"), ("load_s", "models loaded", "#dd8452"),
                              ("decode_s", "decode", "#4c72b0")):
        widths = [m[key] for m in medians]
        ax.barh(names, widths, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for i, m in enumerate(medians):
        ax.text(left[i] + 1, i, f"{m['questions_per_min']:.1f} q/min", va="center")
    ax.set_xlabel("seconds (median)")
    ax.set_xlim(0, max(left) * 1.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    ax.set_title(f"{medians[0]['questions']} questions: where the time goes")
    fig.tight_layout()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = common.start(args)
    try:
        questions = common.read_questions(args.questions, args.num_prompts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [q.question for q in questions]
    machine = common.machine_info("cpu", args.machine)
    console.print(common.machine_line(machine), style="dim", markup=False)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "prompts.jsonl"
        file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        local_cfg, ray_cfg = run_config(args, file, ray=False), run_config(args, file, ray=True)
        rows: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            local_row, local_texts = run_local(local_cfg, prompts, args.local_threads)
            ray_row, ray_texts = run_ray(ray_cfg, prompts)
            for row, texts in ((local_row, local_texts), (ray_row, ray_texts)):
                row.update(repeat=repeat, questions=len(prompts), questions_per_min=60 * len(prompts) / row["total_s"],
                           decode_questions_per_min=60 * len(prompts) / row["decode_s"],
                           same_text_as_local=texts == local_texts)
                rows.append(row)
                console.print(f"[dim]{row['launcher']} #{repeat}: {row['total_s']:.1f} s total, "
                              f"{row['questions_per_min']:.2f} q/min[/dim]")
    medians = summary(rows)
    stem = common.out_stem("scale_out", args.tag)
    meta = {"args": vars(args), "machine": machine}
    json_path = common.write_json(args.out_dir / f"{stem}.json", {"meta": meta, "rows": rows, "medians": medians})
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", rows, ROW_FIELDS)
    png = None if args.no_plot else plot(medians, args.out_dir / f"{stem}.png")
    console.print(table(medians))
    console.print(f"wrote {json_path}, {csv_path}" + (f", {png}" if png else ""), markup=False)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
