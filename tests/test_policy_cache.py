"""Logits on every decoded path equal a full forward of the same tokens (fp32, 1e-5): the
policy's shared-prefix cache through the engine, and the per-row cache (KVRows: holes, fan-out,
select, compact) that reward models keep."""

import torch

from mahalo import guided_generate
from mahalo.cascade import PROMPT, ROW, Item
from mahalo.kv import empty_rows, right_padded
from mahalo.policy import HFPolicy
from tests.helpers import full_logprobs, prompt_ids, response_ids_of

TOL = 1e-5


def _row_tokens(rows: list[list[int]], index: list[int]) -> list[list[int]]:
    return [list(rows[i]) for i in index]


class _Rows:
    """A causal LM on a per-row cache (:class:`mahalo.kv.KVRows`), as a reward model's backbone
    runs on one: each row's logits after each forward."""

    def __init__(self, model, prompts: list[list[int]]) -> None:
        self.model = model
        self.kv = empty_rows("cpu", len(prompts))
        ids, mask = right_padded(prompts, 0, "cpu")
        last = torch.tensor([len(p) - 1 for p in prompts])
        self.logits = self._forward(ids, mask)[torch.arange(len(prompts)), last]

    @torch.inference_mode()
    def _forward(self, ids, new_mask):
        mask, positions = self.kv.extend(new_mask)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.kv.cache,
                          use_cache=True).logits.float()

    def select(self, index):
        self.kv.select(index)
        self.logits = self.logits[index]

    def forward(self, tokens, feed):
        logits = self._forward(torch.where(feed, tokens, 0)[:, None], feed.long()[:, None])[:, -1]
        self.logits = torch.where(feed[:, None], logits, self.logits)


def _check_rows(model, state, rows: list[list[int]]) -> float:
    worst = 0.0
    for r, ids in enumerate(rows):
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        worst = max(worst, float((state.logits[r] - ref).abs().max()))
    return worst


def test_fan_out_holes_select_and_compact_match_full_forward(policy):
    model, tok = policy
    ids = prompt_ids(tok, "Tell me about cats.")
    state = _Rows(model, [ids])
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
                state.forward(tokens, feed)
                for r in range(len(rows)):
                    if feed[r]:
                        rows[r].append(int(tokens[r]))
        worst = max(worst, _check_rows(model, state, rows))
    assert state.kv.mask.shape[1] >= max(len(r) for r in rows)
    assert worst <= TOL, worst


def test_compact_removes_holes(policy):
    model, tok = policy
    state = _Rows(model, [prompt_ids(tok, "Hi")])
    state.select(torch.tensor([0, 0]))
    for step in range(6):
        state.forward(torch.tensor([5, 6]), torch.tensor([True, step % 2 == 0]))
    before = state.kv.length
    state.kv.compact()
    # row 0 has all 6 tokens; row 1 only 3: compaction keeps prompt + 6 columns, row 1 left-padded
    assert state.kv.length == before
    state.select(torch.tensor([1]))
    state.kv.compact()
    assert state.kv.length == before - 3
    assert bool(state.kv.mask.all())


def _policy_logits(pol: HFPolicy, ids: list[int], next_tokens: list[int]) -> torch.Tensor:
    """The policy's logits after ``ids`` + each of ``next_tokens`` (one row each, one forward),
    through its own cache and forwards."""
    kv = pol.shared_kv()
    slot = kv.prompt.alloc()
    pol.run(kv, [Item(ids, 0, (PROMPT, slot, 0), ((-1, 0),) * 4)])
    reads = ((-1, 0), (slot, len(ids)), (-1, 0), (-1, 0))
    hidden, _ = pol.run(kv, [Item([t], len(ids), (ROW, kv.row.alloc(), 0), reads) for t in next_tokens])
    return pol.logits(hidden)


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
    got = _policy_logits(pol, ids, [5, 6, 7])
    with torch.inference_mode():
        ref = [model(input_ids=torch.tensor([ids + [t]])).logits[0, -1].float() for t in (5, 6, 7)]
    assert max(float((g - r).abs().max()) for g, r in zip(got, ref)) <= TOL


