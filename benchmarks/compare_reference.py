"""Reference decoder vs mahalo's ``step_best_of_n``: same prompts, same models, one process.

For every response length L (``--lengths``, default ``--max-new-tokens``) and every prompt i
(the first K TruthfulQA dev questions), it runs the reference decoder on prompt i, then mahalo
on prompt i, then prompt i+1, ... (alternating, so slow drift of the machine hits both alike),
with the same sampling settings (N candidates per step, temperature, top-k, sentence steps of at
least ``--min-step-tokens`` tokens, per-step cap ``--max-step-tokens``) and the same seed.

Per run it records: wall seconds (measured around each call with the same clock), policy tokens,
reward-model tokens, response tokens, steps, and the truth score of the final response (mahalo:
``result.scores["truth"]``; reference: its final text scored by the same reward model with one
full forward, :func:`benchmarks.reference_decoder.score_response`, not counted in its cost).

With ``--shared`` (default on; embedded models only) mahalo runs a second time with the truth
head read from the policy's own hidden states (:mod:`mahalo.rewards.shared_head`): no second
model, same answers; the ``shared`` rows and ``shared_vs_mahalo`` say what that removes.

With ``--unguided`` (default on) another engine runs too: mahalo's ``sample`` strategy, the
same policy and sampling settings with no reward model, the unguided baseline that says what
guidance costs per response token (``mahalo/unguided s/tok`` in the growth table).

Ratios are reference / mahalo per prompt; a summary ratio is the median over prompts of those
per-prompt ratios. The last line printed is the headline, at the last length of ``--lengths``::

    reference/mahalo wall ratio: <X>, reward-model tokens ratio: <Y>

Example (smoke run, tiny random models)::

    OMP_NUM_THREADS=1 python benchmarks/compare_reference.py --models tiny --num-prompts 2 \\
        --max-new-tokens 16 --threads 1
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
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.reference_decoder import reference_decode, score_response  # noqa: E402
from mahalo.api import guided_generate  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402
from mahalo.rewards.shared_head import SharedHeadReward  # noqa: E402

log = logging.getLogger("benchmarks.compare_reference")

ENGINES = ("reference", "mahalo", "shared", "unguided")
ROW_FIELDS = [
    "length", "prompt_index", "engine", "wall_s", "engine_wall_s", "policy_tokens", "rm_tokens",
    "response_tokens", "steps", "truth", "s_per_token", "rm_tokens_per_response_token",
    "policy_tokens_per_response_token", "stop_reason", "policy_tokens_padded", "rm_tokens_padded",
    "rm_full_rescore_tokens", "truth_rescored", "prompt", "text",
]
RATIO_KEYS = {  # summary ratio name -> row field
    "wall": "wall_s",
    "rm_tokens": "rm_tokens",
    "policy_tokens": "policy_tokens",
    "s_per_token": "s_per_token",
    "rm_tokens_per_response_token": "rm_tokens_per_response_token",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="compare_reference.py",
        description="Reference decoder vs mahalo step_best_of_n on the same prompts, alternating.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common.add_common_args(p, prompts_default=5)
    s = p.add_argument_group("decoding (applied to both engines)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="response token budget")
    s.add_argument("--lengths", type=common.int_list, default=None,
                   help="comma-separated budgets to repeat the comparison at (e.g. 64,128,256); "
                        "overrides --max-new-tokens; the headline uses the last one")
    s.add_argument("--num-candidates", type=int, default=5, help="N candidates per step")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--min-step-tokens", type=int, default=8, help="tokens before a sentence end may end a step")
    s.add_argument("--max-step-tokens", type=int, default=256,
                   help="per-step token cap of both engines (256 = the reference's max_tokens_per_sentence)")
    s.add_argument("--warmup", type=int, default=1,
                   help="unrecorded warm-up decodes per engine (16 tokens, first prompt) before measuring")
    s.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                   help="also run mahalo with the truth head on the policy's backbone (embedded models)")
    s.add_argument("--unguided", action=argparse.BooleanOptionalAction, default=True,
                   help="also run unguided sampling (mahalo's sample strategy) as a per-token baseline")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    args.lengths = args.lengths or [args.max_new_tokens]
    if args.num_prompts < 1 or args.num_candidates < 1:
        p.error("--num-prompts and --num-candidates must be >= 1")
    return args


# --------------------------------------------------------------------------- one run each


def _per_token(row: dict[str, Any]) -> dict[str, Any]:
    """Add the per-response-token figures to a row."""
    n = row["response_tokens"]
    row["s_per_token"] = common.ratio(row["wall_s"], n)
    row["rm_tokens_per_response_token"] = common.ratio(row["rm_tokens"], n)
    row["policy_tokens_per_response_token"] = common.ratio(row["policy_tokens"], n)
    return row


def run_reference(models: common.BenchModels, prompt: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """Decode ``prompt`` with the reference decoder; score its final text with the truth RM."""
    (pm, pt), truth_rm = models.policy, models.truth
    rm, rt, score_at = truth_rm.model, truth_rm.tokenizer, truth_rm.score_at
    t0 = time.perf_counter()
    res = reference_decode(
        pm, pt, rm, rt, prompt, num_candidates=args.num_candidates, max_new_tokens=length,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        min_step_tokens=args.min_step_tokens, max_step_tokens=args.max_step_tokens, score_at=score_at,
    )
    wall = time.perf_counter() - t0
    with torch.inference_mode():
        truth, _ = score_response(rm, rt, [{"role": "user", "content": prompt}], res.text, score_at)
    return _per_token({
        "engine": "reference", "wall_s": wall, "engine_wall_s": res.wall_s,
        "policy_tokens": res.policy_tokens, "rm_tokens": res.rm_tokens,
        "response_tokens": len(res.token_ids), "steps": len(res.steps), "truth": truth,
        "truth_rescored": truth, "stop_reason": res.stop_reason, "text": res.text,
        "policy_tokens_padded": res.policy_tokens, "rm_tokens_padded": res.rm_tokens,
        "rm_full_rescore_tokens": res.rm_tokens,
    })


def run_mahalo(engine: tuple[Any, dict[str, Any]], models: common.BenchModels, prompt: str, length: int,
               args: argparse.Namespace, *, guided: bool = True, name: str = "mahalo") -> dict[str, Any]:
    """Decode ``prompt`` with mahalo's ``step_best_of_n`` (or, unguided, ``sample`` without reward
    models); also rescore its text from scratch."""
    policy, prms = engine
    if guided:
        search = dict(strategy="step_best_of_n", num_candidates=args.num_candidates,
                      min_step_tokens=args.min_step_tokens, max_step_tokens=args.max_step_tokens)
    else:
        prms, search = {}, dict(strategy="sample")
    t0 = time.perf_counter()
    res = guided_generate(
        policy, prms, prompt, **search,
        max_new_tokens=length, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
    )
    wall = time.perf_counter() - t0
    truth_rm = models.truth
    with torch.inference_mode():
        rescored, _ = score_response(truth_rm.model, truth_rm.tokenizer, [{"role": "user", "content": prompt}],
                                     res.text, truth_rm.score_at)
    s = res.stats
    return _per_token({
        "engine": name if guided else "unguided", "wall_s": wall, "engine_wall_s": s.wall_s,
        "policy_tokens": s.policy_tokens, "rm_tokens": s.prm_tokens,
        "response_tokens": s.response_tokens, "steps": s.steps,
        "truth": res.scores.get("truth", rescored), "truth_rescored": rescored,
        "stop_reason": res.stop_reason, "text": res.text,
        "policy_tokens_padded": s.policy_tokens_padded, "rm_tokens_padded": s.prm_tokens_padded,
        "rm_full_rescore_tokens": s.prm_full_rescore_tokens,
    })


def warm_up(engine: tuple[Any, dict[str, Any]], models: common.BenchModels, prompt: str,
            args: argparse.Namespace) -> None:
    """Unrecorded short decodes, so one-off initialisation is not billed to the first prompt."""
    for _ in range(args.warmup):
        run_reference(models, prompt, min(16, args.lengths[0]), args)
        run_mahalo(engine, models, prompt, min(16, args.lengths[0]), args)
        if args.unguided:
            run_mahalo(engine, models, prompt, min(16, args.lengths[0]), args, guided=False)


# --------------------------------------------------------------------------- summaries


def prompt_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (length, prompt): reference / mahalo of every :data:`RATIO_KEYS` field."""
    pairs: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        pairs.setdefault((row["length"], row["prompt_index"]), {})[row["engine"]] = row
    out = []
    for (length, i), pair in sorted(pairs.items()):
        if not {"reference", "mahalo"} <= set(pair):
            continue
        ref, mah = pair["reference"], pair["mahalo"]
        out.append({"length": length, "prompt_index": i,
                    **{k: common.ratio(ref[f], mah[f]) for k, f in RATIO_KEYS.items()}})
    return out


