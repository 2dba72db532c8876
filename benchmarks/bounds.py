"""What no scheduler can beat: lower bounds on policy forwards and on the modelled H200 time,
computed from the committed schedule traces of ``throughput.py`` (no decoding, seconds to run).

Answers may not change, so every schedule does the same work: each prompt's rows feed the same
tokens, and a prompt's forwards form a *chain* (a token is sampled from the previous forward's
logits, a step is scored after its last token, the next step fans out after the scoring). The
``token`` run at ``max_prompts=1`` records each prompt's chain alone: prompt p takes ``F_p``
forwards (its prefill, its decode ticks, and the forwards that only read a reward head's scoring
suffix after a candidate ended on a token that is not fed). Hence, for any schedule:

* **cap bound** (``max_prompts = C``): a forward carries at most C prompts, one event of each, so
  forwards >= max(max_p F_p, ceil(sum_p F_p / C), F_(C) + F_(C+1)) (the last: with more than C
  prompts, two of the C+1 longest share a slot one after the other, F sorted longest first);
* **budget bound** (``max_rows = B`` decoding rows): forwards >= ceil(rows fed / B);
* **modelled H200 floor** (the roofline of ``throughput.py``, reused, a model, not a
  measurement): the policy costs at least max(forwards x weight read, its FLOPs) and the reward
  model at least max(scoring batches x weight read, its FLOPs), where forwards >= the chain bound,
  scoring batches >= the most steps any prompt takes, and the FLOPs count every token that must be
  computed (rows fed, each prompt's own prefill once and a shared system turn once; every
  candidate's scoring tokens once), leaving out the attention's pairs (about 1%): a floor.

``replay`` re-runs the chain model of the token engine's admission (first come first served,
prompt cap and decoding-row budget) on the recorded chains: it reproduces the measured forward
counts (a check of the model) and, admitting the longest chains first, shows what a scheduler
that knew each prompt's length in advance could reach. ``tail`` extrapolates target 3 (forwards
per question <= 1/4 of the ablation's) to more questions. An extrapolation is not a bound.

    python benchmarks/bounds.py                # prints the table, writes results/bounds.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import ROOFLINE, modelled_seconds

RESULTS = Path(__file__).resolve().parent / "results"
STEMS = ("throughput", "throughput_long128", "throughput_sbon")
TARGET_FRACTION = 0.25  # target 3: forwards per question <= 1/4 of the ablation's at 16 prompts


@dataclass
class Run:
    """One run of ``throughput.py``: its schedule trace and its row's settings."""

    stem: str
    strategy: str
    engine: str
    max_prompts: int
    max_rows: int
    questions: int
    forwards: list[dict[str, int]]
    scoring: list[dict[str, int]]

    @property
    def rows_fed(self) -> int:
        return sum(t["rows_fed"] for t in self.forwards)

    @property
    def prefill_tokens(self) -> int:
        return sum(t["prefill_tokens"] for t in self.forwards)

    @property
    def last_admission(self) -> int:
        """Index of the first forward after every question was admitted (throughput.py's steady end)."""
        return next((i for i, t in enumerate(self.forwards) if t["admitted"] == self.questions), len(self.forwards))


def read_runs(results: Path = RESULTS, stems: tuple[str, ...] = STEMS) -> list[Run]:
    """Every run of the ``<stem>_trace.jsonl`` files, with ``max_rows`` and ``questions`` from the
    matching ``<stem>.json`` rows (a stem without both files is skipped)."""
    runs = []
    for stem in stems:
        trace, table = results / f"{stem}_trace.jsonl", results / f"{stem}.json"
        if not (trace.exists() and table.exists()):
            continue
        rows = {(r["strategy"], r["engine"], r["max_prompts"]): r for r in json.loads(table.read_text())["rows"]}
        for line in trace.read_text().splitlines():
            t = json.loads(line)
            row = rows[(t["strategy"], t["engine"], t["max_prompts"])]
            runs.append(Run(stem, t["strategy"], t["engine"], t["max_prompts"], row["max_rows"], row["questions"],
                            t["forwards"], t["scoring"]))
    return runs


# -- chains: each prompt's forwards when it runs alone ----------------------------------------


def chains_of(alone: Run) -> list[list[int]]:
    """Per prompt (in input order), the rows it feeds at each of its forwards, from a run with
    one prompt in flight (every forward then belongs to the prompt admitted last)."""
    if alone.max_prompts != 1:
        raise ValueError(f"chains need a max_prompts=1 run, got max_prompts={alone.max_prompts}")
    chains: list[list[int]] = [[] for _ in range(alone.questions)]
    for t in alone.forwards:
        chains[t["admitted"] - 1].append(t["rows_fed"])
    return chains


