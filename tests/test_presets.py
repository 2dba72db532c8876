"""Every models preset composes and validates; with its checkpoints absent (offline, no hub cache)
the CLI exits 2 with one line that says how to download them, before decoding anything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mahalo import decode

ROOT = Path(__file__).resolve().parents[1]
# preset -> (objective, what the one line must name)
PRESETS = {
    "qwen_math_prm": ("math", "hf download Qwen/Qwen2.5-Math-7B-Instruct"),
    "math_shepherd": ("math", "hf download peiyi9979/mistral-7b-sft"),
    "math_value": ("math_value", "hf download Qwen/Qwen2.5-7B-Instruct"),
    "llama3_judge": ("truth", "hf download meta-llama/Llama-3.1-8B-Instruct"),
    "dpa_multi": ("human_values", "hf download mistralai/Mistral-7B-Instruct-v0.2"),
    "mahdpo_hv": ("human_values", "hf download REPO policy.pt --local-dir checkpoints/mahdpo_hv"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_and_validates(preset):
    objective = PRESETS[preset][0]
    cfg = decode.compose_config([f"models={preset}", f"+objective={objective}", "prompt=hi"])
    assert cfg.models.name == preset
    for name in cfg.objective.weights:
        assert cfg.models.provider(name) is not None, name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_absent_checkpoint_is_one_line_with_the_download_command(preset, tmp_path):
    objective, expected = PRESETS[preset]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "mahalo.decode", f"models={preset}", f"+objective={objective}", "prompt=hi",
         f"output={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_the_embedded_preset_reads_its_truth_head_from_the_policy_backbone():
    """The embedded pair is SmolLM2 and SmolLM2 plus a head: the shared head is exact, so used."""
    from mahalo.app.config import ModelConfig
    from mahalo.app.registry import shares_policy_backbone

    cfg = decode.compose_config(["models=embedded", "+objective=truth", "prompt=hi"])
    assert shares_policy_backbone(cfg.models.policy, cfg.models.rewards["truth"])
    other_dtype = ModelConfig(kind="embedded", dtype="bfloat16")
    assert not shares_policy_backbone(cfg.models.policy, other_dtype)
    assert not shares_policy_backbone(ModelConfig(kind="tiny"), ModelConfig(kind="tiny"))