def summarize(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], length: int) -> dict[str, Any]:
    """Medians per engine and median per-prompt ratios at one length."""
    out: dict[str, Any] = {"length": length}
    numeric = ["wall_s", "policy_tokens", "rm_tokens", "response_tokens", "steps", "truth",
               "s_per_token", "rm_tokens_per_response_token"]
    for engine in _engines(rows):
        sel = [r for r in rows if r["length"] == length and r["engine"] == engine]
        out[engine] = {f"median_{k}": common.median(r[k] for r in sel) for k in numeric}
        out[engine]["mean_truth"] = common.mean(r["truth"] for r in sel)
        out[engine]["prompts"] = len(sel)
    sel = [r for r in ratios if r["length"] == length]
    out["ratio_median_of_prompt_ratios"] = {k: common.median(r[k] for r in sel) for k in RATIO_KEYS}
    if "shared" in out:  # the head on the policy's backbone vs the separate reward model
        out["shared_vs_mahalo"] = {
            k: common.ratio(out["shared"][f"median_{k}"], out["mahalo"][f"median_{k}"])
            for k in ("wall_s", "s_per_token", "rm_tokens", "policy_tokens")
        }
        out["shared_same_text"] = sum(
            a["text"] == b["text"] for a in rows for b in rows
            if a["length"] == b["length"] == length and a["prompt_index"] == b["prompt_index"]
            and a["engine"] == "shared" and b["engine"] == "mahalo")
    if "unguided" in out:  # guided cost per response token, in units of unguided sampling's
        out["mahalo_over_unguided_s_per_token"] = common.ratio(
            out["mahalo"]["median_s_per_token"], out["unguided"]["median_s_per_token"])
    return out


