"""Truthfulness against compute: guided search vs best-of-N at matched policy tokens (issue 22).

Guidance is worth its structure only if it buys more truthfulness than spending the same compute
on whole answers (best-of-N). This script decodes TruthfulQA questions under a grid of
configurations, all with the truth default's settings (``+objective=truth``: the QA primer system
turn, temperature 1, top-k 50, sentence steps, guided by the truth head alone, read on the
policy's backbone), differing only in the search and its width:

================= ==========================================================================
``sample``        unguided sampling, same system turn (truthfulqa.py's ``truth_default_sample``)
``bonN``          ``best_of_n``, N = 2, 4, 8, 16 whole answers, the best by the final truth score
``sbonN``         ``step_best_of_n``, N = 2, 4, 8 candidates per sentence step
``beamBx4``       ``step_beam``, B = 2, 4 beams x 4 candidates; ``beam4x4`` is ``+objective=truth``
``*_prune``       (``--with-prune``) ``bon8``, ``bon16``, ``sbon4``, ``sbon8``, ``beam2x4``,
                  ``beam4x4`` with early rejection inside a step by the free truth probe
                  (:data:`PRUNE`); the probe only prunes (weight 0), the head still selects
``beam8x4``,      wider beams (8 x 4, 4 x 8), with or without ``_prune``: decoded only when
``beam4x8``       named in ``--configs`` (candidates for the default, not in the plan's grid)
``*_prunehead``   the same early rejection ranked by the truth head itself (RM tokens per pruning)
``*_prune-eEkK``  early rejection with other settings (named only): every ``E`` tokens keep the
                  best ``K`` % (``beam4x4_prune-e4k50``: every 4 tokens, the better half); also
                  ``*_prunehead-eEkK``
``*_probesel``    (named only) the free probe selects alone (the head weighted 0), or
``*_headprobe``   head and probe z-scored over each pool and summed; no pruning
================= ==========================================================================

Per configuration: % truthful on truthfulqa.py's independent MiniLM judge, the mean truth reward
of the final answer, **policy tokens per question** (``stats.policy_tokens``: the question's own
prefill plus every candidate token fed, pruned ones included; the shared system turn is prefilled
once into a root slot and billed to no question; the head's scoring suffixes are RM tokens) and
wall seconds per question at ``--batch`` in flight. Then each guided configuration's paired gain
over the unpruned best-of-N at the nearest policy-token cost at or above its own, and over
``sample`` (truthfulqa.py's paired bootstrap, imported). The plan fixed before any dev decoding is
``benchmarks/QUALITY_COMPUTE_PLAN.md``.

Answers are appended to ``quality_compute[_TAG]_answers.jsonl`` as each question finishes; each
configuration's decode time goes to ``..._timing.jsonl`` when its batch ends, so an interrupted
run resumes where it stopped (the interrupted batch's answers are kept; its time is lost and its
questions' wall time is then that of the remaining ones). Outputs: ``..._summary.{csv,json,md}``,
``..._paired.csv`` and ``quality_compute[_TAG].png``.

Smoke run (tiny random models, seconds)::

    OMP_NUM_THREADS=1 python benchmarks/quality_compute.py --models tiny --num-questions 2 \\
        --max-new-tokens 16 --with-prune --threads 1 --tag smoke
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import truthfulqa as tqa  # noqa: E402
from mahalo.api import guided_generate, guided_generate_many  # noqa: E402
from mahalo.chat import conversation_prefix_ids, generation_prompt_ids  # noqa: E402
from mahalo.config import config_from_options  # noqa: E402
from mahalo.engine.controller import MIN_SHARED  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402

try:  # the free probe (issue 22 item 1); without it the pruned configurations are skipped
    from mahalo.rewards.probe import EMBEDDED_TRUTH_PROBE, TokenProbeReward, probe_reward
except ImportError:  # pragma: no cover - an engine without the probe
    TokenProbeReward = probe_reward = EMBEDDED_TRUTH_PROBE = None

log = logging.getLogger("benchmarks.quality_compute")

# The search of each configuration; everything else is the truth default's (cli_truth_options).
GRID: dict[str, dict[str, Any]] = {
    "sample": {},  # truthfulqa.py's truth_default_sample
    "bon2": {"strategy": "best_of_n", "num_candidates": 2, "beam_width": 1},
    "bon4": {"strategy": "best_of_n", "num_candidates": 4, "beam_width": 1},
    "bon8": {"strategy": "best_of_n", "num_candidates": 8, "beam_width": 1},
    "bon16": {"strategy": "best_of_n", "num_candidates": 16, "beam_width": 1},
    "sbon2": {"strategy": "step_best_of_n", "num_candidates": 2, "beam_width": 1},
    "sbon4": {"strategy": "step_best_of_n", "num_candidates": 4, "beam_width": 1},
    "sbon8": {"strategy": "step_best_of_n", "num_candidates": 8, "beam_width": 1},
    "beam2x4": {"strategy": "step_beam", "beam_width": 2, "num_candidates": 4},
    "beam4x4": {"strategy": "step_beam", "beam_width": 4, "num_candidates": 4},
}
# Wider searches, run only when named in --configs (not part of the plan's grid): candidates for a
# new default at about today's cost once pruned (benchmarks/DEFAULT_CHOICE_PLAN.md).
WIDER: dict[str, dict[str, Any]] = {
    "beam8x4": {"strategy": "step_beam", "beam_width": 8, "num_candidates": 4},
    "beam4x8": {"strategy": "step_beam", "beam_width": 4, "num_candidates": 8},
}
# Early rejection, the one place its settings live: every 8 tokens of a step, keep the better half
# of the candidates still decoding by the free probe's partial score (at least one per beam).
PRUNE: dict[str, Any] = {"prune": True, "prune_by": "truth_probe", "prune_every": 8, "prune_keep": 0.5}
PRUNE_WEIGHTS = {"truth": 1.0, "truth_probe": 0.0}  # the probe prunes, it never selects
PRUNED = ("bon8", "bon16", "sbon4", "sbon8", "beam2x4", "beam4x4")  # of the grid (--with-prune)
PRUNE_SUFFIX = "_prune"
# The same early rejection ranked by the truth head itself (search.prune_by="truth"): each pruning
# forwards the candidates' scoring suffixes through the policy, billed as RM tokens. Named only in
# --configs (after the plan): ``<search>_prunehead`` for the searches that take ``_prune``.
HEAD_SUFFIX = "_prunehead"
PROBE = "truth_probe"
# Selection by the free probe (named only, after the plans): ``<search>_probesel``, the probe alone
# selects (the head is still read, weighted 0, so each answer records its truth reward: its RM
# tokens are spent for the report, not the choice); ``<search>_headprobe``, head and probe
# z-scored over each pool and summed. No pruning.
SELECTIONS: dict[str, dict[str, Any]] = {
    "_probesel": {"weights": {"truth": 0.0, PROBE: 1.0}},
    "_headprobe": {"weights": {"truth": 1.0, PROBE: 1.0}, "normalize": "zscore"},
}
TINY_PROBE_LAYER = 1  # the tiny policy has 2 decoder layers


def config_names(with_prune: bool) -> list[str]:
    """The configurations of a run: the unpruned grid, then (``with_prune``) the pruned ones."""
    return list(GRID) + ([n + PRUNE_SUFFIX for n in PRUNED] if with_prune else [])


# ``_prune-e4k25``: the same early rejection every 4 tokens keeping the best 25 %.
SETTINGS = re.compile(r"-e(?P<every>[1-9][0-9]*)k(?P<keep>[1-9][0-9]?|100)$")


def split_name(name: str) -> tuple[str, str, dict[str, Any]]:
    """``(search, suffix, prune settings)`` of a configuration name: ``beam4x4_prune-e4k25`` is
    ``("beam4x4", "_prune", {"prune_every": 4, "prune_keep": 0.25})``; the settings are empty
    for :data:`PRUNE`'s."""
    settings: dict[str, Any] = {}
    m = SETTINGS.search(name)
    if m and name[:m.start()].endswith((PRUNE_SUFFIX, HEAD_SUFFIX)):
        settings = {"prune_every": int(m["every"]), "prune_keep": int(m["keep"]) / 100}
        name = name[:m.start()]
    for suffix in (PRUNE_SUFFIX, HEAD_SUFFIX, *SELECTIONS):
        if name.endswith(suffix):
            return name.removesuffix(suffix), suffix, settings
    return name, "", settings


