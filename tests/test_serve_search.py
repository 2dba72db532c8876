"""Streaming, ``n`` and ``logprobs`` of every search, as an OpenAI client meets them: the real
``openai`` client against the served app (tiny models, an engine built in the test)."""

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mahalo.app.config import ServerConfig  # noqa: E402
from mahalo.app.server import Server  # noqa: E402
from mahalo.app.tiny import tiny_policy, tiny_reward  # noqa: E402
from mahalo.config import config_from_options  # noqa: E402
from mahalo.engine.controller import Controller, stable_text  # noqa: E402
from mahalo.engine.scheduler import Engine  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402
from tests.helpers import full_logprobs, prompt_ids  # noqa: E402
from tests.test_serve import Running, _error_param  # noqa: E402

DEFAULTS = dict(strategy="step_best_of_n", num_candidates=3, max_new_tokens=24, step="max_tokens",
                min_step_tokens=0, max_step_tokens=6, weights={"truth": 1.0})
QUESTION = "Is the earth flat?"
STRATEGIES = {
    "sample": {"strategy": "sample"},
    "best_of_n": {"strategy": "best_of_n", "num_candidates": 3},
    "step_best_of_n": {"strategy": "step_best_of_n", "num_candidates": 3},
    "step_beam": {"strategy": "step_beam", "num_candidates": 3, "beam_width": 2},
    "dvts": {"strategy": "dvts", "num_candidates": 2, "beam_width": 3},
}


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_policy()
    cfg = config_from_options(None, **DEFAULTS)
    controller = Controller(as_policy((model, tokenizer)), {"truth": as_reward(tiny_reward(seed=1), "truth")}, cfg)
    running = Running(Server(Engine(controller, max_prompts=8), cfg, ["truth"], ServerConfig(max_tokens_cap=64),
                             "tiny"))
    running.model = model
    yield running
    running.stop()


def _ask(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], **kwargs)


def _deltas(chunks) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("seed", [3, 11])
def test_streamed_deltas_concatenate_to_the_final_text(served, strategy, seed):
    client = served.client()
    opts = dict(max_tokens=24, seed=seed, extra_body={"mahalo": STRATEGIES[strategy]})
    plain = _ask(client, **opts).choices[0].message.content
    chunks = list(_ask(client, stream=True, **opts))
    deltas = _deltas(chunks)
    assert "".join(deltas) == plain
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    if strategy == "sample":  # token by token (a partial character waits for the next token)
        assert len(deltas) >= 3
    if strategy == "best_of_n":  # its candidates differ from the first token: the answer comes at the end
        assert len(deltas) == 1


def test_a_step_beam_streams_the_prefix_its_beams_share_before_its_last_chunk(served):
    # top_k=1: every candidate of a step is the same, so the beams (kept once: dedupe) share every
    # step; each step's text is final as soon as it is selected, long before the search ends.
    client = served.client()
    opts = dict(max_tokens=24, seed=5, extra_body={"mahalo": {"strategy": "step_beam", "beam_width": 2, "top_k": 1}})
    plain = _ask(client, **opts).choices[0].message.content
    chunks = list(_ask(client, stream=True, **opts))
    deltas = _deltas(chunks)
    assert "".join(deltas) == plain and len(deltas) >= 3
    first = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    assert deltas[0] and plain.startswith(deltas[0]) and first < len(chunks) - 2  # not the last text chunk


