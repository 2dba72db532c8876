"""Reward scores from the cached, batched path equal what plain transformers gives.

The reference is built the way a user builds it: the candidate's text decoded from the policy's
ids, ``tokenizer.apply_chat_template(messages + [assistant], tokenize=True)``, then
``model(input_ids).logits`` -- never mahalo's own splitting code.
"""

import copy

import pytest
import torch

from mahalo import guided_generate
from mahalo.app.tiny import tiny_policy, tiny_reward, tiny_tokenizer
from mahalo.chat import as_messages
from mahalo.rewards import Candidates, SequenceClassifierReward
from tests.helpers import plain_score, response_text_of

TOL = 1e-5
PROMPT = "Is the earth flat?"
OPTS = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=32,
            step="max_tokens", min_step_tokens=0, max_step_tokens=6)


def _worst_gap(res, policy_tok, model, tok, name="truth", score_at="last_token") -> tuple[float, int]:
    worst, n = 0.0, 0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            text = response_text_of(res, policy_tok, s, c)
            worst = max(worst, abs(cand.scores[name] - plain_score(model, tok, PROMPT, text, score_at)))
            n += 1
    return worst, n


@pytest.mark.parametrize("style", ["chatml", "llama3", "llama2"])
def test_scores_equal_a_plain_forward_of_apply_chat_template(style):
    """ChatML, Llama 3 (BOS in the text, content trimmed) and a SentencePiece tokenizer with the
    Llama 2 template: every candidate of every step, with beams that branch and are pruned."""
    policy = tiny_policy(style=style)
    model, tok = tiny_reward(style=style)
    res = guided_generate(policy, {"truth": (model, tok)}, PROMPT, **OPTS)
    worst, n = _worst_gap(res, policy[1], model, tok)
    assert len(res.steps) >= 3 and n >= 12
    assert worst <= TOL, worst


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_score_at_end_of_turn_reads_the_end_of_turn_token(style):
    policy = tiny_policy(style=style)
    model, tok = tiny_reward(style=style)
    rm = SequenceClassifierReward(model, tok, score_at="end_of_turn")
    res = guided_generate(policy, {"truth": rm}, PROMPT, **OPTS)
    worst, _ = _worst_gap(res, policy[1], model, tok, score_at="end_of_turn")
    assert worst <= TOL, worst
    # for ChatML the two points differ: <|im_end|> vs the "\n" after it
    if style == "chatml":
        text = response_text_of(res, policy[1], 0, 0)
        assert abs(plain_score(model, tok, PROMPT, text) - plain_score(model, tok, PROMPT, text, "end_of_turn")) > 1e-4


def test_two_label_classifier_scores_probability(policy):
    model, tok = tiny_reward(seed=3, num_labels=2)
    res = guided_generate(policy, {"p": (model, tok)}, PROMPT, **OPTS)
    worst, _ = _worst_gap(res, policy[1], model, tok, name="p")
    assert all(0.0 <= c.scores["p"] <= 1.0 for st in res.steps for c in st.candidates)
    assert worst <= TOL, worst


def test_other_vocabulary_scores_equal_a_plain_forward(policy, reward_other_vocab):
    """Different vocabularies: the reward model reads its own tokenisation of the text."""
    model, tok = reward_other_vocab
    assert tok.get_vocab() != policy[1].get_vocab()
    res = guided_generate(policy, {"truth": reward_other_vocab}, PROMPT, **OPTS)
    worst, _ = _worst_gap(res, policy[1], model, tok)
    assert worst <= TOL, worst


def test_empty_response_without_chat_template_is_scored_at_its_last_token(policy):
    """End of turn as the first token, a reward tokenizer with no chat template (mahalo's plain
    ``role: content`` fallback) and ``end_of_turn`` scoring: nothing new to forward, yet the score
    must be read at the conversation's last real token, not at a padding column."""
    model, _ = tiny_reward(seed=4)
    tok = copy.deepcopy(tiny_tokenizer(320))
    tok.chat_template = None
    rm = SequenceClassifierReward(model, tok, score_at="end_of_turn")
    messages = as_messages(PROMPT)
    state = rm.start()
    rm.add(state, [messages])
    texts = ["", "Paris is the capital.", ""]
    scores = rm.score(state, Candidates(torch.tensor([0, 0, 0]), [[], [5, 6], []], texts))
    for text, score in zip(texts, scores.tolist()):
        rendered = f"user: {PROMPT}\nassistant: {text}"  # the documented fallback, trailing space dropped
        ids = tok(rendered.rstrip(), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert abs(score - ref) <= TOL, (text, score, ref)


def test_prm_forwards_only_what_the_kept_conversation_does_not_hold(policy, reward):
    """Per step, each candidate forwards its conversation's ids after the longest common prefix
    with its beam's kept conversation (at least its last token): counted independently here."""
    model, tok = reward
    res = guided_generate(policy, {"truth": reward}, PROMPT, **{**OPTS, "max_new_tokens": 48})
    messages = as_messages(PROMPT)

    def ids_of(text: str) -> list[int]:
        return tok.apply_chat_template([*messages, {"role": "assistant", "content": text}], tokenize=True)["input_ids"]

    def lcp(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    prefix = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    expected, full, kept = len(prefix), 0, [prefix]
    for s, step in enumerate(res.steps):
        conversations = [ids_of(response_text_of(res, policy[1], s, c)) for c in range(len(step.candidates))]
        for cand, ids in zip(step.candidates, conversations):
            parent = kept[0] if s == 0 else kept[cand.parent]
            expected += len(ids) - min(lcp(parent, ids), len(ids) - 1)
            full += len(ids)
        chosen = step.chosen if isinstance(step.chosen, list) else [step.chosen]
        kept = {c: conversations[c] for c in chosen}
    assert res.stats.prm_tokens == expected
    assert res.stats.prm_full_rescore_tokens == full
    assert len(res.steps) >= 6 and full / res.stats.prm_tokens > 2.0


def test_cache_after_keep_holds_the_kept_conversation_only(reward):
    """After keep, a row holds exactly its conversation's ids (no holes, no padding); the next
    step forwards only what differs from it."""
    model, tok = reward
    rm = SequenceClassifierReward(model, tok)
    messages = as_messages(PROMPT)
    state = rm.start()
    rm.add(state, [messages])
    rm.score(state, Candidates(torch.tensor([0, 0]), [[], []], ["No, it is", "Yes"]))
    rm.keep(state, torch.tensor([0]))
    conversation = tok.apply_chat_template([*messages, {"role": "assistant", "content": "No, it is"}],
                                           tokenize=True)["input_ids"]
    assert state.ids == [conversation] and int(state.kv.valid_counts()[0]) == len(conversation)
    assert state.kv.length == len(conversation) and bool(state.kv.mask.all())
    longer = "No, it is round."
    score = rm.score(state, Candidates(torch.tensor([0]), [[]], [longer]))
    grown = tok.apply_chat_template([*messages, {"role": "assistant", "content": longer}], tokenize=True)["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(conversation, grown)) if a != b)
    assert state.cost.tokens == [len(grown) - shared] and state.cost.full == [len(grown)]
    assert abs(float(score[0]) - plain_score(model, tok, PROMPT, longer)) <= TOL
