"""Early rejection ranked by a separate reward model (``search.prune_by`` naming a sequence
classifier): checked against Speculative Rejection replayed on plain transformers forwards of the
tiny ``LlamaForSequenceClassification``, one forward per partial candidate."""

import json
import math

import pytest
import torch

from mahalo import decode, guided_generate, guided_generate_many
from mahalo.app.tiny import tiny_policy, tiny_reward
from mahalo.rewards import SequenceClassifierReward
from tests.helpers import carried_beams, in_flight, plain_score, response_text_of
from tests.test_faults import RaisingModel

PROMPT = [{"role": "user", "content": "Where is the capital of France?"}]
COMMON = dict(strategy="best_of_n", num_candidates=8, max_new_tokens=24, seed=0, weights={"truth": 1.0})


def chat_ids(tokenizer, messages, response: str | None) -> list[int]:
    """The reward model's input as a user builds it: the chat template with the response as the
    assistant turn (None: the prompt with the generation prompt, what it reads before any response)."""
    if response is None:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    return list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                              tokenize=True)["input_ids"])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def forwarded(tokenizer, messages, text: str) -> int:
    """Tokens an incremental reward model forwards for ``text`` after the prompt it prefilled
    (at least the last one, which it reads)."""
    ids = chat_ids(tokenizer, messages, text)
    return len(ids) - min(common_prefix(chat_ids(tokenizer, messages, None), ids), len(ids) - 1)


def replay(reward, messages, cands, every: int, keep: float, off: int = 0):
    """Speculative Rejection on plain forwards: ``cands`` are an unpruned best_of_n step's
    candidates (same seed: a row draws the same tokens whoever its neighbours are). Every ``every``
    tokens, each candidate still decoding is scored on the text of the tokens it has drawn (``off``:
    that many fewer, to show the test notices), one that ended on its whole response (once: it no
    longer changes); the best ``ceil(keep * n)`` and the best one are kept, and the others still
    decoding are ended.

    Returns (the surviving candidates' indices, what was scored: (candidate, response tokens
    scored, still decoding) each)."""
    model, tok = reward
    ended_at = [len(c.token_ids) + (c.end == "eos") for c in cands]  # the tick that drew its last token
    alive, final, scored = list(range(len(cands))), {}, []
    for t in range(1, max(ended_at) + 1):
        decoding = [ended_at[r] > t for r in alive]
        if t % every or not any(decoding):
            continue
        score = []
        for r, live in zip(alive, decoding):
            if live or r not in final:
                n = t - off if live else len(cands[r].token_ids)
                value = plain_score(model, tok, messages, tok.decode(cands[r].token_ids[:n], skip_special_tokens=True))
                scored.append((r, n, live))
                if not live:
                    final[r] = value
            score.append(value if live else final[r])
        order = sorted(range(len(alive)), key=lambda i: (-score[i], i))
        kept = set(order[:math.ceil(keep * len(alive))]) | {order[0]}
        alive = [r for i, r in enumerate(alive) if i in kept or not decoding[i]]
    return alive, scored


def separate_cost(reward, messages, cands, scored) -> int:
    """Tokens a separate reward model forwards for what ``replay`` scored."""
    tok = reward[1]
    return sum(forwarded(tok, messages, tok.decode(cands[r].token_ids[:n], skip_special_tokens=True))
               for r, n, _ in scored)


def step_cost(reward, messages, cands) -> int:
    """Tokens the step-end scoring of ``cands`` forwards after the prompt's prefill."""
    tok = reward[1]
    return sum(forwarded(tok, messages, tok.decode(c.token_ids, skip_special_tokens=True)) for c in cands)


@pytest.fixture(scope="module")
def unpruned(policy, reward):
    return guided_generate(policy, {"truth": reward}, PROMPT, **COMMON)


CASES = [(3, 0.5), (5, 0.7)]  # (3, 0.5) keeps other rows when scored a token short; (5, 0.7) ranks an ended row


