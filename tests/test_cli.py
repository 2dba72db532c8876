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

from mahalo import decode
from mahalo.app.config import RunConfig

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
    assert isinstance(cfg, RunConfig) and cfg.search.strategy == search
    names = list(cfg.objective.weights)
    if all(n in cfg.models.rewards or n == "concise" for n in names):
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
    real = decode.guided_generate
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(decode, "guided_generate", flaky)
    assert decode.main(_run_args(prompts, out)) == 130
    assert [r["index"] for r in _lines(out)] == [0, 1]
    before = out.read_text()
    # a torn last line from a hard kill is dropped, complete records are kept byte for byte
    with out.open("a") as f:
        f.write('{"index": 2, "prompt": "Quest')
    monkeypatch.setattr(decode, "guided_generate", real)
    assert decode.main(_run_args(prompts, out)) == 0
    assert "resuming: 2 of 5" in capsys.readouterr().out
    recs = _lines(out)
    assert out.read_text().startswith(before)
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in recs] == texts
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
    cmd = [sys.executable, "-m", "mahalo.decode", *_run_args(prompts, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_lines(out))
    assert 3 <= partial < 40
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["index"] for r in _lines(out)] == list(range(40))


def test_single_prompt_prints_answer(capsys):
    assert decode.main(["models=tiny", "+objective=truth", "prompt=Hello", "search.max_new_tokens=8",
                        "verbose=true"]) == 0
    out = capsys.readouterr().out
    assert "8 tokens" in out and "truth=" in out and "steps (kept candidate)" in out


def test_help():
    assert decode.main(["--help"]) == 0