def steps_of(alone: Run) -> list[int]:
    """Per prompt, its scoring batches (steps) when it runs alone."""
    per = Counter(alone.forwards[s["forward"] - 1]["admitted"] for s in alone.scoring)
    return [per[i + 1] for i in range(alone.questions)]


def cap_bound(lengths: list[int], cap: int) -> int:
    """Fewest forwards any schedule of these chains needs with at most ``cap`` prompts in flight."""
    if not lengths:
        return 0
    longest = sorted(lengths, reverse=True)
    bound = max(longest[0], math.ceil(sum(lengths) / cap))
    if len(longest) > cap:
        bound = max(bound, longest[cap - 1] + longest[cap])
    return bound


def budget_bound(rows_fed: int, max_rows: int) -> int:
    """Fewest forwards that can feed ``rows_fed`` rows at most ``max_rows`` per forward."""
    return math.ceil(rows_fed / max_rows) if max_rows else 0


def replay(chains: list[list[int]], cap: int, budget: int, longest_first: bool = False) -> int:
    """Forwards of the token engine's schedule of ``chains`` in the chain model: before each
    forward, waiting prompts join in order while prompts in flight stay within ``cap`` and the
    rows their next forward feeds (``plan_rows`` promised for a prompt not yet prefilled) within
    ``budget`` (one prompt always may join an empty batch); each forward advances every prompt in
    flight by one. ``longest_first``: admit the longest chains first (a scheduler that knew)."""
    plan_rows = max((r for c in chains for r in c), default=0)
    order = sorted(range(len(chains)), key=lambda p: -len(chains[p])) if longest_first else list(range(len(chains)))
    waiting = list(reversed(order))
    flight: dict[int, int] = {}  # prompt -> its next event
    forwards = 0

    def next_rows(p: int, k: int) -> int:
        return plan_rows if k == 0 else chains[p][k]

    while waiting or flight:
        while waiting:
            p = waiting[-1]
            rows = sum(next_rows(q, k) for q, k in flight.items()) + plan_rows
            if flight and (len(flight) + 1 > cap or (budget and rows > budget)):
                break
            flight[waiting.pop()] = 0
        forwards += 1
        for p in list(flight):
            flight[p] += 1
            if flight[p] == len(chains[p]):
                del flight[p]
    return forwards


# -- the modelled H200 floor ----------------------------------------------------------------


def weight_read_s() -> float:
    """Seconds one forward of one model costs at least: its weights read once."""
    return ROOFLINE["weights_bytes"] / ROOFLINE["bandwidth"]


def floor_seconds(rows_fed: int, prefill_tokens: int, scoring: list[dict[str, int]], min_forwards: int,
                  min_scorings: int) -> dict[str, float]:
    """The least modelled H200 seconds of any schedule that computes these tokens (:data:`ROOFLINE`):
    policy >= max(min_forwards x weight read, FLOPs of its tokens), reward model >= max(min_scorings
    x weight read, FLOPs of its scoring tokens), attention pairs left out."""
    m = ROOFLINE
    per_token = 2 * m["params"] / m["flops"]
    reward_tokens = sum(s["step_tokens"] + 2 * s["rows"] for s in scoring)  # as modelled_seconds counts them
    policy_flops, reward_flops = (rows_fed + prefill_tokens) * per_token, reward_tokens * per_token
    policy = max(min_forwards * weight_read_s(), policy_flops)
    reward = max(min_scorings * weight_read_s(), reward_flops)
    return {"policy_flops_s": policy_flops, "reward_flops_s": reward_flops, "policy_floor_s": policy,
            "reward_floor_s": reward, "floor_s": policy + reward}


# -- target 3 over more questions -----------------------------------------------------------


def tail(run: Run, ablation_per_q: float, fraction: float = TARGET_FRACTION) -> dict[str, Any]:
    """Steady state and tail of a run, and the fewest questions for which forwards per question
    would reach ``fraction`` x ``ablation_per_q`` if every extra question ran at the steady rate.

    ``steady_per_q`` = rows fed per question / rows fed per forward before the last admission.
    ``tail`` = forwards after the last admission; ``tail_excess`` = what they cost beyond what their
    rows would cost at the steady rate (charging the whole tail on top of a
    steady rate applied to every row, so it double-counts the tail's rows). ``n_lead`` (that cruder estimate) and ``n`` are
    the smallest N with steady + tail / N (resp. + tail_excess / N) <= the target; None when the
    steady rate alone misses it."""
    cut = run.last_admission or len(run.forwards)  # every prompt admitted at once: all steady (as throughput.py)
    steady, rest = run.forwards[:cut], run.forwards[cut:]
    steady_rate = sum(t["rows_fed"] for t in steady) / max(len(steady), 1)
    per_q = run.rows_fed / run.questions / steady_rate
    excess = len(rest) - sum(t["rows_fed"] for t in rest) / steady_rate
    target = fraction * ablation_per_q
    room = target - per_q

    def smallest(extra: float) -> int | None:
        return max(1, math.ceil(extra / room)) if room > 0 else None

    return {"steady_rows_per_forward": steady_rate, "steady_per_q": per_q, "tail": len(rest),
            "tail_excess": excess, "target_per_q": target, "n_lead": smallest(len(rest)), "n": smallest(excess)}