def is_pruned(name: str) -> bool:
    """Early rejection, by the probe (``_prune``) or by the head (``_prunehead``)."""
    return split_name(name)[1] in (PRUNE_SUFFIX, HEAD_SUFFIX)


def uses_probe(name: str) -> bool:
    return split_name(name)[1] in (PRUNE_SUFFIX, *SELECTIONS)


def config_options(name: str) -> dict[str, Any]:
    """The ``guided_generate`` options of configuration ``name`` (system turn included)."""
    base_name, suffix, settings = split_name(name)
    searches = GRID | WIDER
    if base_name not in searches or (is_pruned(name) and base_name not in (*PRUNED, *WIDER)) or (
            suffix in SELECTIONS and base_name == "sample"):
        known = config_names(True) + [n + s for n in WIDER for s in ("", PRUNE_SUFFIX)] + [
            n + HEAD_SUFFIX for n in (*PRUNED, *WIDER)] + ["<pruned>-eEkK", *(f"<search>{x}" for x in SELECTIONS)]
        raise ValueError(f"unknown configuration {name!r}: choose from {known}")
    if base_name == "sample":
        return tqa.strategy_options("truth_default_sample", argparse.Namespace(
            temperature=1.0, top_k=50, num_candidates=5, beam_candidates=4, custom=[]))
    options = {**tqa.cli_truth_options(), **searches[base_name]}
    if suffix == PRUNE_SUFFIX:
        options.update(PRUNE, weights=dict(PRUNE_WEIGHTS))
    elif suffix == HEAD_SUFFIX:
        options.update(PRUNE, prune_by="truth", weights={"truth": 1.0})
    elif suffix in SELECTIONS:
        options.update(SELECTIONS[suffix])
    return options | settings


