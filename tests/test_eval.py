"""lm-evaluation-harness against the server, as a harness user runs it: the real ``lm_eval`` CLI
(``local-chat-completions``, chat template, a local generation task that keeps its ``until``
list, temperature 0 as lm-eval sends it) against a served tiny model, offline."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mahalo.serve import build_engine, build_server, compose_serve_config  # noqa: E402
from tests.test_serve import Running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_url():
    cfg = compose_serve_config(["models=tiny", "server.objectives=[truth]", "step.kind=max_tokens",
                                "step.min_step_tokens=0", "step.max_step_tokens=4"])
    engine, objectives = build_engine(cfg)
    running = Running(build_server(cfg, engine, objectives))
    yield running.url + "/v1"
    running.stop()


def test_lm_eval_runs_a_generation_task_against_a_guided_preset(base_url, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions",
           "--model_args",
           f"base_url={base_url}/chat/completions,model=mahalo-best-of-n,num_concurrent=1,max_retries=1",
           "--apply_chat_template", "--tasks", "truthful_mini", "--include_path", "eval/tasks",
           "--output_path", str(out), "--limit", "3", "--log_samples", "--gen_kwargs", '{"max_gen_toks": 8}']
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = glob.glob(str(out / "mahalo-best-of-n" / "results_*.json"))
    report = json.loads(Path(results).read_text())
    metrics = report["results"]["truthful_mini"]
    assert 0.0 <= metrics["contains,none"] <= 1.0 and 0.0 <= metrics["exact_match,none"] <= 1.0
    assert report["configs"]["truthful_mini"]["generation_kwargs"]["until"] == ["\n\n", "Q:"]
    (samples,) = glob.glob(str(out / "mahalo-best-of-n" / "samples_truthful_mini_*.jsonl"))
    responses = [json.loads(line)["resps"][0][0] for line in Path(samples).read_text().splitlines()]
    assert len(responses) == 3 and all("\n\n" not in r and "Q:" not in r for r in responses)
    table = subprocess.run([sys.executable, "eval/compare.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    head, rule, row = table.stdout.splitlines()
    assert head == "| model | truthful_mini contains | truthful_mini exact_match |"
    assert row.startswith("| mahalo-best-of-n | ") and row.count("±") == 2
