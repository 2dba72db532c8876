"""Tests of the reference-decoder baseline on tiny random Llama models built in code."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import benchmarks.reference_decoder as rd  # noqa: E402
from mahalo.chat import conversation_ids, generation_prompt_ids  # noqa: E402

PROMPT = "Is the answer correct?"
MESSAGES = [{"role": "user", "content": PROMPT}]
CORPUS = [
    "The cat sat on the mat. It was a sunny day!",
    "Is the answer correct? Yes, it is correct.",
    "First, add two and three. Then multiply the result by four.",
    "A good answer is short, clear and honest.",
    "We check each step carefully.\n\nThen we write the final answer.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


def _config(tok, **kw):
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw,
    )


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(_config(tok)).eval()


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(1)
    return LlamaForSequenceClassification(
        _config(tok, num_labels=1, pad_token_id=tok.pad_token_id)
    ).eval()


def _decode(policy, tok, rm, **kw):
    args = {"num_candidates": 3, "max_new_tokens": 40, "seed": 0}
    args.update(kw)
    return rd.reference_decode(policy, tok, rm, tok, PROMPT, **args)


@contextlib.contextmanager
def _logit_bias(model, bias: dict[int, float]):
    """Add constant biases to the policy's output logits while the context is open."""
    vec = torch.zeros(model.config.vocab_size)
    for token, value in bias.items():
        vec[token] = value
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + vec)
    try:
        yield
    finally:
        handle.remove()


def _short_steps(policy, tok):
    """Favour "." so that sentence boundaries, hence several steps, come early."""
    return _logit_bias(policy, {tok.convert_tokens_to_ids("."): 3.0})


@contextlib.contextmanager
def _count_tokens(model):
    """Count the tokens entering ``model``'s input embedding (every forward, any entry point)."""
    counter = {"n": 0}

    def hook(mod, inp, out):
        counter["n"] += inp[0].numel()

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def _accepted_before(steps):
    """The accepted response text before each step (chosen chunks concatenated)."""
    text, out = "", []
    for step in steps:
        out.append(text)
        if step["chosen"] is not None:
            text += step["candidates"][step["chosen"]]
    return out


def _expected_counts(res, tok) -> tuple[int, int]:
    """Policy and reward-model tokens the algorithm forwards, from the recorded steps.

    Policy: the prompt once, then every sampled token except a final end-of-turn (sampled but
    never forwarded). Reward model: the whole conversation for every candidate of every
    scored step.
    """
    policy_n = len(generation_prompt_ids(tok, MESSAGES))
    rm_n = 0
    for step, before in zip(res.steps, _accepted_before(res.steps)):
        for text, n, finish in zip(step["candidates"], step["n_tokens"], step["finish"]):
            policy_n += n - (finish == "eos")
            if step["scores"] is not None:
                rm_n += len(conversation_ids(tok, MESSAGES, before + text))
    return policy_n, rm_n


def _full_reward(rm, tok, response: str) -> float:
    ids = conversation_ids(tok, MESSAGES, response)
    with torch.inference_mode():
        return float(rm(input_ids=torch.tensor([ids])).logits[0, 0])


def test_same_seed_same_result_other_seeds_differ(policy, tok, rm):
    a, b = _decode(policy, tok, rm), _decode(policy, tok, rm)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.steps == b.steps
    assert (a.policy_tokens, a.rm_tokens) == (b.policy_tokens, b.rm_tokens)
    others = [_decode(policy, tok, rm, seed=s).token_ids for s in (1, 2)]
    assert any(o != a.token_ids for o in others)


