"""Apply the default-choice rule of ``benchmarks/DEFAULT_CHOICE_PLAN.md`` to a quality_compute.py
summary: among the candidates whose mean policy tokens per question are within the budget
(``--budget`` x the reference's), the highest % truthful; an exact tie goes to fewer tokens.

    python benchmarks/choose_default.py benchmarks/results/quality_compute_train150_summary.json \\
        --candidates beam4x4,beam4x4_prune,beam8x4_prune,beam4x8_prune --reference beam4x4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BUDGET = 1.10  # the plan's: at most 1.10x today's default's policy tokens per question


def choose(summary: list[dict[str, Any]], candidates: list[str], reference: str,
           budget: float = BUDGET) -> tuple[str, list[dict[str, Any]]]:
    """(the chosen configuration, one row per candidate: its % truthful, tokens, ratio to the
    reference and whether it is within budget).

    Raises:
        ValueError: a candidate or the reference missing from the summary, or none within budget.
    """
    by = {s["strategy"]: s for s in summary}
    missing = [n for n in [reference, *candidates] if n not in by]
    if missing:
        raise ValueError(f"not in the summary: {missing} (decode them first; summary has {sorted(by)})")
    ref_tokens = by[reference]["mean_policy_tokens"]
    rows = [{"config": n, "pct_truthful": by[n]["pct_truthful"], "mean_truth": by[n]["mean_truth"],
             "mean_policy_tokens": by[n]["mean_policy_tokens"],
             "token_ratio": by[n]["mean_policy_tokens"] / ref_tokens,
             "within_budget": by[n]["mean_policy_tokens"] <= budget * ref_tokens} for n in candidates]
    eligible = [r for r in rows if r["within_budget"]]
    if not eligible:
        raise ValueError(f"no candidate within {budget}x {reference}'s policy tokens")
    best = min(eligible, key=lambda r: (-r["pct_truthful"], r["mean_policy_tokens"]))
    return best["config"], rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="choose_default.py", description=__doc__.splitlines()[0])
    p.add_argument("summary", type=Path, help="quality_compute.py's ..._summary.json")
    p.add_argument("--candidates", required=True, help="comma-separated configuration names")
    p.add_argument("--reference", default="beam4x4", help="today's default (the budget's unit)")
    p.add_argument("--budget", type=float, default=BUDGET)
    args = p.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text(encoding="utf-8"))["summary"]
        chosen, rows = choose(summary, [c for c in args.candidates.split(",") if c], args.reference, args.budget)
    except (OSError, KeyError, json.JSONDecodeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['config']:16s} {r['pct_truthful']:5.1f} % truthful  truth {r['mean_truth']:+.3f}  "
              f"{r['mean_policy_tokens']:7.1f} policy tokens/q ({r['token_ratio']:.2f}x)"
              f"{'' if r['within_budget'] else '  over budget'}")
    print(f"chosen: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