def probe_available() -> bool:
    return probe_reward is not None


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="quality_compute.py",
        description="TruthfulQA: % truthful and truth reward against policy tokens per question, "
                    "guided search vs best-of-N.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common.add_common_args(p, prompts_default=100, prompts_flag="--num-questions")
    s = p.add_argument_group("decoding")
    s.add_argument("--configs", type=common.str_list, default=None,
                   help=f"a subset of {config_names(True)} (default: the unpruned grid, plus the pruned "
                        "ones with --with-prune)")
    s.add_argument("--with-prune", action="store_true",
                   help=f"also the early-rejection configurations ({', '.join(PRUNED)} with {PRUNE})")
    s.add_argument("--skip-questions", type=int, default=0, metavar="K",
                   help="skip the first K questions of the file: decode questions K .. K+N-1 (N: --num-questions)")
    s.add_argument("--probe", type=Path, default=None,
                   help="probe file of the _prune, _probesel and _headprobe configurations (default: the "
                        "embedded truth probe; the "
                        "curves of 2026-12-03 used mahalo/assets/smollm2_135m_truth_probe_linear.safetensors). "
                        "Not part of an answer's key: use a new --tag per probe")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--batch", type=int, default=16, help="questions in flight (the many-prompt engine)")
    s.add_argument("--seeds", type=tqa._seeds, default=None, metavar="S,S,...",
                   help="decode every configuration once per seed (replaces --seed)")
    s.add_argument("--warmup", type=int, default=1, help="unrecorded 16-token warm-up decodes")
    j = p.add_argument_group("judge and report")
    j.add_argument("--judge", choices=("minilm", "none"), default="minilm")
    j.add_argument("--embedder-path", type=Path, default=None)
    p.add_argument("--fresh", action="store_true", help="discard earlier answers of this tag")
    p.add_argument("--report-only", action="store_true", help="decode nothing: judge and report the JSONL")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(shared_head=True)  # the truth head on the policy's backbone, as the CLI reads it
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.skip_questions < 0:
        p.error("--skip-questions must be >= 0")
    if args.report_only and args.fresh:
        p.error("--report-only and --fresh cannot be combined")
    args.configs = args.configs or config_names(args.with_prune)
    for name in args.configs:
        try:
            config_options(name)
        except ValueError as err:
            p.error(str(err))
    if any(uses_probe(n) for n in args.configs) and not probe_available():
        print("note: mahalo.rewards.probe cannot be imported (an engine without the free probe): "
              "the pruned configurations are skipped", file=sys.stderr)
        args.configs = [n for n in args.configs if not uses_probe(n)]
    try:  # an invalid option fails now, not after the models load
        for name in args.configs:
            opts = {k: v for k, v in config_options(name).items() if k != "system_prompt"}
            config_from_options(max_new_tokens=args.max_new_tokens, **opts)
    except ValueError as err:
        p.error(f"configuration {name!r}: {err}")
    return args


