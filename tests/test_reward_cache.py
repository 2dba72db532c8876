"""Reward scores from the cached, batched path equal full forwards of the whole conversation."""

import pytest
import torch

from mahalo import guided_generate
from mahalo.app.tiny import tiny_reward
from mahalo.chat import as_messages, conversation_parts
from mahalo.rewards import SequenceClassifierReward
from tests.helpers import full_reward, response_ids_of

TOL = 1e-5
PROMPT = "Is the earth flat?"
OPTS = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=32,
            step="max_tokens", min_step_tokens=0, max_step_tokens=6)


def test_shared_vocab_scores_equal_full_forward(policy, reward):
    res = guided_generate(policy, {"truth": reward}, PROMPT, **OPTS)
    worst, n = 0.0, 0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            ref = full_reward(*reward, PROMPT, response_ids_of(res, s, c))
            worst = max(worst, abs(cand.scores["truth"] - ref))
            n += 1
    assert n >= 12
    assert worst <= TOL, worst


@pytest.mark.parametrize("num_labels", [2])
def test_two_label_classifier_scores_probability(policy, num_labels):
    rm = tiny_reward(seed=3, num_labels=num_labels)
    res = guided_generate(policy, {"p": rm}, PROMPT, **OPTS)
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            assert 0.0 <= cand.scores["p"] <= 1.0
            assert abs(cand.scores["p"] - full_reward(*rm, PROMPT, response_ids_of(res, s, c))) <= TOL


def test_retokenised_scores_equal_full_forward_of_retokenised_text(policy, reward_other_vocab):
    """Different vocabularies: the reward model reads prefix + tok(response text) + suffix."""
    model, tok = reward_other_vocab
    assert tok.get_vocab() != policy[1].get_vocab()
    res = guided_generate(policy, {"truth": reward_other_vocab}, PROMPT, **OPTS)
    worst = 0.0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            text = policy[1].decode(response_ids_of(res, s, c), skip_special_tokens=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            worst = max(worst, abs(cand.scores["truth"] - full_reward(model, tok, PROMPT, ids)))
    assert worst <= TOL, worst


def test_prm_tokens_are_new_tokens_only(policy, reward):
    model, tok = reward
    res = guided_generate(policy, {"truth": reward}, PROMPT, **{**OPTS, "max_new_tokens": 48})
    parts = conversation_parts(tok, as_messages(PROMPT))
    p, sfx = len(parts.prefix_ids), len(parts.suffix_ids)
    # the prefix once, then per step and candidate only its chunk and the end-of-turn suffix
    expected = p + sum(len(c.token_ids) + sfx for st in res.steps for c in st.candidates)
    assert res.stats.prm_tokens == expected
    full = sum(
        p + len(response_ids_of(res, s, i)) + sfx
        for s, st in enumerate(res.steps) for i, _ in enumerate(st.candidates)
    )
    assert res.stats.prm_full_rescore_tokens == full
    assert len(res.steps) >= 6
    # the saving grows with the number of steps: well over 2x here
    assert full / res.stats.prm_tokens > 2.0


def test_cache_after_keep_holds_prefix_and_accepted_only(policy, reward):
    """After a step the reward cache has no suffix or padding left: only prefix + accepted."""
    model, tok = reward
    rm = SequenceClassifierReward(model, tok)
    res = guided_generate(policy, {"truth": rm}, PROMPT, **{**OPTS, "beam_width": 1})
    assert res.stats.steps >= 2
    state = rm.start(as_messages(PROMPT), tok)
    from mahalo.rewards import Candidates
    ids = [[10, 11, 12], [13, 14]]
    rm.score(state, Candidates(as_messages(PROMPT), torch.tensor([0, 0]), ids, ["", ""]))
    rm.keep(state, torch.tensor([1]))
    parts = conversation_parts(tok, as_messages(PROMPT))
    assert state.kv.length == len(parts.prefix_ids) + 2
    assert bool(state.kv.mask.all())