@pytest.mark.parametrize("every,keep", CASES)
def test_pruning_by_a_reward_model_is_speculative_rejection_on_plain_forwards(policy, reward, unpruned, every, keep):
    pruned = guided_generate(policy, {"truth": reward}, PROMPT, prune=True, prune_by="truth", prune_every=every,
                             prune_keep=keep, **COMMON)
    cands = unpruned.steps[0].candidates
    alive, scored = replay(reward, PROMPT, cands, every, keep)
    cost = separate_cost(reward, PROMPT, cands, scored)
    assert 1 <= len(alive) < len(cands)
    # the survivors and the pruned rows
    assert [c.token_ids for c in pruned.steps[0].candidates] == [cands[r].token_ids for r in alive]
    assert pruned.stats.pruned_rows == len(cands) - len(alive)
    # the step-end scores are the reward model's on the whole responses: its state is untouched
    tok = reward[1]
    for c in pruned.steps[0].candidates:
        want = plain_score(reward[0], tok, PROMPT, tok.decode(c.token_ids, skip_special_tokens=True))
        assert c.scores["truth"] == pytest.approx(want, abs=1e-5)
    # the answer, and its score as a plain forward of the final answer gives it
    best = max(alive, key=lambda r: (cands[r].scores["truth"], -r))
    assert pruned.token_ids == cands[best].token_ids
    assert pruned.scores["truth"] == pytest.approx(plain_score(reward[0], tok, PROMPT, pruned.text), abs=1e-5)
    # what the pruning cost: exactly the replay's forwarded tokens, billed in prm_tokens too
    assert pruned.stats.prune_prm_tokens == cost > 0
    prefill = len(chat_ids(tok, PROMPT, None))
    assert pruned.stats.prm_tokens == prefill + step_cost(reward, PROMPT, pruned.steps[0].candidates) + cost
    assert unpruned.stats.prune_prm_tokens == 0
    assert unpruned.stats.prm_tokens == prefill + step_cost(reward, PROMPT, cands)
    assert pruned.stats.policy_tokens < unpruned.stats.policy_tokens


def test_the_replay_notices_a_partial_scored_one_token_off(reward, unpruned):
    """The parity above would fail if the engine scored each partial candidate one token short:
    the replay scoring so keeps other candidates, and forwards other tokens."""
    cands = unpruned.steps[0].candidates
    right, short = (replay(reward, PROMPT, cands, *CASES[0], off=off) for off in (0, 1))
    assert right[0] != short[0]
    for every, keep in CASES:
        costs = [separate_cost(reward, PROMPT, cands, replay(reward, PROMPT, cands, every, keep, off=off)[1])
                 for off in (0, 1)]
        assert costs[0] != costs[1]


def test_an_ended_candidate_is_ranked_by_its_whole_response(reward, unpruned):
    """A replayed pruning ranks a candidate that ended (end of turn) among those still decoding,
    so the parity test covers the ended-row rule."""
    assert [live for _, _, live in replay(reward, PROMPT, unpruned.steps[0].candidates, *CASES[1])[1]].count(False) == 1


STEP_BEAM = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=24, step="sentence",
                 min_step_tokens=2, weights={"truth": 1.0}, prune=True, prune_by="truth", prune_every=2,
                 prune_keep=0.3)
QUESTIONS = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(4)]


def test_pruned_step_beam_scores_every_candidate_as_a_plain_forward_and_is_batch_invariant(policy, reward):
    rewards = {"truth": reward}
    alone = [guided_generate(policy, rewards, p, seed=7, **STEP_BEAM) for p in QUESTIONS]
    assert any(r.stats.pruned_rows for r in alone)
    assert all(r.stats.prune_prm_tokens > 0 and r.stats.prm_tokens > r.stats.prune_prm_tokens for r in alone)
    tok = reward[1]
    for p, r in zip(QUESTIONS, alone):  # every step's scores: the prompt's state is as if no pruning scored
        for s, step in enumerate(r.steps):
            for c, cand in enumerate(step.candidates):
                want = plain_score(reward[0], tok, p, response_text_of(r, tok, s, c))
                assert cand.scores["truth"] == pytest.approx(want, abs=1e-5)
        for parents, carried in carried_beams(r):  # every beam carried on keeps a candidate
            assert parents == carried
    for together in in_flight(policy, rewards, QUESTIONS, seed=7, **STEP_BEAM):
        for i, r in enumerate(alone):
            assert together[i].token_ids == r.token_ids
            assert together[i].stats.pruned_rows == r.stats.pruned_rows
            assert together[i].stats.prune_prm_tokens == r.stats.prune_prm_tokens
            assert together[i].scores["truth"] == pytest.approx(r.scores["truth"], abs=1e-5)