def test_other_heads_use_the_model_forward(policy):
    """An architecture outside the plain-head list goes through its own output head unchanged."""
    model, tok = policy

    class Wrapped(type(model)):  # same weights, a name not in PLAIN_HEAD_ARCHITECTURES
        pass

    model.__class__ = Wrapped
    try:
        pol = HFPolicy(model, tok)
        assert pol._head is None
        ids = prompt_ids(tok, "Name a colour.")
        got = _policy_logits(pol, ids, [9])
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids + [9]])).logits[0, -1].float()
        assert float((got[0] - ref).abs().max()) <= TOL
    finally:
        model.__class__ = Wrapped.__mro__[1]


def test_growing_cache_rows_equal_plain_tensor_operations():
    """The in-place cache (appends into spare columns, gathers into reused memory) holds exactly
    what concatenation, slicing and indexing of plain tensors give, through every KVRows operation
    the controller uses, in the order that once overwrote live rows (a left slice, then a gather)."""
    from mahalo.kv import GrowingLayer, empty_rows

    gen = torch.Generator().manual_seed(0)

    def rand(rows, cols):
        return torch.randn(rows, 2, cols, 4, generator=gen)

    kv = empty_rows("cpu", 3)
    ref_k, ref_v = rand(3, 5), rand(3, 5)
    with torch.inference_mode():
        kv.cache.update(ref_k, ref_v, 0)
    kv.mask = torch.ones(3, 5, dtype=torch.long)
    layer = kv.cache.layers[0]
    assert isinstance(layer, GrowingLayer)

    def append(cols=1):
        nonlocal ref_k, ref_v
        k, v = rand(kv.rows, cols), rand(kv.rows, cols)
        kv.extend(torch.ones(kv.rows, cols, dtype=torch.long))
        with torch.inference_mode():
            kv.cache.update(k, v, 0)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)

    def check():
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
        assert kv.mask.shape == (ref_k.shape[0], ref_k.shape[2])

    buffer = None
    for i in range(6):  # decode steps write into the same buffer
        append()
        check()
        buffer = buffer or layer.keys.data_ptr()
        assert layer.keys.data_ptr() == buffer
    kv.mask[:, 0] = 0  # column 0 is a hole in every row: tidy slices it off (a view into the buffer)
    kv.tidy()
    ref_k, ref_v = ref_k[:, :, 1:], ref_v[:, :, 1:]
    check()
    kv.select(torch.tensor([2, 0, 0, 1]))  # fan out: a gather must not land on the sliced rows
    ref_k, ref_v = ref_k[[2, 0, 0, 1]], ref_v[[2, 0, 0, 1]]
    check()
    append(3)
    check()
    kv.crop(2)  # a probe's columns removed; the next append overwrites them
    ref_k, ref_v = ref_k[:, :, :-2], ref_v[:, :, :-2]
    check()
    append()
    check()
    # park rows 1 and 3, decode the others, put every row back at its place
    parked = kv.take(torch.tensor([1, 3]))
    parked_k, parked_v = ref_k[[1, 3]], ref_v[[1, 3]]
    kv.select(torch.tensor([0, 2]))
    ref_k, ref_v = ref_k[[0, 2]], ref_v[[0, 2]]
    append(2)
    kv.place(torch.tensor([0, 2]), [(parked, torch.tensor([1, 3]))])
    pad = ref_k.shape[2] - parked_k.shape[2]
    full_k = torch.zeros(4, 2, ref_k.shape[2], 4)
    full_v = torch.zeros_like(full_k)
    full_k[[0, 2]], full_v[[0, 2]] = ref_k, ref_v
    full_k[[1, 3], :, pad:], full_v[[1, 3], :, pad:] = parked_k, parked_v
    ref_k, ref_v = full_k, full_v
    check()
    assert kv.mask[[1, 3], :pad].sum() == 0 and bool(kv.mask[[1, 3], pad:].all())
    append()
    check()
