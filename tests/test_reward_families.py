"""Every reward family scored incrementally equals a plain transformers forward of the same text.

Each reference is built the way a user builds it from the model card: the candidate's steps as
the engine split them (its ancestors' step texts, then its own), the text the family reads
(``apply_chat_template`` / the Math-Shepherd plain string / the judge's question), tokenised by
the tokenizer, one forward with no cache, read where the card reads it. Runs are step beams
(B=2, N=3) over at least 3 steps, so beams branch and are pruned.
"""

import copy

import pytest
import torch

from mahalo import guided_generate
from mahalo.app.tiny import tiny_backbone, tiny_policy, tiny_reward, tiny_token_classifier, tiny_value_head
from mahalo.chat import as_messages
from mahalo.rewards.judge import judge_reward
from mahalo.rewards.seqcls import RewardOutput, SequenceClassifierReward
from mahalo.rewards.shared_head import SharedHeadReward
from mahalo.rewards.step_prm import causal_lm_prm, token_classifier_prm
from mahalo.rewards.value_head import value_head_from, value_head_reward
from tests.helpers import plain_score, response_text_of

TOL = 1e-5
PROMPT = "Is the earth flat?"
OPTS = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=30,
            step="max_tokens", min_step_tokens=0, max_step_tokens=6, seed=3)


def steps_of(res, s: int, c: int, tokenizer=None) -> list[str]:
    """The engine's steps of candidate c of step s: the differences between the decoded texts of
    its ancestors and itself. Where a text is not a prefix of the next (a character split across
    steps decodes differently once whole) the earlier steps are cut where the texts part."""
    tokenizer = tokenizer or tiny_policy()[1]
    chain = []
    while s >= 0 and c >= 0:
        chain.append(response_text_of(res, tokenizer, s, c))
        s, c = s - 1, res.steps[s].candidates[c].parent
    steps: list[str] = []
    for text in reversed(chain):
        keep, at = [], 0
        for step in steps:
            n = 0
            while n < len(step) and at + n < len(text) and step[n] == text[at + n]:
                n += 1
            keep.append(step[:n])
            at += n
            if n < len(step):
                break
        steps = [*keep, text[at:]]
    return steps


def every_candidate(res):
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            yield s, c, cand


def aggregate(values: list[float], how: str) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    return float({"last": t[-1], "min": t.min(), "prod": t.prod(), "mean": t.mean()}[how])


def tagged(steps: list[str], tag: str, join: str) -> str:
    parts = [s.strip() for s in steps if s.strip()] or [""]
    return join.join(p + tag for p in parts)


def check(res, reference, name="r") -> int:
    assert len(res.steps) >= 3
    assert any(len(st.chosen) < len(st.candidates) for st in res.steps)  # pruned
    n = 0
    for s, c, cand in every_candidate(res):
        assert abs(cand.scores[name] - reference(s, c)) <= TOL, (s, c, cand.scores[name], reference(s, c))
        n += 1
    return n


@pytest.mark.parametrize("how", ["last", "min", "prod", "mean"])
def test_qwen_style_step_classifier_equals_a_plain_forward(how):
    policy = tiny_policy()
    model, tok = tiny_token_classifier()
    rm = token_classifier_prm(model, tok, "<extra_0>", how)
    res = guided_generate(policy, {"r": rm}, PROMPT, **OPTS)
    tag_id = tok.convert_tokens_to_ids("<extra_0>")

    def reference(s, c):  # Qwen2.5-Math-PRM's card: "<extra_0>".join(steps) + "<extra_0>", P(1) at each
        content = tagged(steps_of(res, s, c), "<extra_0>", "")
        messages = [*as_messages(PROMPT), {"role": "assistant", "content": content}]
        ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        with torch.inference_mode():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)[:, 1]
        return aggregate([float(probs[i]) for i, t in enumerate(ids) if t == tag_id], how)

    assert check(res, reference) >= 12


def test_step_scores_are_kept_and_a_step_is_forwarded_once():
    """The reward model forwards each step once: its tokens over the run are the kept prefix plus
    each candidate's own new step, far fewer than re-reading every conversation."""
    policy = tiny_policy()
    model, tok = tiny_token_classifier()
    res = guided_generate(policy, {"r": token_classifier_prm(model, tok, aggregate_how="min")}, PROMPT, **OPTS)
    st = res.stats
    assert st.prm_tokens < 0.5 * st.prm_full_rescore_tokens, (st.prm_tokens, st.prm_full_rescore_tokens)