def test_a_reward_model_that_fails_while_pruning_fails_only_its_prompt(policy, reward):
    """The reward model raises (as a CUDA assert would) for one prompt; pruning scores before any
    step ends (every 2 tokens), so the first fault comes at a pruning, in a batch with the others:
    that prompt fails, the others decode exactly what they decode without it."""
    raising = RaisingModel(SequenceClassifierReward(*reward))
    opts = {**STEP_BEAM, "min_step_tokens": 4}
    prompts = QUESTIONS[:2] + [[{"role": "user", "content": "BOOM: what is 2 plus 2?"}]] + QUESTIONS[2:]
    out = dict(guided_generate_many(policy, {"truth": raising}, prompts, max_prompts=5, seed=7, errors="return",
                                    **opts))
    assert isinstance(out[2], ValueError) and "CUDA error" in str(out[2])
    for i, p in zip([0, 1, 3, 4], QUESTIONS):
        alone = guided_generate(policy, {"truth": reward}, p, seed=7, **opts)
        assert out[i].token_ids == alone.token_ids and out[i].stats.pruned_rows == alone.stats.pruned_rows


class NoMerge:
    """A reward model that can only score on its own state (no ``merge``)."""

    def __init__(self, inner: SequenceClassifierReward) -> None:
        self.inner = inner

    def start(self):
        return self.inner.start()

    def add(self, state, prompts):
        self.inner.add(state, prompts)

    def score(self, state, candidates):
        return self.inner.score(state, candidates)

    def keep(self, state, rows):
        self.inner.keep(state, rows)


def test_a_reward_model_without_merge_cannot_prune(policy, reward):
    with pytest.raises(ValueError) as err:
        guided_generate(policy, {"truth": NoMerge(SequenceClassifierReward(*reward))}, PROMPT, prune=True,
                        prune_by="truth", **COMMON)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("search.prune_by='truth' cannot score partial candidates without changing its state (its NoMerge "
                   "has no merge): prune by a probe (family: probe) or by a reward model with merge")
    with pytest.raises(ValueError, match=r"prune_by='nope' is not a loaded objective \(known: \['truth'\]\)"):
        guided_generate(policy, {"truth": reward}, PROMPT, prune=True, prune_by="nope", **COMMON)


def shared_forwarded(tok, messages, prompt_ids: list[int], response: list[int], held: int) -> int:
    """Tokens a head on the policy's backbone forwards for a candidate whose policy row holds the
    prompt and ``held`` of its ``response`` tokens: its conversation's ids past what the row holds
    (at least the last one, which it reads)."""
    ids = chat_ids(tok, messages, tok.decode(response, skip_special_tokens=True))
    return len(ids) - min(common_prefix(prompt_ids + response[:held], ids), len(ids) - 1)


