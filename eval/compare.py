"""One table of lm-evaluation-harness results: a row per model, a column per task and metric.

    python eval/compare.py results/                        # every results_*.json under it
    python eval/compare.py results/mahalo-sample results/mahalo-truth-beam

Each ``--output_path`` run of ``lm_eval`` writes ``<model>/results_<time>.json``; for a model
with several runs the latest counts. Prints a Markdown table (``metric ± stderr``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SKIP = ("alias", "name", "sample_len", " ")


def results_files(paths: list[str]) -> list[Path]:
    """``results_*.json`` files: the paths themselves, or those under a directory, oldest first."""
    found = []
    for p in map(Path, paths):
        found += sorted(p.rglob("results_*.json")) if p.is_dir() else [p]
    return sorted(found, key=lambda f: f.name)  # the file name is the run's time


def table(files: list[Path]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(columns, model -> column -> 'value ± stderr'); a later run of a model replaces an earlier one."""
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for f in files:
        report = json.loads(f.read_text())
        model = report.get("model_name") or report.get("config", {}).get("model_args", {}).get("model") or f.parent.name
        row = rows.setdefault(model, {})
        for task, metrics in sorted(report.get("results", {}).items()):
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if key in SKIP or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                column = f"{task} {metric}" + ("" if filt in ("", "none") else f" [{filt}]")
                if column not in columns:
                    columns.append(column)
                err = metrics.get(f"{metric}_stderr,{filt}")
                row[column] = f"{value:.3f}" + (f" ± {err:.3f}" if isinstance(err, (int, float)) else "")
    return columns, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="lm_eval results files or --output_path directories")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"compare: no such file or directory: {missing[0]}", file=sys.stderr)
        return 2
    files = results_files(args.paths)
    if not files:
        print(f"compare: no results_*.json under {args.paths}", file=sys.stderr)
        return 2
    columns, rows = table(files)
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for model, row in rows.items():
        print(f"| {model} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
