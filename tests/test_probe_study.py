"""scripts/probe_study.py's pieces that shape a shipped probe: an ensemble folded into one probe
file scores the members' mean logit, and the held-out questions of a train choice."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import probe_study as ps  # noqa: E402

from mahalo.rewards.probe import TokenProbeReward  # noqa: E402


def test_a_folded_ensemble_scores_the_mean_logit_of_its_members():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g) * 3 + 1  # unstandardised, as layer states are
    y = (X[:, 0] + X[:, 3] > 2).float()
    members = [ps.fit_mlp(X, y, 4, 0.1, 2, seed) for seed in range(3)]
    t = ps.fold_mlp(members)
    probe = TokenProbeReward(t["probe.weight"], float(t["probe.bias"]), (2, 1),
                             (t["probe.hidden.weight"], t["probe.hidden.bias"]))
    assert t["probe.hidden.weight"].shape == (12, 12)  # 3 members x 4 units, 12 features
    with torch.no_grad():  # each member as fitted: standardise, then its own network
        want = torch.stack([net((X - mu) / sd).squeeze(-1) for mu, sd, net in members]).mean(0)
    assert torch.allclose(probe.probe(X), want, atol=1e-5)
    single = ps.fold_mlp(members[:1])
    assert not torch.allclose(TokenProbeReward(single["probe.weight"], float(single["probe.bias"]), 1, (
        single["probe.hidden.weight"], single["probe.hidden.bias"])).probe(X), want, atol=1e-3)


def test_held_out_questions_are_the_csv_rows_named(tmp_path):
    file = tmp_path / "q.csv"
    with file.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["Type", "Question"])
        w.writeheader()
        w.writerows({"Type": "x", "Question": f"q{i}?"} for i in range(5))
    assert ps.held_out(f"{file}:1:3") == {"q1?", "q2?"}
    assert ps.held_out(None) == set()


@pytest.mark.parametrize("spec, match", [
    ("q.csv:100", "give CSV:START:END"), ("q.csv:5:2", "give CSV:START:END"), ("q.csv:a:3", "give CSV:START:END"),
    ("/nonexistent/q.csv:0:3", "questions file not found"),
])
def test_a_bad_held_out_spec_is_one_clear_line_before_any_work(spec, match, capsys):
    with pytest.raises(SystemExit):
        ps.parse_args(["mlp", "--data-dir", ".", "--exclude-questions", spec])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in err and "Traceback" not in err