def _engines(rows: list[dict[str, Any]]) -> list[str]:
    """The engines present in ``rows``, in :data:`ENGINES` order."""
    present = {r["engine"] for r in rows}
    return [e for e in ENGINES if e in present]


# --------------------------------------------------------------------------- printing


def _row_cells(label: str, engine: str, r: dict[str, Any]) -> list[str]:
    return [
        label, engine, common.fmt(r["wall_s"]), common.fmt(r["policy_tokens"], 0),
        common.fmt(r["rm_tokens"], 0), common.fmt(r["response_tokens"], 0), common.fmt(r["truth"], 3),
        common.fmt(r["s_per_token"], 4), common.fmt(r["rm_tokens_per_response_token"], 1),
    ]


def length_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    """One table per length: every prompt, both engines, then median (and mean truth) rows."""
    length = summary["length"]
    table = Table(title=f"reference vs mahalo step_best_of_n, max_new_tokens={length}")
    for col in ("prompt", "engine", "wall s", "policy tok", "RM tok", "resp tok", "truth",
                "s/tok", "RM tok/resp tok"):
        table.add_column(col, justify="left" if col in ("prompt", "engine") else "right")
    for row in rows:
        if row["length"] == length:
            table.add_row(*_row_cells(str(row["prompt_index"]), row["engine"], row))
    table.add_section()
    engines = [e for e in ENGINES if e in summary]
    for engine in engines:
        med = {k.removeprefix("median_"): v for k, v in summary[engine].items() if k.startswith("median_")}
        table.add_row(*_row_cells("median", engine, med))
    for engine in engines:
        table.add_row("mean truth", engine, "", "", "", "", common.fmt(summary[engine]["mean_truth"], 3), "", "")
    r = summary["ratio_median_of_prompt_ratios"]
    table.add_row("ratio ref/mahalo", "median of per-prompt", common.fmt(r["wall"]),
                  common.fmt(r["policy_tokens"]), common.fmt(r["rm_tokens"]), "", "",
                  common.fmt(r["s_per_token"]), common.fmt(r["rm_tokens_per_response_token"]))
    return table


def growth_table(summaries: list[dict[str, Any]]) -> Table:
    """How both engines grow with the response budget (medians over prompts)."""
    table = Table(title="growth with max_new_tokens (medians over prompts)")
    for col in ("length", "ref wall s", "mahalo wall s", "ref RM tok", "mahalo RM tok",
                "ref s/tok", "mahalo s/tok", "unguided s/tok", "wall ratio", "RM tok ratio",
                "mahalo/unguided s/tok"):
        table.add_column(col, justify="right")
    for s in summaries:
        ref, mah, r = s["reference"], s["mahalo"], s["ratio_median_of_prompt_ratios"]
        ung = s.get("unguided", {}).get("median_s_per_token")
        table.add_row(
            str(s["length"]), common.fmt(ref["median_wall_s"]), common.fmt(mah["median_wall_s"]),
            common.fmt(ref["median_rm_tokens"], 0), common.fmt(mah["median_rm_tokens"], 0),
            common.fmt(ref["median_s_per_token"], 4), common.fmt(mah["median_s_per_token"], 4),
            common.fmt(ung, 4), common.fmt(r["wall"]), common.fmt(r["rm_tokens"]),
            common.fmt(s.get("mahalo_over_unguided_s_per_token")),
        )
    return table


