"""What a step rule costs: s/token and policy forwards per response token, fixed vs sentence steps.

Decodes the first ``--num-prompts`` TruthfulQA dev questions with ``sample`` and with
``step_best_of_n`` (N=5, the truth reward model), once with fixed 16-token steps and once with
sentence steps (cap 256, as ``compare_reference.py``), and prints per configuration: seconds per
response token, policy forwards per response token (a step lasts as long as its longest
candidate) and ms per forward. Fixed-size steps compare engines at equal work; sentence steps
show what the step rule adds.

It uses only ``guided_generate`` and the model loaders (``mahalo.app``, since 2026-11-28), so
two versions can be compared on the same machine::

    git worktree add /tmp/old <commit>
    (cd /tmp/old && OMP_NUM_THREADS=2 PYTHONPATH=/tmp/old python /path/to/benchmarks/step_rule_cost.py)
    OMP_NUM_THREADS=2 python benchmarks/step_rule_cost.py
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from mahalo import guided_generate

from mahalo.app.config import ModelConfig, ModelsConfig
from mahalo.app.registry import load_models

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "questions_dev.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=QUESTIONS)
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models(ModelsConfig(rewards={"truth": ModelConfig(kind="embedded")}), ["truth"])
    with args.questions.open(newline="", encoding="utf-8") as f:
        questions = [r["Question"] for r in csv.DictReader(f)][: args.num_prompts]
    guided_generate(models.policy, models.rewards, questions[0], max_new_tokens=16)  # warm-up
    steps = {"fixed": dict(step="max_tokens", min_step_tokens=0, max_step_tokens=16),
             "sentence": dict(max_step_tokens=256)}
    for rule, step in steps.items():
        for strategy in ("sample", "step_best_of_n"):
            rows = 1 if strategy == "sample" else 5
            prms = {} if strategy == "sample" else models.rewards
            wall = tokens = forwards = 0.0
            for q in questions:
                t = time.perf_counter()
                res = guided_generate(models.policy, prms, q, strategy=strategy, max_new_tokens=args.max_new_tokens,
                                      **step)
                wall += time.perf_counter() - t
                tokens += res.stats.response_tokens
                forwards += res.stats.policy_tokens_padded / rows
            print(f"{rule:8s} {strategy:15s} s/token {wall / tokens:.4f}  forwards/token {forwards / tokens:.2f}  "
                  f"ms/forward {1000 * wall / forwards:.1f}  response tokens {int(tokens)}", flush=True)


if __name__ == "__main__":
    main()
