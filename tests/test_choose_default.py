"""The default-choice rule (benchmarks/choose_default.py) on hand-made summaries."""

from __future__ import annotations

import json

import pytest

from benchmarks.choose_default import choose, main


def _s(name, pct, tokens, truth=-5.0):
    return {"strategy": name, "pct_truthful": pct, "mean_policy_tokens": tokens, "mean_truth": truth}


def test_the_best_within_budget_wins_and_the_over_budget_one_cannot():
    summary = [_s("ref", 50.0, 1000), _s("cheap", 52.0, 500), _s("dear", 60.0, 1101), _s("edge", 55.0, 1100)]
    chosen, rows = choose(summary, ["ref", "cheap", "dear", "edge"], "ref")
    assert chosen == "edge"  # 1100 = 1.10x is within budget, 1101 is not
    assert [r["within_budget"] for r in rows] == [True, True, False, True]
    assert rows[1]["token_ratio"] == pytest.approx(0.5)


def test_an_exact_tie_goes_to_fewer_tokens():
    summary = [_s("ref", 50.0, 1000), _s("a", 56.0, 900), _s("b", 56.0, 600)]
    assert choose(summary, ["ref", "a", "b"], "ref")[0] == "b"


def test_a_missing_candidate_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"summary": [_s("ref", 50.0, 1000)]}))
    assert main([str(path), "--candidates", "ref,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err and "decode them first" in err
