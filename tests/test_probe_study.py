"""scripts/probe_study.py's pieces that shape a shipped probe: an ensemble folded into one probe
file scores the members' mean logit, the held-out questions of a train choice, train rows read
from several files (human answers and the policy's own), and the offline best-of-k rule."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
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


def _judge_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_files_are_read_as_one_split_each_row_on_its_own_features(tmp_path, monkeypatch):
    """Two judge-format files (the human answers and the policy's pool): every row's key points
    at the features extracted for *its* answer, the second file's numbered after the first's."""
    monkeypatch.setattr(ps, "find_embedded_gguf", lambda: Path("/m/model.gguf"))
    monkeypatch.setattr(ps, "gguf_cache_dir", lambda g: Path("/cache"))
    monkeypatch.setattr(ps, "primer", lambda: "primer")
    human = _judge_file(tmp_path / "human.jsonl", [
        {"question": "q1", "answer": "a", "truthful": True}, {"question": "q1", "answer": "b", "truthful": False},
        {"question": "q2", "answer": "a", "truthful": True}, {"question": "q1", "answer": "a", "truthful": True}])
    pool = _judge_file(tmp_path / "pool.jsonl", [
        {"question": "q2", "answer": "z", "truthful": False, "candidate": 0},
        {"question": "q3", "answer": "a", "truthful": True, "candidate": 0}])
    for file in (human, pool):  # features: state 0 holds a code of (file, answer text)
        index, _, _, _ = ps.index_rows(ps.read_judge(file))
        path = ps.feature_file(tmp_path, "train", index.items, "cachemodel.gguf", "primer")
        F = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(index.items), 4, 2, 3))
        for i, (q, a) in enumerate(index.items):
            F[i] = (100 if file is pool else 0) + ord(a) - ord("a") + 10 * int(q[1:])
        F.flush()
        path.with_suffix(".json").write_text("{}")
    args = ps.parse_args(["select", "--data-dir", str(tmp_path), "--features-dir", str(tmp_path),
                          "--train-answers", "0", "--train-files", str(human), str(pool)])
    F, keys, labels, qs, info = ps.load_split(args, "train")
    rows = info["row_data"]
    assert F.shape == (5, 4, 2, 3) and info["answers"] == 5 and info["rows"] == 6 and info["questions"] == 3
    assert info["files"] == [str(human), str(pool)]
    assert [r["question"] for r in rows] == qs == ["q1", "q1", "q2", "q1", "q2", "q3"]
    want = [(100 if "candidate" in r else 0) + ord(r["answer"]) - ord("a") + 10 * int(r["question"][1:])
            for r in rows]
    assert F[:, :, 0][keys, 3, 0].tolist() == want
    assert labels.tolist() == [1, 0, 1, 1, 0, 1]
    args.train_files = [human, tmp_path / "missing.jsonl"]
    _judge_file(args.train_files[1], [{"question": "q9", "answer": "x", "truthful": True}])
    with pytest.raises(SystemExit, match="run the extract stage first"):
        ps.load_split(args, "train")


def test_best_of_k_offline_picks_the_top_score_among_the_first_k():
    def row(c, truthful, score, tokens=10, nc=False):
        return {"candidate": c, "truthful": truthful, "s": score, "tokens": tokens, "no_comment": nc}
    groups = [[row(0, False, 1.0), row(1, True, 3.0, 20), row(2, False, 5.0), row(3, True, 5.0, 40, True)],
              [row(0, True, 2.0), row(1, False, 2.0), row(2, True, 0.0), row(3, False, 9.0)]]
    by = lambda r: r["s"]  # noqa: E731
    assert ps.select_rate(groups, by, 1) == {"pct_truthful": 50.0, "pct_no_comment": 0.0, "mean_tokens": 10.0,
                                             "groups": 2}
    assert ps.select_rate(groups, by, 2)["pct_truthful"] == 100.0  # c1 (3.0) in group 1; tie -> c0 in group 2
    four = ps.select_rate(groups, by, 4)  # c2 (5.0, first of the tie) and c3 (9.0): both untruthful
    assert four["pct_truthful"] == 0.0 and four["mean_tokens"] == 10.0
    rand = ps.select_rate(groups, None, 4)  # the expectation of a random pick
    assert rand["pct_truthful"] == 50.0 and rand["pct_no_comment"] == 12.5 and rand["mean_tokens"] == 15.0


def test_z_summed_rule_weighs_each_score_by_its_spread_over_the_k_candidates():
    rows = [{"candidate": c, "truthful": c == 1, "tokens": 1, "no_comment": False, "a": a, "b": b}
            for c, (a, b) in enumerate([(10.0, 0.0), (8.0, 1.0), (0.0, 0.5), (2.0, 0.5)])]
    # raw sums pick candidate 0 (10.0); z-scored, b's spread is as large as a's: candidate 1 wins
    assert ps.select_rate([rows], lambda r: r["a"] + r["b"], 4)["pct_truthful"] == 0.0
    assert ps.select_rate([rows], ("a", "b"), 4)["pct_truthful"] == 100.0
    assert ps.select_rate([rows], ("a", "b"), 1)["pct_truthful"] == 0.0  # one candidate: no spread, no error


def test_policy_pool_shards_are_checked_when_parsed(capsys):
    import policy_pool

    for bad in ("2/2", "x", "1/0", "-1/3"):
        with pytest.raises(SystemExit) as exit_:
            policy_pool.main(["--data-dir", ".", "--out", "pool.jsonl", f"--shard={bad}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--shard" in err and bad in err and "Traceback" not in err