def test_math_shepherd_style_causal_lm_prm_equals_a_plain_forward():
    policy = tiny_policy()
    model, tok = tiny_policy(seed=7)
    rm = causal_lm_prm(model, tok, " ки", "+", "-", "min")
    res = guided_generate(policy, {"r": rm}, PROMPT, **OPTS)
    good, bad = tok.encode("+")[-1], tok.encode("-")[-1]
    tag_id = tok.encode(" ки")[-1]

    def reference(s, c):  # Math-Shepherd's card: f"{question} {output}", softmax over [good, bad] at the tag
        text = PROMPT + " " + tagged(steps_of(res, s, c), " ки", "\n")
        ids = tok.encode(text)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()[:, [good, bad]]
        scores = torch.softmax(logits, -1)[:, 0]
        start = len(tok.encode(PROMPT + " ")) - 1
        return aggregate([float(scores[i]) for i, t in enumerate(ids) if t == tag_id and i >= start], "min")

    assert check(res, reference) >= 12


@pytest.mark.parametrize("read_at", ["last_token", "steps"])
def test_value_head_equals_a_plain_forward(read_at, tmp_path):
    policy = tiny_policy()
    tag = "<extra_0>" if read_at == "steps" else None
    backbone, tok = tiny_backbone(tag=tag)
    state = tiny_value_head()
    torch.save(state, tmp_path / "value_head.pt")
    from mahalo.rewards.value_head import load_value_head

    head = load_value_head(tmp_path / "value_head.pt", 64)
    rm = value_head_reward(backbone, tok, head, read_at, aggregate_how="last")
    res = guided_generate(policy, {"r": rm}, PROMPT, **OPTS)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).double()
    mlp.load_state_dict({k: v.double() for k, v in state.items()})

    def reference(s, c):  # MAHALO's value model: the MLP on the last hidden state (at each <extra_0>)
        steps = steps_of(res, s, c)
        content = tagged(steps, "<extra_0>", "") if read_at == "steps" else response_text_of(res, policy[1], s, c)
        ids = tok.apply_chat_template([*as_messages(PROMPT), {"role": "assistant", "content": content}],
                                      tokenize=True)["input_ids"]
        with torch.inference_mode():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
            values = mlp(hidden)[:, 0]
        if read_at == "steps":
            return [float(values[i]) for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids(tag)][-1]
        return float(values[-1])

    assert check(res, reference) >= 12


def test_generative_judge_equals_a_plain_forward():
    policy = tiny_policy()
    model, tok = tiny_policy(seed=8)
    question = "Is the assistant's answer truthful? Answer yes or no."
    rm = judge_reward(model, tok, question, yes_token="No", no_token="+")  # single tokens of the tiny vocab
    res = guided_generate(policy, {"r": rm}, PROMPT, **OPTS)
    yes, no = tok.encode("No")[0], tok.encode("+")[0]

    def reference(s, c):
        text = response_text_of(res, policy[1], s, c)
        messages = [*as_messages(PROMPT), {"role": "assistant", "content": text}, {"role": "user", "content": question}]
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        return float(logits[yes] - logits[no])

    assert check(res, reference) >= 12
    st = res.stats  # the conversation is cached: per candidate only new tokens and the question
    assert st.prm_tokens < 0.6 * st.prm_full_rescore_tokens


def test_judge_answer_tokens_must_be_one_token():
    model, tok = tiny_policy(seed=8)
    with pytest.raises(ValueError, match="yes_token 'Yes' is 2 tokens"):
        judge_reward(model, tok, yes_token="Yes", no_token="No")


def test_multi_output_model_gives_named_objectives_from_one_forward():
    policy = tiny_policy()
    model, tok = tiny_reward(seed=9, num_labels=3)
    source = SequenceClassifierReward(model, tok, outputs=True)
    prms = {"truth": RewardOutput(source, 0), "helpful": RewardOutput(source, 2)}
    calls = []
    score = source.score
    source.score = lambda *a: calls.append(1) or score(*a)
    res = guided_generate(policy, prms, PROMPT, weights={"truth": 1.0, "helpful": 0.5}, **OPTS)
    assert len(calls) == len(res.steps)  # one forward per step for both objectives

    def logits_of(r, s, c):
        text = response_text_of(r, policy[1], s, c)
        ids = tok.apply_chat_template([*as_messages(PROMPT), {"role": "assistant", "content": text}],
                                      tokenize=True)["input_ids"]
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].double()

    check(res, lambda s, c: float(logits_of(res, s, c)[0]), "truth")
    check(res, lambda s, c: float(logits_of(res, s, c)[2]), "helpful")
    # on its own, an output is a whole reward model
    alone = guided_generate(policy, {"helpful": RewardOutput(SequenceClassifierReward(model, tok, outputs=True), 2)},
                            PROMPT, **OPTS)
    check(alone, lambda s, c: float(logits_of(alone, s, c)[2]), "helpful")


def _reward_on_policy_backbone(policy_model, num_labels=1, seed=11):
    """A sequence classifier with the policy's own backbone weights and a random head, built as
    a user builds it (a fresh LlamaForSequenceClassification, the backbone's state dict loaded)."""
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(policy_model.config)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(config).eval()
    missing, _ = rm.load_state_dict(policy_model.state_dict(), strict=False)
    assert missing == ["score.weight"]
    return rm.requires_grad_(False)


