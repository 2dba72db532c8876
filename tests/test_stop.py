"""Stop strings (OpenAI's ``stop``) as users meet them: the library, the CLI and the server.

A scripted policy (every candidate writes the same known text) makes the cut exact in every
strategy: a stop string inside a step, across a step boundary (the cut reaches back into the
accepted beam), inside a token (the token is kept, its text is cut), several stop strings (the
first match wins). A random tiny policy checks that a stop string that never occurs changes
nothing, and the CLI's ``sampling.stop``.
"""

import json
import re

import pytest

from mahalo import decode, guided_generate
from mahalo.app.tiny import tiny_policy, tiny_tokenizer
from mahalo.config import config_from_options
from mahalo.engine.controller import Controller
from mahalo.engine.scheduler import Engine
from mahalo.rewards import as_reward
from mahalo.stops import find_stop, safe_length
from tests.helpers import ScriptedPolicy

SCRIPT = "Water boils at 100 degrees. The end.\n\nQ: next"
ANSWER = "Water boils at 100 degrees. The end."  # SCRIPT before "\n\n"
STRATEGIES = ["sample", "best_of_n", "step_best_of_n", "step_beam", "dvts"]
SHAPE = dict(num_candidates=2, beam_width=2, max_new_tokens=40, step="max_tokens", min_step_tokens=0)


def longer(prompt: str, response: str) -> float:
    return float(len(response))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scripted(tok):
    return ScriptedPolicy(tok, tok(SCRIPT, add_special_tokens=False)["input_ids"])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _run(policy, **options):
    return guided_generate(policy, {"longer": longer}, "Does water boil?", **{**SHAPE, **options})


# -- the library -------------------------------------------------------------------------

def test_the_script_tokenises_as_these_tests_assume(tok):
    pieces = [tok.decode([i]) for i in _ids(tok, SCRIPT)]
    assert pieces[19:23] == [" end", ".", "\n", "\n"] and len(_ids(tok, ANSWER)) == 21


@pytest.mark.parametrize("step_tokens", [4, 11])  # 11: the first "\n" ends a step, the second starts the next
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_ends_at_the_stop_string_and_cuts_it(scripted, tok, strategy, step_tokens):
    r = _run(scripted, strategy=strategy, max_step_tokens=step_tokens, stop=["\n\n"])
    assert r.text == ANSWER and r.stop_reason == "stop"
    assert r.token_ids == _ids(tok, ANSWER) and r.stats.response_tokens == 21
    ended = [c for step in r.steps for c in step.candidates if c.end == "stop"]
    assert ended and all("\n\n" not in c.text for step in r.steps for c in step.candidates)
    if strategy not in ("sample", "best_of_n") and step_tokens == 11:  # the cut reached into the kept step
        assert r.steps[-1].candidates[0].text == "" and r.steps[-1].candidates[0].token_ids == []


def test_a_stop_string_inside_a_token_keeps_the_token_and_cuts_its_text(scripted, tok):
    r = _run(scripted, strategy="step_best_of_n", max_step_tokens=4, stop=["d."])
    assert r.text == "Water boils at 100 degrees. The en" and r.stop_reason == "stop"
    assert r.token_ids == _ids(tok, ANSWER)[:20]  # ..." end": the token that straddles the cut stays
    assert tok.decode(r.token_ids).startswith(r.text)


def test_the_first_of_several_stop_strings_wins_even_across_tokens(scripted):
    r = _run(scripted, strategy="sample", stop=["Q:", "s. T", "end"])  # "s. T" spans four tokens
    assert r.text == "Water boils at 100 degree" and r.stop_reason == "stop"


def test_a_stop_string_that_never_occurs_changes_nothing():
    policy = tiny_policy()
    rewards = {"longer": longer}
    for strategy in STRATEGIES:
        opts = dict(SHAPE, strategy=strategy, max_step_tokens=5, max_new_tokens=20, seed=3)
        plain = guided_generate(policy, rewards, "Is the earth flat?", **opts)
        never = guided_generate(policy, rewards, "Is the earth flat?", stop=["\x00never\x00"], **opts)
        assert (never.text, never.token_ids, never.stop_reason) == (plain.text, plain.token_ids, plain.stop_reason)
        assert never.steps == plain.steps


@pytest.mark.parametrize("stop, message", [
    ([""], "non-empty strings"), (["a", "b", "c", "d", "e"], "at most 4"), ([3], "non-empty strings"),
])
def test_bad_stop_strings_are_refused(stop, message):
    with pytest.raises(ValueError, match=message):
        config_from_options(None, stop=stop)


def test_a_single_string_is_a_list_of_one():
    assert config_from_options(None, stop="\n\n").sampling.stop == ["\n\n"]


def test_the_checks_only_look_at_new_text_and_hold_back_what_may_become_a_stop():
    assert find_stop("abc", "de", 0, ["cd"]) == -1  # starts in the beam's text
    assert find_stop("abc", "dexy", 2, ["cd"]) is None  # already checked up to "de"
    assert find_stop("", "xxaby", 3, ["ab", "by"]) == 2  # the earliest start wins
    assert find_stop("zxab", "c", 0, ["ab", "xabc"]) == -3  # "ab" ended in text checked before
    assert safe_length("The end.\n", ["\n\n"]) == len("The end.")
    assert safe_length("The end.\n\nQ", ["\n\nQ:"]) == len("The end.")
    assert safe_length("The end.", ["\n\n"]) == len("The end.") and safe_length("abc", []) == 3