def test_token_counts_match_forwards_and_arithmetic(policy, tok, rm):
    with _short_steps(policy, tok), _count_tokens(policy) as pol_n, _count_tokens(rm) as rm_n:
        res = _decode(policy, tok, rm, max_new_tokens=48)
    assert res.policy_tokens == pol_n["n"]
    assert res.rm_tokens == rm_n["n"]
    assert len(res.steps) >= 2, "the setup should take several steps"

    assert all(s["attempts"] == len(s["candidates"]) == 3 for s in res.steps)
    assert (res.policy_tokens, res.rm_tokens) == _expected_counts(res, tok)
    assert len(res.token_ids) == sum(s["n_tokens"][s["chosen"]] for s in res.steps)
    assert len(res.token_ids) <= 48


def test_scores_are_fresh_full_forwards_and_argmax_is_chosen(policy, tok, rm):
    with _short_steps(policy, tok):
        res = _decode(policy, tok, rm, max_new_tokens=48)
    assert len(res.steps) >= 2
    for step, before in zip(res.steps, _accepted_before(res.steps)):
        fresh = [_full_reward(rm, tok, before + text) for text in step["candidates"]]
        assert step["scores"] == pytest.approx(fresh, abs=1e-4)
        best = max(step["scores"])
        assert step["chosen"] == step["scores"].index(best)
    assert res.text == "".join(s["candidates"][s["chosen"]] for s in res.steps)


def test_decoding_continues_from_the_winners_cache(policy, tok, rm, monkeypatch):
    """Every accepted token was sampled from the logits of its true (uncached) context."""
    calls: list[tuple[torch.Tensor, int]] = []
    real = rd.sample_token

    def recording(logits, *args, **kwargs):
        token = real(logits, *args, **kwargs)
        calls.append((logits.detach().clone(), token))
        return token

    monkeypatch.setattr(rd, "sample_token", recording)
    res = _decode(policy, tok, rm, max_new_tokens=30, max_step_tokens=5, min_step_tokens=100)
    assert len(res.steps) == 6  # 5-token steps by the per-step cap
    prompt_ids = generation_prompt_ids(tok, MESSAGES)
    with torch.inference_mode():
        for i, token in enumerate(res.token_ids):
            ctx = torch.tensor([prompt_ids + res.token_ids[:i]])
            true_logits = policy(input_ids=ctx).logits[:, -1, :]
            assert any(
                t == token and torch.allclose(lg, true_logits, atol=1e-4) for lg, t in calls
            ), f"token {i} was not sampled from its own context"