@pytest.mark.parametrize("every,keep", CASES)
def test_a_head_on_the_policy_backbone_prunes_as_the_separate_model_does(every, keep):
    """The truth head on the policy's own backbone (``share_backbone``) ranks partial candidates by
    forwarding their scoring suffixes through the policy: the same survivors, answer and scores as
    the same weights loaded as a separate reward model (itself the replay above), the policy's
    decode untouched, and only the suffixes billed."""
    from mahalo.policy import HFPolicy
    from mahalo.rewards.shared_head import SharedHeadReward
    from tests.test_reward_families import _reward_on_policy_backbone

    model, tok = tiny_policy()
    rm = _reward_on_policy_backbone(model)
    opts = dict(prune=True, prune_by="truth", prune_every=every, prune_keep=keep, **COMMON)
    shared = guided_generate((model, tok), {"truth": SharedHeadReward(HFPolicy(model, tok), rm.score, 1)}, PROMPT,
                             **opts)
    separate = guided_generate((model, tok), {"truth": (rm, tok)}, PROMPT, **opts)
    unpruned = guided_generate((model, tok), {"truth": (rm, tok)}, PROMPT, **COMMON)
    cands = unpruned.steps[0].candidates
    alive, scored = replay((rm, tok), PROMPT, cands, every, keep)
    assert 1 <= len(alive) < len(cands)
    for res in (shared, separate):
        assert [c.token_ids for c in res.steps[0].candidates] == [cands[r].token_ids for r in alive]
        assert res.stats.pruned_rows == len(cands) - len(alive)
        assert res.scores["truth"] == pytest.approx(plain_score(rm, tok, PROMPT, res.text), abs=1e-5)
    assert shared.token_ids == separate.token_ids
    assert shared.stats.policy_tokens == separate.stats.policy_tokens
    # billed: at each pruning, each candidate's ids past what its policy row holds (the token drawn
    # at that tick is not fed yet; an ended row, scored once, holds what it fed)
    prompt_ids = chat_ids(tok, PROMPT, None)
    cost = sum(shared_forwarded(tok, PROMPT, prompt_ids, cands[r].token_ids[:n],
                                n - 1 if live else n - (cands[r].end == "length")) for r, n, live in scored)
    assert shared.stats.prune_prm_tokens == cost
    assert shared.stats.prune_prm_tokens < separate.stats.prune_prm_tokens


def test_a_pruned_step_beam_by_a_head_on_the_policy_backbone_is_the_separate_models(policy):
    """Step beam (rows that end a step wait while others decode, beams with their own rows):
    pruned by the head on the policy's backbone, each prompt decodes what it decodes pruned by the
    same weights as a separate model, alone or four in flight."""
    from mahalo.policy import HFPolicy
    from mahalo.rewards.shared_head import SharedHeadReward
    from tests.test_reward_families import _reward_on_policy_backbone

    model, tok = policy
    rm = _reward_on_policy_backbone(model)
    shared = {"truth": SharedHeadReward(HFPolicy(model, tok), rm.score, 1)}
    separate = [guided_generate(policy, {"truth": (rm, tok)}, p, seed=7, **STEP_BEAM) for p in QUESTIONS]
    assert any(r.stats.pruned_rows for r in separate)
    together = dict(guided_generate_many(policy, shared, QUESTIONS, max_prompts=4, seed=7, **STEP_BEAM))
    for i, want in enumerate(separate):
        alone = guided_generate(policy, shared, QUESTIONS[i], seed=7, **STEP_BEAM)
        for got in (alone, together[i]):
            assert got.token_ids == want.token_ids and got.stats.pruned_rows == want.stats.pruned_rows
            for a, b in zip(got.steps, want.steps, strict=True):
                assert [x.token_ids for x in a.candidates] == [y.token_ids for y in b.candidates]
                assert [x.scores["truth"] for x in a.candidates] == pytest.approx(
                    [y.scores["truth"] for y in b.candidates], abs=1e-5)


def test_cli_prunes_by_the_truth_reward_model(tmp_path, capsys):
    """``search.prune_by=truth`` on the tiny models from the command line: the reward model ranks
    partial candidates and the record bills it."""
    out = tmp_path / "out.jsonl"
    assert decode.main(["models=tiny", "+objective=truth", "prompt=Is the sky green?", f"output={out}",
                        "search=best_of_n", "search.num_candidates=6", "search.max_new_tokens=16",
                        "search.prune=true", "search.prune_by=truth", "search.prune_every=4"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec.get("error") is None and rec["text"]
    assert rec["stats"]["pruned_rows"] > 0
    assert 0 < rec["stats"]["prune_prm_tokens"] < rec["stats"]["prm_tokens"]


def test_cli_refuses_a_missing_prune_objective_in_one_line(tmp_path, capsys):
    code = decode.main(["models=tiny", "+objective=truth", "prompt=Is the sky green?", f"output={tmp_path / 'o.jsonl'}",
                        "search.prune=true", "search.prune_by=helpfulness"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "search.prune_by='helpfulness' is not a loaded objective" in err