# -- the command line -------------------------------------------------------------------

def test_the_cli_takes_sampling_stop(tmp_path, capsys):
    out = tmp_path / "plain.jsonl"
    args = ["models=tiny", "prompt=hello", "search.max_new_tokens=24", "search.seed=2"]
    assert decode.main([*args, f"output={out}"]) == 0
    text = json.loads(out.read_text())["text"]
    at, stop = next((m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{2}", text)
                    if m.start() >= 3 and text.index(m.group()) == m.start())  # its first occurrence
    cut = tmp_path / "stop.jsonl"
    assert decode.main([*args, f"sampling.stop=['{stop}']", f"output={cut}"]) == 0
    record = json.loads(cut.read_text())
    assert record["text"] == text[:at] and record["stop_reason"] == "stop"
    assert record["config"]["sampling"]["stop"] == [stop]
    capsys.readouterr()
    assert decode.main([*args, "sampling.stop=['']"]) == 2
    assert "stop must be a string or a list of at most 4 non-empty strings" in capsys.readouterr().err


# -- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(scripted):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from mahalo.app.config import ServerConfig
    from mahalo.app.server import Server
    from tests.test_serve import Running

    cfg = config_from_options(None, **{**SHAPE, "strategy": "step_best_of_n", "max_step_tokens": 4,
                                       "weights": {"longer": 1.0}})
    engine = Engine(Controller(scripted, {"longer": as_reward(longer, "longer")}, cfg), max_prompts=8)
    running = Running(Server(engine, cfg, ["longer"], ServerConfig(max_tokens_cap=64), "scripted"))
    yield running.client()
    running.stop()


def _ask(client, stream=False, **kwargs):
    return client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Does water boil?"}],
                                          stream=stream, **kwargs)


def _streamed(client, **kwargs):
    chunks = list(_ask(client, stream=True, **kwargs))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return deltas, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_server_cuts_at_stop_streamed_or_not(served, strategy):
    opts = dict(stop=["\n\n", "Q:"], extra_body={"mahalo": {"strategy": strategy, "max_step_tokens": 11}})
    r = _ask(served, **opts)
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 21
    deltas, finish = _streamed(served, **opts)
    assert "".join(deltas) == ANSWER and finish == "stop"


def test_a_stream_holds_back_text_that_may_start_a_stop_string(served):
    """Step one ends with the first "\\n" of "\\n\\n": sent at once, it could never be taken back."""
    mahalo = {"mahalo": {"strategy": "step_best_of_n", "max_step_tokens": 11}}
    deltas, finish = _streamed(served, stop="\n\n", extra_body=mahalo)
    assert "".join(deltas) == ANSWER and len(deltas) >= 2 and finish == "stop"
    assert all("\n" not in d for d in deltas)
    plain, _ = _streamed(served, extra_body=mahalo)  # without stop the same steps stream as they are
    assert "".join(plain).startswith(ANSWER + "\n\n")


@pytest.mark.parametrize("stop", ["", [""], ["a", "b", "c", "d", "e"], 5, [None]])
def test_the_server_refuses_bad_stop_with_400(served, stop):
    with pytest.raises(pytest.importorskip("openai").BadRequestError) as err:
        _ask(served, stop=stop)
    body = err.value.body["error"] if "error" in err.value.body else err.value.body
    assert err.value.status_code == 400 and body["param"] == "stop" and "at most 4" in body["message"]


def test_greedy_on_a_search_of_several_candidates_samples_and_says_so(served):
    """lm-eval sends temperature 0: a guided search samples at the server's temperature instead."""
    r = _ask(served, temperature=0, stop="\n\n", extra_body={"mahalo": {"strategy": "step_beam"}})
    notes = r.model_extra["mahalo"]["notes"]
    assert r.choices[0].message.content == ANSWER and len(notes) == 1 and "sampled at temperature 1.0" in notes[0]
    plain = _ask(served, temperature=0, extra_body={"mahalo": {"strategy": "sample"}})  # one candidate: greedy as asked
    assert "notes" not in plain.model_extra["mahalo"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("strategy", ["sample", "best_of_n", "step_beam"])
def test_logprobs_cover_exactly_the_tokens_left_after_the_stop_cut(served, tok, strategy, stream):
    """A stop cut trims the returned tokens, and the logprobs with them (one per kept token)."""
    opts = dict(stop=["\n\n", "Q:"], logprobs=True, extra_body={"mahalo": {"strategy": strategy, "max_step_tokens": 11}})
    if stream:
        chunks = list(_ask(served, stream=True, **opts))
        content = [c for c in chunks if c.choices and c.choices[0].logprobs is not None][-1].choices[0].logprobs.content
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = _ask(served, **opts)
        content, text = r.choices[0].logprobs.content, r.choices[0].message.content
    assert text == ANSWER
    assert [e.token for e in content] == [tok.decode([i]) for i in _ids(tok, ANSWER)]
    assert all(e.logprob <= 0 for e in content)