def shared_table(summary: dict[str, Any]) -> Table:
    """The truth head on the policy's backbone vs the separate reward model (medians over prompts)."""
    table = Table(title=f"truth head on the policy's backbone vs a separate reward model, "
                        f"max_new_tokens={summary['length']}")
    for col in ("engine", "wall s", "s/tok", "policy tok", "RM tok", "mean truth", "same text"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    same = f"{summary['shared_same_text']}/{summary['shared']['prompts']}"
    for engine in ("mahalo", "shared"):
        m = summary[engine]
        table.add_row(engine, common.fmt(m["median_wall_s"]), common.fmt(m["median_s_per_token"], 4),
                      common.fmt(m["median_policy_tokens"], 0), common.fmt(m["median_rm_tokens"], 0),
                      common.fmt(m["mean_truth"], 3), same if engine == "shared" else "")
    r = summary["shared_vs_mahalo"]
    table.add_row("shared/mahalo", common.fmt(r["wall_s"]), common.fmt(r["s_per_token"]),
                  common.fmt(r["policy_tokens"]), common.fmt(r["rm_tokens"]), "", "")
    return table


def headline(summary: dict[str, Any]) -> str:
    """The last line: median per-prompt ratios at the headline length, 2 decimals."""
    r = summary["ratio_median_of_prompt_ratios"]
    return (f"reference/mahalo wall ratio: {common.fmt(r['wall'])}, "
            f"reward-model tokens ratio: {common.fmt(r['rm_tokens'])}")


# --------------------------------------------------------------------------- main


def run_all(args: argparse.Namespace, models: common.BenchModels, prompts: list[str], console: Console) -> list[dict[str, Any]]:
    """Every length, every prompt, reference then mahalo; returns the rows."""
    policy = as_policy(models.policy)
    engine = (policy, {"truth": as_reward(models.truth, "truth")})
    shared = args.shared and models.description.get("models") == "embedded"
    if shared:  # the embedded truth model is SmolLM2 + a head: read that head off the policy's backbone
        truth = models.truth
        engine_shared = (policy, {"truth": SharedHeadReward(policy, truth.head, truth.num_labels, truth.score_at)})
    if args.warmup:
        warm_up(engine, models, prompts[0], args)
        if shared:
            run_mahalo(engine_shared, models, prompts[0], min(16, args.lengths[0]), args, name="shared")
    names = [e for e in ENGINES if (e != "shared" or shared) and (e != "unguided" or args.unguided)]
    rows = []
    for length in args.lengths:
        for i, prompt in enumerate(prompts):
            for name in names:
                if name == "reference":
                    run = run_reference(models, prompt, length, args)
                else:
                    run = run_mahalo(engine_shared if name == "shared" else engine, models, prompt, length, args,
                                     guided=name != "unguided", name=name)
                rows.append({"length": length, "prompt_index": i, "prompt": prompt, **run})
                console.print(f"[dim]L={length} prompt {i} {name}: {run['wall_s']:.2f} s, "
                              f"{run['response_tokens']} tokens, RM {run['rm_tokens']} tokens[/dim]")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the tables and the headline, write JSON and CSV."""
    args = parse_args(argv)
    console = common.start(args)
    try:
        questions, models, machine = common.load_run(args, console)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = run_all(args, models, [q.question for q in questions], console)
    ratios = prompt_ratios(rows)
    summaries = [summarize(rows, ratios, length) for length in args.lengths]
    stem = common.out_stem("compare_reference", args.tag)
    meta = {"args": vars(args), "machine": machine, "models": models.description,
            "ratio_definition": "median over prompts of per-prompt reference/mahalo ratios"}
    json_path = common.write_json(args.out_dir / f"{stem}.json",
                                  {"meta": meta, "summaries": summaries, "prompt_ratios": ratios, "rows": rows})
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", rows, ROW_FIELDS)
    for summary in summaries:
        console.print(length_table(rows, summary))
    console.print(growth_table(summaries))
    for summary in summaries:
        if "shared_vs_mahalo" in summary:
            console.print(shared_table(summary))
    console.print(f"wrote {json_path} and {csv_path}", markup=False)
    print(headline(summaries[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
