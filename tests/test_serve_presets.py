"""Guidance chosen by model name, as a tool that cannot send ``extra_body`` meets it: the real
``openai`` client against a server built the way ``python -m mahalo.serve`` builds it (the
``tiny`` models, no default objective)."""

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mahalo.app.compose import search_presets  # noqa: E402
from mahalo.serve import build_engine, build_server, compose_serve_config  # noqa: E402
from tests.test_serve import Running  # noqa: E402

PRESETS = ["mahalo-best-of-n", "mahalo-dvts", "mahalo-sample", "mahalo-step-beam", "mahalo-step-best-of-n",
           "mahalo-truth-beam"]
OVERRIDES = ["models=tiny", "server.objectives=[truth,helpful]", "server.model_name=tiny-served",
             "search.max_new_tokens=12", "step.kind=max_tokens", "step.min_step_tokens=0", "step.max_step_tokens=4"]


@pytest.fixture(scope="module")
def client():
    cfg = compose_serve_config(OVERRIDES)
    engine, objectives = build_engine(cfg)
    running = Running(build_server(cfg, engine, objectives))
    yield running.client()
    running.stop()


def _ask(client, model, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the earth flat?"}],
                                          seed=1, **kwargs)


def test_every_search_preset_is_a_model(client):
    assert search_presets().keys() == set(PRESETS)  # one per conf/search/*.yaml
    assert [m.id for m in client.models.list().data] == ["mahalo", *PRESETS]
    assert client.models.retrieve("mahalo-truth-beam").id == "mahalo-truth-beam"


@pytest.mark.parametrize("model", PRESETS)
def test_a_model_name_selects_its_preset_search(client, model):
    """The same answer as the preset's options sent in ``mahalo`` (what tools without extra_body lack)."""
    preset = search_presets()[model]
    r = _ask(client, model)
    assert r.model == model and r.model_extra["mahalo"]["strategy"] == preset["strategy"]
    shape = {k: preset[k] for k in ("strategy", "num_candidates", "beam_width")}
    by_field = _ask(client, "mahalo", extra_body={"mahalo": {**shape, "weights": {"truth": 1.0, "helpful": 1.0}}})
    assert r.choices[0].message.content == by_field.choices[0].message.content
    guided = set(r.model_extra["mahalo"]["scores"])
    assert guided == {"truth", "helpful"}  # no default objective: a preset reads every loaded one


def test_mahalo_is_the_configured_guidance_and_the_served_name_its_alias(client):
    mahalo, alias = _ask(client, "mahalo"), _ask(client, "tiny-served")
    assert mahalo.model == "mahalo" and alias.model == "tiny-served"
    assert mahalo.choices[0].message.content == alias.choices[0].message.content
    assert mahalo.model_extra["mahalo"]["strategy"] == "sample"  # no objective configured: unguided


def test_the_mahalo_field_overrides_the_model_preset(client):
    r = _ask(client, "mahalo-step-beam", extra_body={"mahalo": {"strategy": "best_of_n", "num_candidates": 2,
                                                                "weights": {"truth": 1.0}}})
    same = _ask(client, "mahalo", extra_body={"mahalo": {"strategy": "best_of_n", "num_candidates": 2,
                                                         "weights": {"truth": 1.0}}})
    assert r.model_extra["mahalo"]["strategy"] == "best_of_n" and set(r.model_extra["mahalo"]["scores"]) == {"truth"}
    assert r.choices[0].message.content == same.choices[0].message.content


def test_streamed_chunks_carry_the_model_asked_for(client):
    chunks = list(_ask(client, "mahalo-step-best-of-n", stream=True))
    assert chunks and {c.model for c in chunks} == {"mahalo-step-best-of-n"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _ask(client, "mahalo-step-best-of-n").choices[0].message.content


def test_an_unknown_model_is_404_naming_the_known_ones(client):
    for call in (lambda: _ask(client, "gpt-4o"), lambda: client.models.retrieve("gpt-4o")):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        body = err.value.body["error"] if "error" in err.value.body else err.value.body
        assert err.value.status_code == 404 and body["code"] == "model_not_found" and body["param"] == "model"
        assert body["type"] == "invalid_request_error"
        assert "'gpt-4o'" in body["message"] and all(name in body["message"] for name in ["mahalo", *PRESETS])