# --------------------------------------------------------------------------- decoding


def load_probe(kind: str, policy: tuple[Any, Any], path: Path | None = None) -> Any:
    """The truth probe for ``policy``: ``path``, by default the embedded asset, or a random one
    for the tiny models (whose hidden size no asset fits; its numbers mean nothing, as every tiny
    number)."""
    if kind == "tiny":
        model = policy[0]
        weight = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(11))
        return TokenProbeReward(weight, 0.0, TINY_PROBE_LAYER)
    return probe_reward(policy, path)


def prefill_billed(tokenizer: Any, system_prompt: str | None, question: str) -> int:
    """Prompt tokens a question's own prefill forwards: its chat prompt minus the prefix it shares
    with other prompts (the system turn, prefilled once into a root slot when at least
    ``MIN_SHARED`` tokens), as the engine bills ``stats.policy_tokens``."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    ids = generation_prompt_ids(tokenizer, messages)
    if len(messages) < 2:
        return len(ids)
    prefix = conversation_prefix_ids(tokenizer, messages[:-1])
    n = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
    n = min(n, len(ids) - 1)
    return len(ids) - (n if n >= MIN_SHARED else 0)


def answer_record(args: argparse.Namespace, name: str, options: dict[str, Any], q: common.Question, res: Any,
                  run_id: str, billed: int) -> dict[str, Any]:
    """truthfulqa.py's record of the answer plus the counters this study needs; ``wall_s`` is
    filled at report time from the configuration's timing record ``run_id``."""
    s = res.stats
    rec = tqa.answer_record(args, name, options, q, res, math.nan, wall="batch_mean", batch=args.batch)
    return rec | {"run_id": run_id, "prompt_tokens": s.prompt_tokens, "prefill_billed": billed,
                  "decode_tokens": s.policy_tokens - billed, "pruned_rows": s.pruned_rows,
                  "pruned_tokens": s.pruned_tokens, "prune_prm_tokens": s.prune_prm_tokens,
                  "probe_file": probe_file(args) if uses_probe(name) else ""}


def probe_file(args: argparse.Namespace) -> str:
    """The name of the probe file this run's probe configurations (:func:`uses_probe`) read."""
    if args.models == "tiny":
        return "random (tiny models)"
    return Path(args.probe).name if args.probe else EMBEDDED_TRUTH_PROBE.name


def decode_config(models: common.BenchModels, rewards: dict[str, Any], name: str, qs: list[common.Question],
                  args: argparse.Namespace, paths: dict[str, Path], console: Any) -> None:
    """Decode ``qs`` under configuration ``name``, ``--batch`` in flight; each answer is appended
    as it finishes, the batch's wall time at its end."""
    options = config_options(name)
    run_id = f"{name}-s{args.seed}-{time.time_ns()}"
    tokenizer = models.policy[1]
    billed = {q.index: prefill_billed(tokenizer, options.get("system_prompt"), q.question) for q in qs}
    t0 = time.perf_counter()
    done = 0
    for i, res in guided_generate_many(as_policy(models.policy), rewards, [q.question for q in qs], errors="return",
                                       max_new_tokens=args.max_new_tokens, seed=args.seed, max_prompts=args.batch,
                                       **options):
        q = qs[i]
        if isinstance(res, ValueError):
            log.error("question %d, %s failed: %s", q.index, name, res)
            continue
        common.append_jsonl(paths["answers"], answer_record(args, name, options, q, res, run_id, billed[q.index]))
        done += 1
    wall = time.perf_counter() - t0
    common.append_jsonl(paths["timing"], {"run_id": run_id, "config": name, "seed": args.seed, "questions": done,
                                          "wall_s": wall, "batch": args.batch, "commit": common._git_commit()})
    console.print(f"{name} (seed {args.seed}): {done} questions, {wall / max(done, 1):.2f} s per question at "
                  f"{args.batch} in flight", style="dim", markup=False)


