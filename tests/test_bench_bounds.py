"""benchmarks/bounds.py: the lower-bound arithmetic on hand-made schedule traces (exact numbers)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bounds
from benchmarks.throughput import ROOFLINE

A = ROOFLINE["weights_bytes"] / ROOFLINE["bandwidth"]  # one weight read, seconds
PT = 2 * ROOFLINE["params"] / ROOFLINE["flops"]  # FLOPs seconds per token


def record(rows: int, prefill: int = 0, in_flight: int = 1, admitted: int = 1) -> dict[str, int]:
    return {"rows_fed": rows, "prefill_tokens": prefill, "head_tokens": 0, "kv_tokens_read": rows + prefill,
            "tokens": rows + prefill, "attended": rows + prefill, "rows_held": rows, "kv_tokens_held": 0,
            "in_flight": in_flight, "admitted": admitted}


def write_results(tmp_path, prompts: int = 17) -> None:
    """17 prompts; alone each takes 4 forwards (a prefill of 10 tokens, then 3 ticks of 2 rows) and one
    scoring of 2 candidates x 3 tokens. Three batched runs with made-up forward counts."""
    alone = [record(0 if k == 0 else 2, 10 if k == 0 else 0, 1, p + 1) for p in range(prompts) for k in range(4)]
    scoring = [{"forward": 4 * p + 4, "prompts": 1, "rows": 2, "step_tokens": 6, "context": 40} for p in range(prompts)]
    total_rows = 6 * prompts  # 102

    def batched(n: int, prefill: int) -> list[dict[str, int]]:
        out = [record(0, prefill, 16, prompts)] + [record(0, 0, 16, prompts) for _ in range(n - 1)]
        for i in range(total_rows):  # spread the rows over forwards 1..n-1
            out[1 + i % (n - 1)]["rows_fed"] += 1
        return out

    runs = [("token", 1, alone), ("token", 16, batched(10, 30)), ("token", 64, batched(8, 40)),
            ("lockstep", 16, batched(20, 170))]
    lines = [json.dumps({"strategy": "truth_default", "engine": e, "max_prompts": c, "forwards": f, "scoring": scoring})
             for e, c, f in runs]
    (tmp_path / "throughput_trace.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"strategy": "truth_default", "engine": e, "max_prompts": c, "max_rows": 0 if e == "lockstep" else 256,
             "questions": prompts} for e, c, _ in runs]
    (tmp_path / "throughput.json").write_text(json.dumps({"rows": rows}))


def test_cap_bound_counts_two_chains_sharing_a_slot() -> None:
    assert bounds.cap_bound([4, 4, 4], 2) == 8  # max(4, ceil(12/2)=6, 4+4)
    assert bounds.cap_bound([5, 1, 1, 1], 2) == 5  # the longest chain
    assert bounds.cap_bound([3, 3, 3, 3], 1) == 12  # one at a time: their sum
    assert bounds.cap_bound([2, 2, 2], 4) == 2
    assert bounds.budget_bound(10, 4) == 3 and bounds.budget_bound(8, 4) == 2


def test_replay_admits_in_order_within_cap_and_budget() -> None:
    chains = [[0, 2, 2, 2]] * 3
    assert bounds.replay(chains, cap=2, budget=0) == 8  # two together (4), then the third alone (4)
    assert bounds.replay(chains, cap=3, budget=4) == 8  # the budget holds two of 2 rows
    assert bounds.replay(chains, cap=3, budget=6) == 4
    uneven = [[0, 1], [0, 1, 1, 1, 1, 1], [0, 1], [0, 1, 1, 1, 1, 1]]
    assert bounds.replay(uneven, cap=2, budget=0) == 10  # 2 and 6 together; the next 2 at 3-4; the last 6 at 5-10
    assert bounds.replay(uneven, cap=2, budget=0, longest_first=True) == 8  # both 6s at 1-6, both 2s at 7-8
    assert bounds.cap_bound([2, 6, 2, 6], 2) == 8  # and no schedule does better


def test_floor_is_the_larger_of_weight_reads_and_flops_per_model() -> None:
    scoring = [{"step_tokens": 30, "rows": 5}]
    f = bounds.floor_seconds(rows_fed=100, prefill_tokens=20, scoring=scoring, min_forwards=3, min_scorings=2)
    assert f["policy_floor_s"] == pytest.approx(3 * A) and f["policy_flops_s"] == pytest.approx(120 * PT)
    assert f["reward_floor_s"] == pytest.approx(2 * A) and f["reward_flops_s"] == pytest.approx(40 * PT)
    big = bounds.floor_seconds(rows_fed=10**6, prefill_tokens=0, scoring=[{"step_tokens": 10**6, "rows": 0}],
                               min_forwards=3, min_scorings=2)
    assert big["floor_s"] == pytest.approx(2 * 10**6 * PT)  # FLOPs bind on both sides


def test_tail_splits_steady_state_from_the_drain() -> None:
    # 2 questions: 4 forwards before the last admission (24 rows: 6 per forward), then 3 with 12 rows
    forwards = [record(0, 10, 1, 1), record(8), record(8), record(8), record(8, 0, 2, 2), record(2, 0, 1, 2),
                record(2, 0, 1, 2)]
    run = bounds.Run("t", "truth_default", "token", 64, 256, 2, forwards, [])
    t = bounds.tail(run, ablation_per_q=16.0)
    assert t["steady_rows_per_forward"] == 6.0 and t["steady_per_q"] == 3.0  # 18 rows per question / 6
    assert t["tail"] == 3 and t["tail_excess"] == 1.0  # 3 forwards carry 12 rows: 2 forwards' worth at 6
    assert t["target_per_q"] == 4.0 and t["n_lead"] == 3 and t["n"] == 1  # 3 + 3/N <= 4; 3 + 1/N <= 4
    assert bounds.tail(run, ablation_per_q=12.0)["n"] is None  # 1/4 of 12 = 3: the steady rate alone misses


def test_bounds_of_committed_style_traces(tmp_path, capsys) -> None:
    write_results(tmp_path)
    assert bounds.main(["--results", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "bounds.json").read_text())
    runs = {(r["engine"], r["max_prompts"]): r for r in out["runs"]}
    assert runs[("token", 1)]["cap_bound"] == 68  # 17 chains of 4, one at a time
    t16 = runs[("token", 16)]
    assert (t16["cap_bound"], t16["budget_bound"], t16["replay"], t16["replay_longest_first"]) == (8, 1, 8, 8)
    t64 = runs[("token", 64)]
    assert t64["cap_bound"] == 4  # the longest chain
    # the floor: 4 weight reads of the policy (102 rows + the least prefill, 30, cost less), and the
    # reward model's FLOPs for 17 x (6 + 2 x 2) tokens against one weight read
    assert t64["floor_s"] == pytest.approx(max(4 * A, 132 * PT) + max(A, 170 * PT))
    goals = {g["target"]: g for g in out["targets"]}
    cap = goals["cap16_forwards"]
    assert (cap["measured"], cap["best"], cap["reachable"]) == (0.5, 0.4, True)  # 10 / 20, 8 / 20
    budget = goals["budget_forwards"]
    assert budget["best"] == pytest.approx((4 / 17) / (20 / 17)) and budget["n_at_least"] == math.ceil(4 / (0.25 * 20 / 17))
    assert goals["h200_64"]["against"] == "lockstep at 16"  # no lockstep run at 64
    assert "| cap16_forwards | 17 | truth_default | <= 0.5 | 0.50 | 0.40 | yes |" in capsys.readouterr().out


def test_no_traces_is_one_clear_line(tmp_path, capsys) -> None:
    assert bounds.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run benchmarks/throughput.py first" in err