# -- the work of a set of questions, whatever the schedule ------------------------------------

PREFILL_CHUNK = 512  # engine.prefill_chunk's default (throughput.py keeps it): a prefill waits only when a forward's chunk is full


@dataclass
class Work:
    """What every schedule of one strategy on one set of questions must do (lower bounds where
    the chains are known only in part)."""

    strategy: str
    questions: int
    chains: list[list[int]] | None  # each prompt's rows fed per forward alone, when every one is known
    longest: int  # >= the longest chain
    chain_sum: int  # >= the sum of the chains
    most_steps: int  # >= the most steps (scoring batches) of one prompt
    rows_fed: int
    prefill_tokens: int  # the least prefill any recorded schedule needed (a shared system turn once)
    scoring: list[dict[str, int]]  # one run's scoring batches (their token counts do not depend on the schedule)
    source: str  # where the chains come from


def chain_sum_lower(run: Run, chunk: int = PREFILL_CHUNK) -> int:
    """A lower bound on the sum of the chains, from a token-level run (no step barrier): every
    prompt in flight advances at every forward except while its prefill waits for room in a
    forward's chunk, so sum(prompts in flight) minus those in flight at forwards with a full chunk."""
    total = sum(t["in_flight"] for t in run.forwards)
    return total - sum(t["in_flight"] for t in run.forwards if t["prefill_tokens"] >= chunk)


def work_of(runs: list[Run], strategy: str, questions: int) -> Work:
    """The :class:`Work` of ``strategy`` on the first ``questions`` questions, from its runs and a
    ``max_prompts=1`` run of the same strategy on them, or on their first few (the runs read the
    first N questions of one file: a shorter run's longest chain and most steps are lower bounds)."""
    same = [r for r in runs if r.strategy == strategy and r.questions == questions]
    alone = max((r for r in runs if r.strategy == strategy and r.engine == "token" and r.max_prompts == 1
                 and r.questions <= questions), key=lambda r: r.questions, default=None)
    chains = chains_of(alone) if alone else []
    steps = steps_of(alone) if alone else []
    exact = alone is not None and alone.questions == questions
    token = [chain_sum_lower(r) for r in same if r.engine != "lockstep" and r.max_prompts > 1]
    if exact:
        source = "exact (max_prompts=1 run)"
    elif alone:
        source = f"partial (first {alone.questions} questions alone; sum from prompts in flight)"
    else:
        source = "partial (sum from prompts in flight)"
    return Work(strategy, questions, chains if exact else None, max(map(len, chains), default=0),
                sum(map(len, chains)) if exact else max(token + [sum(map(len, chains))]), max(steps, default=0),
                same[0].rows_fed, min(r.prefill_tokens for r in same), same[0].scoring, source)


def forward_bound(work: Work, cap: int) -> int:
    """Fewest forwards with at most ``cap`` prompts in flight (:func:`cap_bound` when every chain
    is known; else from the longest chain and the chains' sum)."""
    if work.chains is not None:
        return cap_bound([len(c) for c in work.chains], cap)
    return max(work.longest, math.ceil(work.chain_sum / cap))


# -- per run, and per target ----------------------------------------------------------------