def decode_all(args: argparse.Namespace, models: common.BenchModels, questions: list[common.Question],
               paths: dict[str, Path], console: Any, probe: Any = None) -> None:
    """Every missing (configuration, question) answer of seed ``args.seed``, configuration by
    configuration in ``--configs`` order; ``probe`` is the probe configurations' (:func:`uses_probe`)."""
    common.repair_jsonl_tail(paths["answers"])
    done = {tqa.answer_key(r) for r in common.read_jsonl(paths["answers"])}
    truth = {"truth": as_reward(models.truth, "truth")}
    warm = False
    for name in args.configs:
        options = config_options(name)
        todo = [q for q in questions if key_of(args, name, options, q) not in done]
        console.print(f"{name} (seed {args.seed}): {len(todo)} to decode, {len(questions) - len(todo)} done",
                      markup=False)
        if not todo:
            continue
        rewards = truth
        if uses_probe(name):
            rewards = {**truth, PROBE: probe}
        if not warm:  # one-off initialisation is not billed to a configuration
            for _ in range(args.warmup):
                guided_generate(as_policy(models.policy), truth, questions[0].question, strategy="step_best_of_n",
                                num_candidates=2, max_new_tokens=16, seed=args.seed)
            warm = True
        decode_config(models, rewards, name, todo, args, paths, console)