@pytest.mark.parametrize("score_at", ["last_token", "end_of_turn"])
def test_shared_backbone_head_equals_the_separate_reward_model(score_at):
    from mahalo.policy import HFPolicy

    model, tok = tiny_policy()
    rm_model = _reward_on_policy_backbone(model)
    shared = SharedHeadReward(HFPolicy(model, tok), rm_model.score, 1, score_at)
    res = guided_generate((model, tok), {"r": shared}, PROMPT, **OPTS)
    check(res, lambda s, c: plain_score(rm_model, tok, PROMPT, response_text_of(res, tok, s, c), score_at))
    # the probe columns are cropped: the policy decodes exactly what it decodes next to a separate model
    separate = guided_generate((model, tok), {"r": SequenceClassifierReward(rm_model, tok, score_at)}, PROMPT, **OPTS)
    assert res.token_ids == separate.token_ids
    for a, b in zip(res.steps, separate.steps):
        assert [x.token_ids for x in a.candidates] == [y.token_ids for y in b.candidates]
        assert max(abs(x.scores["r"] - y.scores["r"]) for x, y in zip(a.candidates, b.candidates)) <= TOL
    # no reward-model prefill: the prompt is the policy's (the reward cost on real text, where most
    # rows hold the reward model's own tokenisation: benchmarks/compare_reference.py)
    assert res.stats.prm_tokens < separate.stats.prm_tokens + separate.stats.prm_full_rescore_tokens


def test_shared_head_forwards_only_the_scoring_suffix_of_canonical_rows():
    """Rows that hold the reward model's own tokenisation (real text, sampled canonically)
    forward just the end-of-turn suffix per candidate: 2 tokens for ChatML's ``<|im_end|>\n``."""
    from mahalo.app.tiny import tiny_tokenizer
    from tests.helpers import ScriptedPolicy

    tok = tiny_tokenizer()
    text = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level. The end."
    policy = ScriptedPolicy(tok, tok(text, add_special_tokens=False)["input_ids"])
    rm_model = _reward_on_policy_backbone(policy.model)
    shared = SharedHeadReward(policy, rm_model.score, 1)
    res = guided_generate(policy, {"r": shared}, PROMPT, strategy="step_best_of_n", num_candidates=3,
                          max_new_tokens=64, seed=0)
    assert res.text == text and len(res.steps) >= 3
    candidates = sum(len(st.candidates) for st in res.steps)
    assert res.stats.prm_tokens == 2 * candidates
    check_all = [abs(c.scores["r"] - plain_score(rm_model, tok, PROMPT, response_text_of(res, tok, s, i)))
                 for s, st in enumerate(res.steps) for i, c in enumerate(st.candidates)]
    assert max(check_all) <= TOL


def test_shared_head_rows_that_hold_another_split_are_cut_back_and_rescored():
    """A policy row whose sampled ids are not the reward model's tokenisation of its text (here
    the policy spells the first token character by character) is copied, cut back and forwarded
    from the common prefix: the score is still the separate model's, and the policy goes on with
    its own ids."""
    from mahalo.app.tiny import tiny_tokenizer
    from tests.helpers import ScriptedPolicy

    tok = tiny_tokenizer()
    text = "The earth is round. Paris is in France. The end."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    split = [tok.convert_tokens_to_ids(c) for c in tok.convert_ids_to_tokens(ids[0])]  # characters of token 0
    script = split + ids[1:]
    assert script != ids and tok.decode(script) == text
    policy = ScriptedPolicy(tok, script)
    rm_model = _reward_on_policy_backbone(policy.model)
    shared = SharedHeadReward(policy, rm_model.score, 1)
    res = guided_generate(policy, {"r": shared}, PROMPT, strategy="step_best_of_n", num_candidates=2,
                          max_new_tokens=64, seed=0)
    assert res.token_ids == script and res.text == text and len(res.steps) >= 2
    worst = max(abs(c.scores["r"] - plain_score(rm_model, tok, PROMPT, response_text_of(res, tok, s, i)))
                for s, st in enumerate(res.steps) for i, c in enumerate(st.candidates))
    assert worst <= TOL, worst
    # the cut rows forward more than the suffix: their whole text from the common prefix
    assert res.stats.prm_tokens > 2 * sum(len(st.candidates) for st in res.steps)


def test_a_classifier_with_more_outputs_needs_them_named():
    model, tok = tiny_reward(seed=9, num_labels=3)
    with pytest.raises(ValueError, match="name its outputs"):
        SequenceClassifierReward(model, tok)


def test_value_head_files_of_the_wrong_layout_are_refused():
    with pytest.raises(ValueError, match="expected a linear head"):
        value_head_from({"w": torch.zeros(1, 64)}, 64)
    with pytest.raises(ValueError, match="shape"):
        value_head_from({"weight": torch.zeros(1, 32)}, 64)
    linear = value_head_from({"weight": torch.ones(1, 64), "bias": torch.ones(1)}, 64)
    assert float(linear(torch.ones(1, 64))[0, 0]) == 65.0