def test_greedy_equals_uncached_argmax(policy, tok, rm):
    res = _decode(policy, tok, rm, temperature=0.0, num_candidates=2, max_new_tokens=12,
                  max_step_tokens=4, min_step_tokens=100)
    assert all(s["chosen"] == 0 and len(set(s["candidates"])) == 1 for s in res.steps)
    ids = generation_prompt_ids(tok, MESSAGES)
    with torch.inference_mode():
        for token in res.token_ids:
            assert int(policy(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids = ids + [token]


def test_steps_end_at_the_papers_first_boundary(policy, tok, rm):
    boundary = rd.PaperBoundary(min_tokens=8)
    with _short_steps(policy, tok):
        res = _decode(policy, tok, rm, max_new_tokens=64)
    finishes = [f for s in res.steps for f in s["finish"]]
    assert "boundary" in finishes
    for step in res.steps:
        for text, n, finish in zip(step["candidates"], step["n_tokens"], step["finish"]):
            if finish == "boundary":
                assert n >= 8 and boundary(text, n)
            elif finish in ("budget", "step_cap"):
                assert not boundary(text, n)


@pytest.mark.parametrize("chunk, cuts", [
    ("Pi is about 3.", True), ("Fruit, e.", True), ("The U.", True), ("The sky is blue.", True),
    ("Fruit, e.g.", False), ("Ask Dr.", False), ("Para one\n\n", True), ("Steps:\n1.\n\n", True),
    ("Steps:\n2.", False), ("The sky is", False), ("Done. ", True),
])
def test_paper_boundary_is_the_papers_own_rule(chunk, cuts):
    """The baseline keeps the paper's rule, tested on every token prefix of the chunk alone: it
    cuts inside numbers and initialisms, where mahalo waits for the next token (see README)."""
    assert rd.PaperBoundary(min_tokens=1)(chunk, 10) is cuts
    assert not rd.PaperBoundary(min_tokens=8)(chunk, 7)


def test_all_end_of_turn_candidates_stop_without_scoring(policy, tok, rm):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with _logit_bias(policy, {eos: 100.0}), _count_tokens(rm) as rm_n:
        res = _decode(policy, tok, rm)
    assert res.stop_reason == "eos" and res.text == ""
    assert res.steps == [{
        "candidates": ["", "", ""], "scores": None, "chosen": None,
        "n_tokens": [1, 1, 1], "finish": ["eos"] * 3, "attempts": 3,
    }]
    assert res.policy_tokens == len(generation_prompt_ids(tok, MESSAGES))
    assert res.rm_tokens == 0 == rm_n["n"]


def test_chosen_end_of_turn_stops_decoding(policy, tok, rm):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    results = []
    with _logit_bias(policy, {eos: 2.5}):
        for seed in range(4):
            with _count_tokens(policy) as pol_n, _count_tokens(rm) as rm_n:
                results.append(_decode(policy, tok, rm, seed=seed, max_new_tokens=64))
            assert (results[-1].policy_tokens, results[-1].rm_tokens) == (pol_n["n"], rm_n["n"])
            assert (pol_n["n"], rm_n["n"]) == _expected_counts(results[-1], tok)
    stopped = [r for r in results if r.stop_reason == "eos"]
    assert stopped
    assert any(f == "eos" for r in results for s in r.steps for f in s["finish"])
    for r in stopped:
        last = r.steps[-1]
        if last["chosen"] is not None:
            assert last["finish"][last["chosen"]] == "eos"
            assert r.token_ids[-1] == eos
        assert all(s["finish"][s["chosen"]] != "eos" for s in r.steps[:-1])


def test_single_candidate_skips_the_reward_model(policy, tok, rm):
    with _count_tokens(rm) as rm_n:
        res = _decode(policy, tok, rm, num_candidates=1)
    assert res.rm_tokens == 0 == rm_n["n"]
    assert all(s["chosen"] == 0 and math.isnan(s["scores"][0]) for s in res.steps)


def test_budget_and_stop_reason(policy, tok, rm):
    res = _decode(policy, tok, rm, max_new_tokens=10, min_step_tokens=100)
    assert res.stop_reason in ("max_new_tokens", "eos")
    assert len(res.token_ids) <= 10
    if res.stop_reason == "max_new_tokens":
        assert len(res.token_ids) == 10
    assert res.wall_s > 0


def test_sample_token_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert rd.sample_token(logits, gen, temperature=0.0) == 1
    assert rd.sample_token(logits, gen, top_k=1) == 1
    assert rd.sample_token(logits, gen, top_k=None, top_p=0.01) == 1
    drawn = {rd.sample_token(logits, gen, top_k=2) for _ in range(200)}
    assert drawn == {1, 3}
    drawn_all = {rd.sample_token(logits, gen, top_k=50) for _ in range(400)}
    assert drawn_all == {0, 1, 2, 3, 4}


def test_stops_on_the_models_own_stop_ids(policy, tok, rm):
    """Both engines take stop tokens from the model (generation_config.eos_token_id included)."""
    other = tok.convert_tokens_to_ids("<pad>")  # a special token the tokenizer does not call EOS
    saved = policy.generation_config.eos_token_id
    policy.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), other]
    try:
        with _logit_bias(policy, {other: 100.0}):
            res = _decode(policy, tok, rm)
    finally:
        policy.generation_config.eos_token_id = saved
    assert res.stop_reason == "eos" and res.text == ""
    assert all(f == ["eos"] * 3 for f in (s["finish"] for s in res.steps))


def test_rejects_zero_candidates(policy, tok, rm):
    with pytest.raises(ValueError):
        _decode(policy, tok, rm, num_candidates=0)