def key_of(args: argparse.Namespace, name: str, options: dict[str, Any], q: common.Question) -> str:
    return tqa.answer_key({"models": args.models, "strategy": name, "options": options,
                           "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                           "question_index": q.index, "question": q.question})


# --------------------------------------------------------------------------- report


def current_answers(paths: dict[str, Path], args: argparse.Namespace,
                    questions: list[common.Question]) -> list[dict[str, Any]]:
    """This run's answers (first record per key), ``wall_s`` set to its batch's seconds per
    question (NaN when the batch was interrupted before its time was written)."""
    timing = {t["run_id"]: t for t in common.read_jsonl(paths["timing"])}
    wanted: dict[str, dict[str, Any] | None] = {}
    for seed in tqa.seeds_of(args):
        ns = argparse.Namespace(**{**vars(args), "seed": seed})
        for name in args.configs:
            options = config_options(name)
            for q in questions:
                wanted[key_of(ns, name, options, q)] = None
    for rec in common.read_jsonl(paths["answers"]):
        key = tqa.answer_key(rec)
        if key in wanted and wanted[key] is None:
            t = timing.get(rec.get("run_id"))
            wanted[key] = rec | {"wall_s": t["wall_s"] / t["questions"] if t and t["questions"] else math.nan}
    return [r for r in wanted.values() if r is not None]


def summarize(rows: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    """truthfulqa.py's summary (judge and reward with bootstrap CIs) plus this study's counters."""
    out = []
    for s in tqa.summarize([r | {"wall_s": 0.0} for r in rows], configs):  # wall: below, NaN-aware
        sel = [r for r in rows if r["strategy"] == s["strategy"]]
        wall = common.finite(r["wall_s"] for r in sel)
        out.append(s | {
            "decode_s_total": sum(wall), "decode_s_per_question": common.mean(wall) if wall else math.nan,
            "mean_decode_tokens": common.mean(r["decode_tokens"] for r in sel),
            "mean_prefill_billed": common.mean(r["prefill_billed"] for r in sel),
            # the counter as the engine before shared prefixes billed it (the 1,066): whole prompt + fed
            "mean_tokens_whole_prompt": common.mean(r["decode_tokens"] + r["prompt_tokens"] for r in sel),
            "mean_pruned_rows": common.mean(r["pruned_rows"] for r in sel),
            "mean_pruned_tokens": common.mean(r["pruned_tokens"] for r in sel),
            # RM tokens spent ranking partial candidates (_prunehead); in rm_tokens already (older records: 0)
            "mean_prune_rm_tokens": common.mean(float(r.get("prune_prm_tokens") or 0) for r in sel),
            "mean_backbone_tokens": common.mean(r["policy_tokens"] + r["rm_tokens"] for r in sel),
        })
    return out


def matched_bon(summary: list[dict[str, Any]], name: str) -> tuple[str | None, bool]:
    """The unpruned best-of-N at the nearest mean policy-token cost at or above ``name``'s, and
    whether it is that (False: every measured best-of-N is cheaper, the dearest is returned)."""
    cost = {s["strategy"]: s["mean_policy_tokens"] for s in summary}
    bons = sorted((cost[n], n) for n in cost if n.startswith("bon") and not is_pruned(n))
    if name not in cost or not bons:
        return None, False
    above = [n for c, n in bons if c >= cost[name]]
    return (above[0], True) if above else (bons[-1][1], False)


def comparisons(summary: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(guided, reference, kind): every guided configuration against its matched best-of-N, then
    every configuration against ``sample``."""
    names = [s["strategy"] for s in summary]
    out = []
    for n in names:
        if n == "sample" or (n.startswith("bon") and not is_pruned(n)):
            continue
        ref, at_or_above = matched_bon(summary, n)
        if ref is not None:
            out.append((n, ref, "bon >= cost" if at_or_above else "bon cheaper"))
    out += [(n, "sample", "vs sample") for n in names if n != "sample" and "sample" in names]
    if "beam4x4" in names:  # early rejection vs today's default
        out += [(n, "beam4x4", "vs default") for n in names if is_pruned(n)]
    return out


def paired(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """truthfulqa.py's paired bootstrap of every comparison, with the costs of both sides."""
    cost = {s["strategy"]: s["mean_policy_tokens"] for s in summary}
    out = []
    for a, b, kind in comparisons(summary):
        for d in tqa.compared_differences(rows, [(a, b)]):
            won, lost = won_lost(rows, a, b)
            out.append(d | {"kind": kind, "tokens": cost[a], "baseline_tokens": cost[b],
                            "token_ratio": cost[a] / cost[b] if cost[b] else math.nan,
                            "won": won, "lost": lost,
                            "beats": bool(d["d_pct_truthful_low"] > 0), "loses": bool(d["d_pct_truthful_high"] < 0)})
    return out


def won_lost(rows: list[dict[str, Any]], a: str, b: str) -> tuple[int, int]:
    """Questions where ``a``'s mean verdict (over seeds) beats ``b``'s, and the reverse."""
    qa, qb = tqa.by_question(rows, a), tqa.by_question(rows, b)
    diffs = [tqa._question_mean(qa[q], "truthful") - tqa._question_mean(qb[q], "truthful") for q in qa if q in qb]
    return sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


def pareto(summary: list[dict[str, Any]], key: str = "pct_truthful") -> list[str]:
    """Configurations no other beats on ``key`` at no more policy tokens, cheapest first."""
    pts = sorted(((s["mean_policy_tokens"], -s[key], s["strategy"]) for s in summary if math.isfinite(s[key])))
    front, best = [], -math.inf
    for _, neg, name in pts:
        if -neg > best:
            front.append(name)
            best = -neg
    return front


def summary_table(summary: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("config", "% truthful [95% CI]", "mean truth [95% CI]", "policy tok", "RM tok", "pruned tok",
                "resp tok", "s/question"):
        table.add_column(col, justify="left" if col == "config" else "right", no_wrap=col == "config")
    for s in summary:
        table.add_row(s["strategy"], tqa._ci(s, "pct_truthful", 1), tqa._ci(s, "mean_truth", 3),
                      common.fmt(s["mean_policy_tokens"], 0), common.fmt(s["mean_rm_tokens"], 0),
                      common.fmt(s["mean_pruned_tokens"], 0), common.fmt(s["mean_response_tokens"], 1),
                      common.fmt(s["decode_s_per_question"]))
    return table


def paired_rows_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="paired differences (bootstrap 95% CI over questions)")
    for col in ("config", "minus", "kind", "tokens ratio", "delta % truthful", "delta truth", "won/lost", "verdict"):
        table.add_column(col, justify="left" if col in ("config", "minus", "kind", "verdict") else "right")
    for d in rows:
        table.add_row(d["strategy"], d["baseline"], d["kind"], f"{d['token_ratio']:.2f}",
                      tqa._ci(d, "d_pct_truthful", 1), tqa._ci(d, "d_mean_truth", 3), f"{d['won']}/{d['lost']}",
                      verdict(d))
    return table


def verdict(d: dict[str, Any]) -> str:
    return "beats" if d["beats"] else "loses" if d["loses"] else "tie"


def markdown(summary: list[dict[str, Any]], pairs: list[dict[str, Any]], front: list[str], header: str) -> str:
    """The README tables."""
    lines = [header, "", "| config | % truthful [95% CI] | mean truth [95% CI] | policy tokens / question "
             "| same, whole prompt billed | RM tokens | pruned tokens | response tokens | s / question |",
             "|---" * 9 + "|"]
    for s in summary:
        mark = " *" if s["strategy"] in front else ""
        lines.append(f"| {s['strategy']}{mark} | {tqa._ci(s, 'pct_truthful', 1)} | {tqa._ci(s, 'mean_truth', 2)} | "
                     f"{s['mean_policy_tokens']:.0f} | {s['mean_tokens_whole_prompt']:.0f} | "
                     f"{s['mean_rm_tokens']:.0f} | {s['mean_pruned_tokens']:.0f} | "
                     f"{s['mean_response_tokens']:.1f} | {common.fmt(s['decode_s_per_question'])} |")
    lines += ["", "(* on the Pareto front of % truthful against policy tokens)", "",
              "| config | minus | kind | token ratio | delta % truthful [95% CI] | delta truth [95% CI] | won / lost "
              "| verdict |", "|---" * 8 + "|"]
    for d in pairs:
        lines.append(f"| {d['strategy']} | {d['baseline']} | {d['kind']} | {d['token_ratio']:.2f} | "
                     f"{tqa._ci(d, 'd_pct_truthful', 1)} | {tqa._ci(d, 'd_mean_truth', 2)} | {d['won']} / {d['lost']} "
                     f"| {verdict(d)} |")
    return "\n".join(lines) + "\n"


def write_plot(summary: list[dict[str, Any]], front: list[str], path: Path, title: str) -> Path | None:
    """Two panels against policy tokens per question (log x): % truthful with 95% CI bars and the
    Pareto front; the mean truth reward with its CI bars."""
    plt = common.pyplot()
    if plt is None or not summary:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    families = {"sample": ("black", "o"), "bon": ("tab:gray", "s"), "sbon": ("tab:blue", "^"),
                "beam": ("tab:red", "D")}
    by_name = {s["strategy"]: s for s in summary}
    for ax, (key, label) in zip(axes, (("pct_truthful", "% truthful (MiniLM judge), 95% CI"),
                                       ("mean_truth", "mean truth reward, 95% CI"))):
        for s in summary:
            name = s["strategy"]
            fam = next(f for f in ("sample", "sbon", "bon", "beam") if name.startswith(f))
            color, marker = families[fam]
            x, y = s["mean_policy_tokens"], s[key]
            if not math.isfinite(y):
                continue
            ax.errorbar([x], [y], yerr=[[y - s[f"{key}_low"]], [s[f"{key}_high"] - y]], fmt=marker, color=color,
                        mfc="white" if is_pruned(name) else color, capsize=3, ms=7, lw=1)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if key == "pct_truthful" and front:
            pts = [(by_name[n]["mean_policy_tokens"], by_name[n][key]) for n in front]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.step(xs + [max(s["mean_policy_tokens"] for s in summary) * 1.2], ys + [ys[-1]], where="post",
                    color="tab:green", alpha=0.6, lw=2, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("policy tokens per question (stats.policy_tokens, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(title + "\nfilled: no pruning, hollow: early rejection", fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    stem = common.out_stem("quality_compute", args.tag)
    return {"answers": args.out_dir / f"{stem}_answers.jsonl", "timing": args.out_dir / f"{stem}_timing.jsonl",
            "judged": args.out_dir / f"{stem}_answers.csv", "summary_csv": args.out_dir / f"{stem}_summary.csv",
            "summary_json": args.out_dir / f"{stem}_summary.json", "md": args.out_dir / f"{stem}_summary.md",
            "paired": args.out_dir / f"{stem}_paired.csv", "plot": args.out_dir / f"{stem}.png"}


def main(argv: list[str] | None = None) -> int:
    """Decode (or resume), judge, report."""
    args = parse_args(argv)
    console = common.start(args)
    paths = output_paths(args)
    if args.fresh:
        for key in ("answers", "timing"):
            paths[key].unlink(missing_ok=True)
    try:  # questions K .. K+N-1: load K+N, keep the last N (their indices stay the file's)
        questions, models, judge = tqa._load(argparse.Namespace(**{
            **vars(args), "num_prompts": args.skip_questions + args.num_prompts}))
        # the probe once, before any decoding: a missing or unfitting file is one line, not a traceback
        probe = (load_probe(args.models, models.policy, args.probe)
                 if any(uses_probe(n) for n in args.configs) and not args.report_only else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    questions = questions[args.skip_questions:]
    if not questions:
        print(f"error: {args.questions} has no questions after the first {args.skip_questions} "
              "(lower --skip-questions)", file=sys.stderr)
        return 2
    machine = common.machine_info(models.device, args.machine)
    console.print(common.machine_line(machine), style="dim", markup=False)
    if not args.report_only:
        for seed in tqa.seeds_of(args):
            decode_all(argparse.Namespace(**{**vars(args), "seed": seed}), models, questions, paths, console, probe)
    rows = tqa.judge_rows(current_answers(paths, args, questions), questions, judge)
    summary = summarize(rows, args.configs)
    pairs = paired(rows, summary) if judge else []
    front = pareto(summary) if judge else []
    n_q = max((s["questions"] for s in summary), default=0)
    title = (f"TruthfulQA {'train' if 'train' in Path(args.questions).name else 'dev'}: {n_q} questions x "
             f"{len(tqa.seeds_of(args))} seed(s), {args.max_new_tokens} tokens, models {args.models}")
    common.write_csv(paths["judged"], rows)
    common.write_csv(paths["summary_csv"], summary)
    common.write_csv(paths["paired"], pairs)
    meta = {"args": vars(args), "machine": machine, "models": models.description, "prune": PRUNE,
            "configs": {n: config_options(n) for n in args.configs}, "pareto_front": front,
            "policy_tokens": "stats.policy_tokens: the question's own prefill (the shared system turn is billed to "
                             "no question) + every candidate token fed (pruned ones included); scoring suffixes are "
                             "RM tokens",
            "bootstrap": {"method": "percentile", "resamples": tqa.BOOTSTRAP_RESAMPLES, "seed": tqa.BOOTSTRAP_SEED}}
    common.write_json(paths["summary_json"], {"meta": meta, "summary": summary, "paired": pairs})
    paths["md"].write_text(markdown(summary, pairs, front, f"### {title}"), encoding="utf-8")
    plot = None if args.no_plot else write_plot(summary, front, paths["plot"], title)
    console.print(summary_table(summary, title))
    if pairs:
        console.print(paired_rows_table(pairs))
        console.print(f"Pareto front: {', '.join(front)}", markup=False)
    console.print(f"wrote {', '.join(str(p.name) for k, p in paths.items() if p.exists())}"
                  + ("" if plot else " (no plot)"), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