def analyse(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: its forwards, the bounds that apply to it, the chain model's replay, and
    its modelled H200 seconds against their floor."""
    works: dict[tuple[str, int], Work] = {}
    rows = []
    for r in runs:
        key = (r.strategy, r.questions)
        w = works[key] if key in works else works.setdefault(key, work_of(runs, *key))
        cap = forward_bound(w, r.max_prompts)
        budget = budget_bound(w.rows_fed, r.max_rows) if r.engine != "lockstep" else 0
        replays = w.chains is not None and r.engine != "lockstep"
        rows.append({
            "stem": r.stem, "strategy": r.strategy, "engine": r.engine, "max_prompts": r.max_prompts,
            "max_rows": r.max_rows, "questions": r.questions, "forwards": len(r.forwards),
            "forwards_per_q": len(r.forwards) / r.questions, "chains": w.source, "cap_bound": cap,
            "budget_bound": budget, "bound": max(cap, budget), "bound_per_q": max(cap, budget) / r.questions,
            "replay": replay(w.chains, r.max_prompts, r.max_rows) if replays else None,
            "replay_longest_first": replay(w.chains, r.max_prompts, r.max_rows, True) if replays else None,
            "modelled_s": modelled_seconds(r.forwards, r.scoring),
            **floor_seconds(w.rows_fed, w.prefill_tokens, w.scoring, cap, w.most_steps),
        })
    return rows


def _pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def targets(runs: list[Run], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three forward and H200 targets of issue 21, per (strategy, questions): measured ratio
    against the ablation, the best ratio any schedule could reach, and (target 3) for how many
    questions it could be reached."""
    out = []
    for strategy, n in dict.fromkeys((r["strategy"], r["questions"]) for r in rows):
        key = {"strategy": strategy, "questions": n}
        abl16, tok16 = _pick(rows, engine="lockstep", max_prompts=16, **key), _pick(rows, engine="token", max_prompts=16, **key)
        tok64 = _pick(rows, engine="token", max_prompts=64, **key)
        abl64 = _pick(rows, engine="lockstep", max_prompts=64, **key) or abl16
        if abl16 and tok16:
            out.append({"target": "cap16_forwards", **key, "want": "<= 0.5", "measured": tok16["forwards"] / abl16["forwards"],
                        "best": tok16["bound"] / abl16["forwards"],
                        "longest_first": (tok16["replay_longest_first"] or 0) / abl16["forwards"] or None,
                        "reachable": tok16["bound"] / abl16["forwards"] <= 0.5})
        if abl64 and tok64:
            best = abl64["modelled_s"] / tok64["floor_s"]
            out.append({"target": "h200_64", **key, "want": ">= 4", "against": f"lockstep at {abl64['max_prompts']}",
                        "measured": abl64["modelled_s"] / tok64["modelled_s"], "best": best, "reachable": best >= 4})
        if abl16 and tok64:
            abl_q = abl16["forwards_per_q"]
            run = next(r for r in runs if (r.strategy, r.questions, r.engine, r.max_prompts) == (strategy, n, "token", 64))
            w = work_of(runs, strategy, n)
            need = TARGET_FRACTION * abl_q
            out.append({"target": "budget_forwards", **key, "want": "<= 0.25", "measured": tok64["forwards_per_q"] / abl_q,
                        "best": tok64["bound_per_q"] / abl_q, "reachable": tok64["bound_per_q"] <= need,
                        "budget_per_q": w.rows_fed / n / run.max_rows,
                        # the longest known chain alone needs this many questions (None: no chain known)
                        "n_at_least": math.ceil(w.longest / need) if w.longest else None,
                        **tail(run, abl_q)})
    return out


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    """The per-run table and the per-target table, in markdown."""
    lines = [("| questions | strategy | engine | max prompts | max rows | forwards | cap bound | budget bound | "
              "chain replay (FIFO / longest first) | modelled H200 s | its floor s | chains |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        replayed = f"{r['replay']} / {r['replay_longest_first']}" if r["replay"] is not None else "-"
        lines.append(f"| {r['questions']} | {r['strategy']} | {r['engine']} | {r['max_prompts']} | {r['max_rows'] or '-'} | "
                     f"{r['forwards']} | {r['cap_bound']} | {r['budget_bound'] or '-'} | {replayed} | "
                     f"{_f(r['modelled_s'])} | {_f(r['floor_s'])} | {r['chains']} |")
    lines += ["", "| target | questions | strategy | want | measured | best any schedule | not excluded by the bounds | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for g in goals:
        if g["target"] == "cap16_forwards":
            note = f"longest first: {_f(g['longest_first'])}" if g["longest_first"] else ""
        elif g["target"] == "h200_64":
            note = f"vs {g['against']} (a model)"
        else:
            note = (f"budget alone: {_f(g['budget_per_q'])}/q vs {_f(g['target_per_q'])}/q needed; "
                    f"longest chain needs N >= {_f(g['n_at_least'])}; steady {_f(g['steady_per_q'])}/q, "
                    f"tail {g['tail']} fwd ({_f(g['tail_excess'], 0)} beyond steady): "
                    f"N >= {_f(g['n'])}")
        lines.append(f"| {g['target']} | {g['questions']} | {g['strategy']} | {g['want']} | {_f(g['measured'])} | "
                     f"{_f(g['best'])} | {'yes' if g['reachable'] else 'no'} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="where the traces are (default: benchmarks/results)")
    p.add_argument("--out", type=Path, default=None, help="the JSON written (default: <results>/bounds.json)")
    args = p.parse_args(argv)
    runs = read_runs(args.results)
    if not runs:
        print(f"error: no throughput*_trace.jsonl with its .json in {args.results}: run benchmarks/throughput.py first",
              file=sys.stderr)
        return 2
    rows = analyse(runs)
    goals = targets(runs, rows)
    out = args.out or args.results / "bounds.json"
    out.write_text(json.dumps({"roofline": ROOFLINE, "runs": rows, "targets": goals}, indent=1) + "\n")
    print(markdown(rows, goals))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
