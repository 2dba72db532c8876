"""MAH-DPO multi-head policies: a checkpoint in MAHALO's layout loads, and the decoded logits are
the weighted sum of the heads' logits, each from a plain full forward."""

import pytest
import torch

from mahalo import guided_generate
from mahalo.app.config import ModelConfig
from mahalo.app.registry import POLICY_LOADERS
from mahalo.app.tiny import tiny_policy
from mahalo.chat import as_messages, generation_prompt_ids
from mahalo.policy.multihead import mixing_weights

TOL = 1e-5
PROMPT = "Is the earth flat?"


@pytest.fixture(scope="module")
def mahdpo(tmp_path_factory):
    """A base model directory and a 3-head ``policy.pt`` as MAHALO's MultiHeadCausalLM saves it:
    ``base_model.*`` (its backbone, lm_head deleted) and ``heads.{i}.weight`` / ``.bias``, under
    ``"state"``; the backbone differs from the base (it was fine-tuned)."""
    root = tmp_path_factory.mktemp("mahdpo")
    base, tok = tiny_policy(seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tuned, _ = tiny_policy(seed=1)  # the fine-tuned backbone
    gen = torch.Generator().manual_seed(2)
    vocab, hidden = tuned.lm_head.weight.shape
    heads = [torch.randn(vocab, hidden, generator=gen) * 0.1 for _ in range(3)]
    biases = [torch.randn(vocab, generator=gen) * 0.1 for _ in range(3)]
    state = {f"base_model.{k}": v for k, v in tuned.state_dict().items() if not k.startswith("lm_head.")}
    for i, (w, b) in enumerate(zip(heads, biases)):
        state[f"heads.{i}.weight"], state[f"heads.{i}.bias"] = w, b
    torch.save({"step_idx": 100, "state": state}, root / "policy.pt")
    return root, tuned, tok, heads, biases


def _per_head_logits(tuned, ids, heads, biases):
    """Each head's logits from a full forward of the fine-tuned backbone: (K, T, V)."""
    with torch.inference_mode():
        hidden = tuned.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.stack([hidden.double() @ w.double().T + b.double() for w, b in zip(heads, biases)])


def test_mixed_logits_equal_the_weighted_sum_of_per_head_forwards(mahdpo):
    root, tuned, tok, heads, biases = mahdpo
    cfg = ModelConfig(kind="multihead", base=str(root / "base"), path=str(root / "policy.pt"), num_heads=3,
                      head_weights=[2.0, 1.0, 1.0])
    model, _ = POLICY_LOADERS["multihead"](cfg)
    ids = generation_prompt_ids(tok, as_messages(PROMPT)) + tok("The earth is round.", add_special_tokens=False)[
        "input_ids"]
    expected = torch.einsum("k,ktv->tv", torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64),
                            _per_head_logits(tuned, ids, heads, biases))
    with torch.inference_mode():
        got = model(input_ids=torch.tensor([ids])).logits[0].double()
    assert (got - expected).abs().max() <= TOL


def test_decoding_reads_the_mixture_token_by_token(mahdpo):
    """Through the engine (prefill, cached one-token forwards): every sampled token's log-probability
    is the mixture's at that point of a full forward."""
    root, tuned, tok, heads, biases = mahdpo
    cfg = ModelConfig(kind="multihead", base=str(root / "base"), path=str(root / "policy.pt"), num_heads=3,
                      head_index=1)
    res = guided_generate(POLICY_LOADERS["multihead"](cfg), {}, PROMPT, strategy="sample", max_new_tokens=12, seed=4)
    prompt = generation_prompt_ids(tok, as_messages(PROMPT))
    ids = prompt + res.token_ids
    logits = _per_head_logits(tuned, ids, heads, biases)[1]  # head_index=1 alone
    logp = torch.log_softmax(logits, -1)
    got = [lp for st in res.steps for c in st.candidates[:1] for lp in c.logprobs]
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(res.token_ids)]
    assert len(got) == len(want) > 0
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def test_wrong_number_of_heads_is_named(mahdpo):
    root = mahdpo[0]
    cfg = ModelConfig(kind="multihead", base=str(root / "base"), path=str(root / "policy.pt"), num_heads=2)
    with pytest.raises(ValueError, match="has 3 heads but num_heads=2: set num_heads=3"):
        POLICY_LOADERS["multihead"](cfg)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_weights=[1.0, 2.0]), "head_weights has 2 values for 3 heads"),
    (dict(head_weights=[1.0, -1.0, 1.0]), "must be >= 0"),
    (dict(head_index=3), "head_index 3 is out of range for 3 heads"),
    (dict(head_weights=[1, 1, 1], head_index=0), "not both"),
])
def test_bad_head_weights_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixing_weights(3, **kwargs)
    with pytest.raises(ValueError, match=message):
        ModelConfig(kind="multihead", base="b", path="p.pt", num_heads=3, **kwargs)


def test_weights_are_normalised():
    assert mixing_weights(3, [2, 1, 1]) == [0.5, 0.25, 0.25]
    assert mixing_weights(2) == [0.5, 0.5]
    assert mixing_weights(3, head_index=2) == [0.0, 0.0, 1.0]