def test_a_step_beam_whose_beams_diverge_streams_only_what_they_share(served):
    # The engine reports the common prefix of the surviving beams and the finished pool: watch a
    # step beam through the library's on_step and check each report against the beams it had.
    engine = served.server.engine
    plan = engine.plan(config_from_options(engine.controller.cfg, strategy="step_beam", beam_width=2,
                                           num_candidates=3, seed=2))
    seen = []
    result = engine.submit(QUESTION, plan, on_step=seen.append).result(timeout=120)
    assert seen and all(result.text.startswith(text) for text in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    steps = result.steps
    kept = [[c for i, c in enumerate(step.candidates) if i in step.chosen] for step in steps]
    assert any(len({c.text for c in k}) > 1 for k in kept)  # the beams differed at some step


def test_stable_text_holds_back_what_more_tokens_can_change():
    assert stable_text("caf\ufffd") == "caf"  # an incomplete character
    assert stable_text("do n", cleans_spaces=True) == "do"  # "do n" + "'t" decodes to "don't"
    assert stable_text("a.", cleans_spaces=True) == "a."
    assert stable_text("a b", cleans_spaces=False) == "a b"


@pytest.mark.parametrize("mahalo, n", [
    ({"strategy": "best_of_n", "num_candidates": 4, "normalize": "none"}, 3),
    ({"strategy": "step_beam", "num_candidates": 3, "beam_width": 3, "normalize": "none"}, 2),
    ({"strategy": "dvts", "num_candidates": 2, "beam_width": 3, "normalize": "none"}, 3),
])
def test_n_returns_the_best_distinct_finished_responses_ranked(served, mahalo, n):
    client = served.client()
    opts = dict(max_tokens=20, seed=7, extra_body={"mahalo": mahalo})
    one = _ask(client, **opts)
    r = _ask(client, n=n, **opts)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == list(range(n)) and len(set(texts)) == n
    assert texts[0] == one.choices[0].message.content  # the answer comes first
    ranked = r.model_extra["mahalo"]["choices"]
    scores = [c["scores"]["truth"] for c in ranked]
    assert scores == sorted(scores, reverse=True)  # normalize=none: the final rule is the raw score
    assert [c["score"] for c in ranked] == pytest.approx(scores)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    # streamed: each choice index gets its own text
    chunks = list(_ask(client, n=n, stream=True, **opts))
    by_index = {}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert [by_index[i] for i in range(n)] == texts


@pytest.mark.parametrize("mahalo, n", [
    ({"strategy": "best_of_n", "num_candidates": 2}, 3),
    ({"strategy": "step_beam", "num_candidates": 4, "beam_width": 2}, 3),
    ({"strategy": "sample"}, 2),
    ({}, 2),  # step_best_of_n keeps one answer
])
def test_n_above_what_the_search_holds_is_400_before_decoding(served, mahalo, n):
    before = served.server.engine.controller.admitted
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            _ask(served.client(), n=n, stream=stream, max_tokens=8, extra_body={"mahalo": mahalo})
        assert err.value.status_code == 400 and _error_param(err.value) == "n"
        assert f"n={n}" in str(err.value) and "at most" in str(err.value)
    assert served.server.engine.controller.admitted == before  # nothing was decoded


def test_fewer_distinct_responses_than_n_is_400_naming_both(served):
    # top_k=1: all four candidates are the same response, so the pool holds one distinct answer
    opts = dict(n=2, max_tokens=8, seed=1, extra_body={"mahalo": {"strategy": "best_of_n", "num_candidates": 4,
                                                                  "top_k": 1}})
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            _ask(served.client(), stream=stream, **opts)
        assert err.value.status_code == 400 and _error_param(err.value) == "n"
        assert "n=2" in str(err.value) and "with 1 distinct" in str(err.value)


@pytest.mark.parametrize("strategy", ["sample", "step_beam", "best_of_n"])
def test_logprobs_are_the_policys_over_the_returned_tokens(served, strategy):
    client = served.client()
    mahalo = STRATEGIES[strategy]
    opts = dict(max_tokens=16, seed=9, extra_body={"mahalo": mahalo})
    r = _ask(client, logprobs=True, **opts)
    content = r.choices[0].logprobs.content
    # the same request through the same engine, for its token ids (a request gets the same answer alone)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "seed": 9, "mahalo": mahalo}
    result = served.server.engine.submit(served.server.parse(body).prompt).result(timeout=120)
    assert result.text == r.choices[0].message.content
    tokenizer = served.server.engine.tokenizer
    assert len(content) == len(result.token_ids) > 0
    for item, token in zip(content, result.token_ids):
        assert item.token == tokenizer.decode([token]) and item.bytes == list(item.token.encode())
        assert item.top_logprobs == []
    ids = prompt_ids(tokenizer, QUESTION)
    reference = full_logprobs(served.model, ids + result.token_ids)  # (P + T, V), fp32
    expected = [float(reference[len(ids) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    assert [item.logprob for item in content] == pytest.approx(expected, abs=1e-4)
    # streamed: the same logprobs, on the last chunk
    chunks = list(_ask(client, logprobs=True, stream=True, **opts))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs
                for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


def test_logprobs_off_by_default_and_top_logprobs_refused(served):
    client = served.client()
    assert _ask(client, max_tokens=4, seed=1).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, max_tokens=4, logprobs=True, top_logprobs=2)
    assert _error_param(err.value) == "top_logprobs" and "not supported" in str(err.value)


@pytest.fixture(scope="module", params=[False, True], ids=["bpe", "cleans-spaces"])
def scripted(request):
    """A policy that answers ``do n't é x`` token by token, "é" split over two byte tokens; with
    ``cleans-spaces`` its decode cleans up spaces as WordPiece tokenizers do ("do n't" -> "don't")."""
    from tests.helpers import ScriptedPolicy

    tokenizer = tiny_policy()[1]
    script = [tokenizer.convert_tokens_to_ids(t) for t in ["d", "o", "Ġ", "n", "'", "t", "Ġ", "Ã", "©", "Ġ", "x"]]
    policy = ScriptedPolicy(tokenizer, script)
    if request.param:
        plain = policy.decode
        policy.decode = lambda ids: tokenizer.clean_up_tokenization(plain(ids))
    cfg = config_from_options(None, **{**DEFAULTS, "max_step_tokens": 4})
    controller = Controller(policy, {"truth": as_reward(lambda prompt, response: 0.0, "truth")}, cfg)
    running = Running(Server(Engine(controller), cfg, ["truth"], ServerConfig(max_tokens_cap=64), "tiny"))
    running.answer = "don't é x" if request.param else "do n't é x"
    yield running
    running.stop()


@pytest.mark.parametrize("strategy", ["sample", "step_beam", "dvts"])
def test_a_split_character_or_a_word_that_can_change_is_never_streamed_early(scripted, strategy):
    # steps of 4 tokens: "do n" | "'t Ã" (half of é) | "© x": each step's end can still change
    client = scripted.client()
    opts = dict(max_tokens=20, seed=1, extra_body={"mahalo": STRATEGIES[strategy]})
    plain = _ask(client, **opts).choices[0].message.content
    assert plain == scripted.answer
    deltas = _deltas(list(_ask(client, stream=True, **opts)))
    assert "".join(deltas) == plain and len(deltas) >= 2
    assert not any("\ufffd" in d for d in deltas)


def test_the_library_result_holds_the_ranked_pool(served):
    from mahalo import guided_generate

    model, tokenizer = tiny_policy()
    r = guided_generate((model, tokenizer), {"truth": tiny_reward(seed=1)}, QUESTION, strategy="best_of_n",
                        num_candidates=4, max_new_tokens=12, normalize="none", seed=3)
    assert r.pool[0].text == r.text and r.pool[0].token_ids == r.token_ids and r.pool[0].logprobs == r.logprobs
    assert len({a.text for a in r.pool}) == len(r.pool) >= 2
    assert [a.score for a in r.pool] == sorted((a.score for a in r.pool), reverse=True)
    assert all(len(a.logprobs) == len(a.token_ids) and a.scores.keys() == {"truth"} for a in r.pool)
