"""Search behaviour: determinism, steering by reward, weights, beams, stop rules."""

import torch

from mahalo import guided_generate
from mahalo.rewards import combine

STEPS = dict(step="max_tokens", min_step_tokens=0, max_step_tokens=6)


def vowels(prompt: str, response: str) -> float:
    return sum(ch in "aeiou" for ch in response) / max(1, len(response))


def test_same_seed_same_result_other_seed_differs(policy, reward):
    kw = dict(num_candidates=4, max_new_tokens=24, seed=7, **STEPS)
    a = guided_generate(policy, {"truth": reward}, "Hi there", **kw)
    b = guided_generate(policy, {"truth": reward}, "Hi there", **kw)
    c = guided_generate(policy, {"truth": reward}, "Hi there", **{**kw, "seed": 8})
    assert a.token_ids == b.token_ids and a.to_dict()["steps"] == b.to_dict()["steps"]
    assert a.token_ids != c.token_ids


def test_best_of_one_per_step_is_plain_sampling(policy, reward):
    for seed in range(3):
        kw = dict(max_new_tokens=40, seed=seed, temperature=0.9, top_k=20, top_p=0.95)
        plain = guided_generate(policy, {}, "Tell me a story", strategy="sample", **kw)
        stepped = guided_generate(policy, {"truth": reward}, "Tell me a story",
                                  strategy="step_best_of_n", num_candidates=1, **kw, **STEPS)
        assert stepped.token_ids == plain.token_ids
        assert stepped.text == plain.text
        assert len(stepped.steps) > 1 and len(plain.steps) == 1


def test_greedy_sample_is_argmax_path(policy):
    from tests.helpers import full_logprobs, prompt_ids
    res = guided_generate(policy, {}, "Hello", strategy="sample", temperature=0, max_new_tokens=12)
    ids = prompt_ids(policy[1], "Hello")
    for t in res.token_ids:
        nxt = int(full_logprobs(policy[0], ids)[-1].argmax())
        assert t == nxt
        ids.append(t)


def test_kept_candidate_is_argmax_of_combined(policy):
    res = guided_generate(policy, {"v": vowels}, "Say something", num_candidates=5,
                          max_new_tokens=36, **STEPS)
    assert len(res.steps) >= 4
    for step in res.steps:
        combined = torch.tensor([c.combined for c in step.candidates])
        assert step.chosen == int(combined.argmax())
        assert step.candidates[step.chosen].scores["v"] == max(c.scores["v"] for c in step.candidates)


def test_opposed_objectives_follow_their_weights(policy):
    prms = {"v": vowels, "not_v": lambda p, r: -vowels(p, r)}
    kw = dict(num_candidates=6, max_new_tokens=40, seed=3, **STEPS)
    pro = guided_generate(policy, prms, "Say something", weights={"v": 1.0, "not_v": 0.0}, **kw)
    con = guided_generate(policy, prms, "Say something", weights={"v": 0.0, "not_v": 1.0}, **kw)
    base = guided_generate(policy, {}, "Say something", strategy="sample", **kw)
    assert vowels("", pro.text) > vowels("", base.text) > vowels("", con.text)


def test_zscore_weights_balance_scales():
    raw = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([300.0, 200.0, 100.0]),
           "c": torch.tensor([5.0, 5.0, 5.0])}
    w = {"a": 1.0, "b": 1.0, "c": 2.0}
    z = combine(raw, w, "zscore")
    assert torch.allclose(z, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    none = combine(raw, w, "none")
    assert torch.allclose(none, torch.tensor([311.0, 212.0, 113.0], dtype=torch.float64))


def test_step_beam_keeps_b_beams_and_returns_best_ended(policy, reward):
    B, N = 3, 2
    res = guided_generate(policy, {"truth": reward}, "Explain rain", strategy="step_beam",
                          beam_width=B, num_candidates=N, max_new_tokens=24, **STEPS)
    ended = []
    for s, step in enumerate(res.steps):
        assert isinstance(step.chosen, list) and len(step.chosen) <= B
        if s > 0:  # candidates = N per beam kept (and not ended) in the previous step
            prev = res.steps[s - 1]
            alive = [i for i in prev.chosen if prev.candidates[i].end == "step"]
            assert len(step.candidates) == N * len(alive)
            assert {c.parent for c in step.candidates} == set(alive)
        # the kept are the top of the combined ranking
        ranked = sorted(range(len(step.candidates)), key=lambda i: -step.candidates[i].combined)
        assert sorted(ranked[: len(step.chosen)]) == step.chosen
        ended += [step.candidates[i] for i in step.chosen if step.candidates[i].end != "step"]
    assert len(res.steps[0].candidates) == B * N and len(res.steps[0].chosen) == B
    assert len(ended) == B
    best = max(ended, key=lambda c: c.scores["truth"])
    assert res.scores["truth"] == best.scores["truth"]
    assert res.stop_reason in ("eos", "length")


def test_best_of_n_scores_whole_responses(policy, reward):
    res = guided_generate(policy, {"truth": reward}, "Explain rain", strategy="best_of_n",
                          num_candidates=4, max_new_tokens=16)
    assert len(res.steps) == 1
    step = res.steps[0]
    assert len(step.candidates) == 4 and all(c.end in ("eos", "length") for c in step.candidates)
    assert step.chosen == max(range(4), key=lambda i: step.candidates[i].scores["truth"])
    assert res.token_ids == step.candidates[step.chosen].token_ids


def test_budget_and_stats(policy, reward):
    res = guided_generate(policy, {"truth": reward}, "Hi", num_candidates=3, max_new_tokens=20, **STEPS)
    assert len(res.token_ids) <= 20
    s = res.stats
    assert s.response_tokens == len(res.token_ids)
    assert s.policy_tokens <= s.policy_tokens_padded and s.prm_tokens <= s.prm_tokens_padded
    assert s["wall_s"] > 0 and s.steps == len(res.steps)


def test_unguided_strategies_run_without_rewards(policy):
    for strategy in ("sample", "best_of_n", "step_best_of_n", "step_beam"):
        res = guided_generate(policy, {}, "Hi", strategy=strategy, max_new_tokens=10,
                              num_candidates=2, beam_width=2)
        assert 1 <= len(res.token_ids) <= 10 or res.stop_reason == "eos"
        assert res.stats.prm_tokens == 0
