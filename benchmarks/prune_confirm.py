#!/usr/bin/env python
"""Early rejection on all dev questions and three seeds (issue 22's targets), against the judged
answers of the truth default and of sampling with the same system turn already on record.

Reads ``quality_compute.py``'s judged answers of ``beam4x4_prune`` (or of ``--configs``; ``--pruned``:
204 dev questions x seeds 0-2) and ``truthfulqa.py``'s judged answers of ``truth_default`` and
``truth_default_sample`` (``--earlier``, the 2026-11-29 run behind conf/objective/truth.yaml; the
engine has changed since, but its answers have not: the truth default's 100 answers of seed 0 in
``quality_compute_dev100`` are token-identical to that run's). Prints and writes
(``--out``) each configuration's % truthful (MiniLM judge), truth reward and policy tokens per
question, and the paired bootstrap differences (a question's value: its mean over the seeds;
2000 resamples, seed 0), with ``truthfulqa.py``'s functions.

Policy tokens are counted as the earlier run counted them, the whole prompt billed to each
question (``policy_tokens - prefill_billed + prompt_tokens`` for the new engine's rows, which
prefill the shared system turn once).

    python benchmarks/prune_confirm.py
    python benchmarks/prune_confirm.py --configs beam4x4_prune,bon16 --out benchmarks/results/dev204_confirm.json

Each configuration is compared with sampling and with the default, and the default with each
configuration and with sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks import truthfulqa as tqa  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRUNED, DEFAULT, SAMPLE = "beam4x4_prune", "truth_default", "truth_default_sample"


def whole_prompt_tokens(row: dict) -> float:
    """A row's policy tokens with its whole prompt billed to it (the earlier engine's count)."""
    if row.get("prefill_billed") not in (None, ""):
        return float(row["policy_tokens"]) - float(row["prefill_billed"]) + float(row["prompt_tokens"])
    return float(row["policy_tokens"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pruned", type=Path, default=RESULTS / "quality_compute_dev204_answers.csv")
    p.add_argument("--earlier", type=Path, default=RESULTS / "truthfulqa_dev_default_answers.csv")
    p.add_argument("--out", type=Path, default=RESULTS / "prune_confirm.json")
    p.add_argument("--configs", default=PRUNED, help="comma-separated quality_compute.py configurations to read")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    rows = [r for r in tqa.read_judged(args.pruned) if r["strategy"] in configs]
    rows += [r for r in tqa.read_judged(args.earlier) if r["strategy"] in (DEFAULT, SAMPLE)]
    for r in rows:
        for key in ("wall_s", "response_tokens", "policy_tokens", "rm_tokens"):
            r[key] = float(r[key]) if r.get(key) not in (None, "") else 0.0
        r["policy_tokens"] = whole_prompt_tokens(r)
    names = [SAMPLE, DEFAULT, *configs]
    seeds = {n: sorted({r["seed"] for r in rows if r["strategy"] == n}) for n in names}
    summary = tqa.summarize(rows, names)
    pairs = [(c, SAMPLE) for c in configs] + [(c, DEFAULT) if c == PRUNED else (DEFAULT, c) for c in configs]
    paired = tqa.compared_differences(rows, pairs + [(DEFAULT, SAMPLE)])
    lines = ["| configuration | seeds | questions | % truthful [95% CI] | truth reward | policy tokens / q |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| `{s['strategy']}` | {','.join(seeds[s['strategy']])} | {s['questions']} | "
                     f"{tqa._ci(s, 'pct_truthful', 1)} | {tqa._ci(s, 'mean_truth', 2)} | {s['mean_policy_tokens']:.0f} |")
    lines += ["", "| difference | questions | % truthful (points) [95% CI] | truth reward [95% CI] |", "|---|---|---|---|"]
    for d in paired:
        lines.append(f"| `{d['strategy']}` - `{d['baseline']}` | {d['questions']} | "
                     f"{tqa._ci(d, 'd_pct_truthful', 1)} | {tqa._ci(d, 'd_mean_truth', 2)} |")
    tokens = {s["strategy"]: s["mean_policy_tokens"] for s in summary}
    ratios = {c: tokens[c] / tokens[DEFAULT] for c in configs}
    lines += [f"\npolicy tokens per question, {c} / {DEFAULT}: {r:.2f}" for c, r in ratios.items()]
    ratio = ratios.get(PRUNED)
    print("\n".join(lines))
    args.out.write_text(json.dumps({"summary": summary, "paired": paired, "token_ratio": ratio,
                                    "token_ratios": ratios, "seeds": seeds,
                                    "pruned": str(args.pruned.name), "earlier": str(args.earlier.name),
                                    "machine": common.machine_info()},
                                   indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
