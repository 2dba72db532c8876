"""Policy logits on every decoded path equal a full forward of the same tokens (fp32, 1e-5)."""

import torch

from mahalo import guided_generate
from mahalo.policy import HFPolicy
from tests.helpers import full_logprobs, prompt_ids, response_ids_of

TOL = 1e-5


def _row_tokens(rows: list[list[int]], index: list[int]) -> list[list[int]]:
    return [list(rows[i]) for i in index]


def _check_rows(model, state, rows: list[list[int]]) -> float:
    worst = 0.0
    for r, ids in enumerate(rows):
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        worst = max(worst, float((state.logits[r] - ref).abs().max()))
    return worst


def test_fan_out_holes_select_and_compact_match_full_forward(policy):
    model, tok = policy
    pol = HFPolicy(model, tok)
    ids = prompt_ids(tok, "Tell me about cats.")
    state = pol.prefill([ids])
    rows = [list(ids)]
    gen = torch.Generator().manual_seed(0)
    # fan out 1 -> 4 rows, then decode with random holes, select with repeats, compact
    plan = [("select", [0, 0, 0, 0]), ("decode", 5), ("select", [2, 2, 0]), ("compact", None),
            ("decode", 4), ("select", [1, 0, 1, 2, 2]), ("decode", 3), ("compact", None), ("decode", 2)]
    worst = 0.0
    for op, arg in plan:
        if op == "select":
            state.select(torch.tensor(arg))
            rows = _row_tokens(rows, arg)
        elif op == "compact":
            state.kv.compact()
        else:
            for _ in range(arg):
                tokens = torch.randint(3, len(tok), (len(rows),), generator=gen)
                feed = torch.rand(len(rows), generator=gen) < 0.6
                feed[0] = True
                pol.forward(state, tokens, feed)
                for r in range(len(rows)):
                    if feed[r]:
                        rows[r].append(int(tokens[r]))
        worst = max(worst, _check_rows(model, state, rows))
    assert state.kv.mask.shape[1] >= max(len(r) for r in rows)
    assert worst <= TOL, worst


def test_compact_removes_holes(policy):
    model, tok = policy
    pol = HFPolicy(model, tok)
    state = pol.prefill([prompt_ids(tok, "Hi")])
    state.select(torch.tensor([0, 0]))
    for step in range(6):
        pol.forward(state, torch.tensor([5, 6]), torch.tensor([True, step % 2 == 0]))
    before = state.kv.length
    state.kv.compact()
    # row 0 has all 6 tokens; row 1 only 3: compaction keeps prompt + 6 columns, row 1 left-padded
    assert state.kv.length == before
    state.select(torch.tensor([1]))
    state.kv.compact()
    assert state.kv.length == before - 3
    assert bool(state.kv.mask.all())


def test_every_candidate_logprob_matches_full_forward(policy):
    model, tok = policy
    prompt = "Why is the sky blue?"
    res = guided_generate(
        policy, {"len": lambda p, r: float(len(r) % 7)}, prompt,
        strategy="step_beam", beam_width=3, num_candidates=3, max_new_tokens=30,
        step="max_tokens", min_step_tokens=0, max_step_tokens=6, top_k=0,
    )
    base = prompt_ids(tok, prompt)
    worst, checked = 0.0, 0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            resp = response_ids_of(res, s, c)
            ref = full_logprobs(model, base + resp)
            start = len(base) + len(resp) - len(cand.token_ids)
            for j, t in enumerate(cand.token_ids):
                worst = max(worst, abs(cand.logprobs[j] - float(ref[start + j - 1, t])))
                checked += 1
    assert checked > 50
    assert worst <= TOL, worst


def test_result_tokens_are_the_chosen_path(policy):
    res = guided_generate(policy, {"n": lambda p, r: -len(r)}, "Hello", num_candidates=3,
                          max_new_tokens=20, step="max_tokens", min_step_tokens=0, max_step_tokens=5)
    path = []
    for step in res.steps:
        path += step.candidates[step.chosen].token_ids
    assert res.token_ids == path
    assert res.text == policy[1].decode(path, skip_special_tokens=True)


def test_plain_head_fast_path_is_used_and_exact(policy):
    """On CPU a Llama policy applies its head as ``W @ h.T``; logits match ``model(...)``."""
    model, tok = policy
    pol = HFPolicy(model, tok)
    assert pol._head is not None and pol._head.data_ptr() == model.lm_head.weight.data_ptr()
    ids = prompt_ids(tok, "Name a colour.")
    state = pol.prefill([ids])
    state.select(torch.tensor([0, 0, 0]))
    pol.forward(state, torch.tensor([5, 6, 7]), torch.ones(3, dtype=torch.bool))
    assert _check_rows(model, state, [ids + [5], ids + [6], ids + [7]]) <= TOL


def test_other_heads_use_the_model_forward(policy):
    """An architecture outside the plain-head list goes through ``model(...)`` unchanged."""
    model, tok = policy

    class Wrapped(type(model)):  # same weights, a name not in PLAIN_HEAD_ARCHITECTURES
        pass

    model.__class__ = Wrapped
    try:
        pol = HFPolicy(model, tok)
        assert pol._head is None
        ids = prompt_ids(tok, "Name a colour.")
        state = pol.prefill([ids])
        assert _check_rows(model, state, [ids]) <= TOL
    finally:
        model.__class__ = Wrapped.__mro__[1]
