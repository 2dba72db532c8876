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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny checkpoints saved as a user has them on disk: a token-classification PRM, a causal LM,
    a bare backbone with a value head file."""
    import torch

    from mahalo.app.tiny import tiny_backbone, tiny_policy, tiny_token_classifier, tiny_value_head

    root = tmp_path_factory.mktemp("ckpt")
    for name, (model, tok) in {"prm": tiny_token_classifier(), "lm": tiny_policy(seed=7),
                               "backbone": tiny_backbone(tag="<extra_0>")}.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.save(tiny_value_head(), root / "backbone" / "value_head.pt")
    return root


@pytest.mark.parametrize("family, entry, extra", [
    ("step_classifier", "prm", {}),
    ("step_lm", "lm", {"step_tag": " ки"}),
    ("value_head", "backbone", {"head_file": "value_head.pt", "read_at": "steps"}),
    ("judge", "lm", {"yes_token": "No", "no_token": "+"}),
])
def test_every_family_loads_from_a_local_checkpoint_and_guides(saved, family, entry, extra):
    from mahalo import guided_generate
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_models
    from mahalo.rewards import BackboneReward

    cfg = ModelsConfig(policy=ModelConfig(kind="tiny"),
                       rewards={"r": ModelConfig(kind="hf", family=family, path=str(saved / entry), **extra)})
    models = load_models(cfg, ["r"])
    assert isinstance(models.rewards["r"], BackboneReward)
    res = guided_generate(models.policy, models.rewards, "Is the earth flat?", max_new_tokens=16, step="max_tokens",
                          max_step_tokens=5, min_step_tokens=0)
    assert len(res.steps) >= 2 and all("r" in c.scores for st in res.steps for c in st.candidates)


def test_a_checkpoint_without_a_trained_token_head_is_refused(saved):
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_models

    cfg = ModelsConfig(policy=ModelConfig(kind="tiny"),
                       rewards={"r": ModelConfig(kind="hf", family="step_classifier", path=str(saved / "lm"))})
    with pytest.raises(ValueError, match="has no trained classification head"):
        load_models(cfg, ["r"])


@pytest.mark.parametrize("args, message", [
    (["models=tiny", "+objective=truth", "models.rewards.truth.aggregate=min"],
     "models.rewards.truth.aggregate='min' is not used by family 'classifier'"),
    (["models=tiny", "+objective=truth", "models.rewards.truth.family=nope"], "unknown reward family 'nope'"),
    (["models=tiny", "+objective=truth", "models.rewards.truth.num_labels=3"], "num_labels=3 needs outputs"),
    (["models=tiny", "+objective=truth", "models.policy.num_heads=2"], "(it is read by kind 'multihead')"),
    (["models=tiny", "+objective=truth", "models.rewards.truth.num_heads=2"], "applies to multihead policies only"),
    (["models=mahdpo_hv", "+objective=truth", "models.policy.head_weights=[1,2]"],
     "head_weights has 2 values for 3 heads"),
])
def test_bad_family_options_exit_2_with_one_line(capsys, args, message):
    assert decode.main([*args, "prompt=hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


@pytest.mark.parametrize("objective", ["math", "math_value"])
def test_tiny_preset_runs_the_step_families_from_the_cli(objective, tmp_path):
    import json

    out = tmp_path / "o.jsonl"
    assert decode.main(["models=tiny", f"+objective={objective}", "prompt=hi", "search.max_new_tokens=12",
                        "step.kind=max_tokens", "step.max_step_tokens=4", "step.min_step_tokens=0",
                        f"output={out}"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["scores"]


def test_a_multi_output_entry_gives_its_named_objectives_from_one_model():
    from mahalo import guided_generate
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_models
    from mahalo.rewards import RewardOutput

    cfg = ModelsConfig(policy=ModelConfig(kind="tiny"),
                       rewards={"unified": ModelConfig(kind="tiny", num_labels=3, outputs={0: "truth", 2: "helpful"})})
    assert cfg.objectives() == ["truth", "helpful"] and cfg.provider("helpful") == ("unified", 2)
    models = load_models(cfg, ["truth", "helpful"])
    truth, helpful = models.rewards["truth"], models.rewards["helpful"]
    assert isinstance(truth, RewardOutput) and truth.source is helpful.source
    assert (truth.column, helpful.column) == (0, 2)
    res = guided_generate(models.policy, models.rewards, "hi", weights={"truth": 1.0, "helpful": 1.0},
                          max_new_tokens=12, step="max_tokens", max_step_tokens=4, min_step_tokens=0)
    assert set(res.scores) == {"truth", "helpful"} and res.scores["truth"] != res.scores["helpful"]
    with pytest.raises(ValueError, match="given by models.rewards.unified and models.rewards.truth"):
        ModelsConfig(rewards={"unified": ModelConfig(kind="tiny", num_labels=2, outputs={0: "truth"}),
                              "truth": ModelConfig(kind="tiny")})
