#!/usr/bin/env python
"""The policy's own answers to TruthfulQA *train* questions, judged: training rows for a probe
that selects among the policy's samples (issue 22, target 3).

The truth probe shipped so far learned from TruthfulQA's human-written answers
(``judge_train.jsonl``); the answers it must rank at decode time are the policy's own, which read
differently (longer, hedged, rambling). This script samples ``--samples`` answers per train
question exactly as ``benchmarks/quality_compute.py``'s ``bon16`` does (the engine's best-of-N with
the truth default's options: embedded SmolLM2-135M-Instruct, the QA primer of
``conf/objective/truth.yaml`` as system turn, temperature 1, top-k 50, at most
``--max-new-tokens`` tokens; ``--batch`` questions in flight, seed ``--seed``), keeps *every*
candidate with its scores (``truth``: the end-of-turn head; ``truth_probe``: the embedded probe)
and labels each with the similarity judge of ``benchmarks/truthfulqa.py`` (all-MiniLM-L6-v2
against the question's *train* references). The output has ``judge_train.jsonl``'s fields
(``question``, ``answer``, ``truthful``) plus the candidate index, token count, scores and the
judge's similarities, so ``scripts/probe_study.py --train-files`` reads it as it reads the human
answers, and best-of-k selection rules can be compared offline on it.

Only ``questions_train.csv`` is read: dev questions are never sampled here.

Usage (two shards on two cores, then the probe study)::

    python scripts/policy_pool.py --data-dir ../shared/data/truthfulqa --shard 0/2 \
        --out /tmp/mahalo_pool/pool_0.jsonl
    python scripts/policy_pool.py --data-dir ../shared/data/truthfulqa --shard 1/2 \
        --out /tmp/mahalo_pool/pool_1.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks import quality_compute as qc  # noqa: E402
from benchmarks import truthfulqa as tqa  # noqa: E402
from mahalo.api import guided_generate_many  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402

log = logging.getLogger("policy_pool")
TRAIN_QUESTIONS = "questions_train.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder with questions_train.csv")
    p.add_argument("--out", type=Path, required=True, help="JSONL written (resumed: done questions are skipped)")
    p.add_argument("--samples", type=int, default=16, help="answers per question (best-of-N's N)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="questions in flight")
    p.add_argument("--num-questions", type=int, default=None, help="the first N train questions (default all)")
    p.add_argument("--shard", type=tqa._shard, default=(0, 1), metavar="I/N", help="questions i, i+N, i+2N, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    try:
        questions = common.read_questions(args.data_dir / TRAIN_QUESTIONS, args.num_questions)
        models = common.load_bench_models("embedded", shared=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    i, n = args.shard
    done = {r["question"] for r in common.read_jsonl(args.out)} if args.out.is_file() else set()
    todo = [q for q in questions[i::n] if q.question not in done]
    rewards = {"truth": as_reward(models.truth, "truth"),
               qc.PROBE: qc.load_probe("embedded", models.policy)}
    options = {**qc.config_options("bon16"), "num_candidates": args.samples,
               "weights": {"truth": 1.0, qc.PROBE: 0.0}}  # bon16's rule; the probe is only read
    judge = tqa.SimilarityJudge(tqa.MiniLMEmbedder())
    tok = models.policy[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = guided_generate_many(as_policy(models.policy), rewards, [q.question for q in todo], errors="return",
                                   max_new_tokens=args.max_new_tokens, seed=args.seed, max_prompts=args.batch,
                                   **options)
    for n_done, (j, res) in enumerate(results, 1):
        q = todo[j]
        if isinstance(res, ValueError):
            log.error("question %d failed: %s", q.index, res)
            continue
        (step,) = res.steps  # best-of-N: one step, whole answers
        for c, cand in enumerate(step.candidates):
            text = tok.decode(cand.token_ids, skip_special_tokens=True).strip()
            v = judge(q, text)
            common.append_jsonl(args.out, {
                "question": q.question, "answer": text, "truthful": v.truthful, "question_index": q.index,
                "seed": args.seed, "candidate": c, "chosen": c == step.chosen, "tokens": len(cand.token_ids),
                "end": cand.end, "scores": cand.scores, "best_correct": v.best_correct,
                "best_incorrect": v.best_incorrect, "no_comment": tqa.no_comment(text)})
        el = time.time() - t0
        log.info("question %d (%d/%d) %.0fs, eta %.0fs", q.index, n_done, len(todo), el,
                 el / n_done * (len(todo) - n_done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
