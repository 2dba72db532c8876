"""The OpenAI-compatible server, as its users meet it: the real ``openai`` client against a
uvicorn server on 127.0.0.1 (tiny models, an engine built in the test), and the
``python -m mahalo.serve`` command in a subprocess."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from mahalo.app.compose import search_presets  # noqa: E402
from mahalo.app.config import ServerConfig  # noqa: E402
from mahalo.app.server import Server, create_app  # noqa: E402
from mahalo.app.tiny import tiny_policy, tiny_reward  # noqa: E402
from mahalo.config import config_from_options  # noqa: E402
from mahalo.engine.controller import Controller  # noqa: E402
from mahalo.engine.scheduler import Engine  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.rewards import as_reward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(strategy="step_best_of_n", num_candidates=3, max_new_tokens=24, step="max_tokens",
                min_step_tokens=0, max_step_tokens=6, weights={"truth": 1.0})
GATE = threading.Event()  # the "slow" objective waits on it for prompts that ask to wait
GATE.set()


def flaky(prompt: str, response: str) -> float:
    return float("nan") if "NaN" in prompt else 0.0


SLOW_CALLS = []


def slow(prompt: str, response: str) -> float:
    if "wait" in prompt:
        GATE.wait(30)
    if "slow" in prompt:
        SLOW_CALLS.append(prompt)
        time.sleep(0.15)
    return 0.0


class Running:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, server: Server) -> None:
        self.server = server
        config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = "none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(10)
        self.server.engine.close()


def _start(api_key=None, max_queue=64, max_prompts=16, system_prompt=None) -> Running:
    policy = tiny_policy()
    rewards = {"truth": tiny_reward(seed=1), "helpful": tiny_reward(seed=2), "flaky": flaky, "slow": slow}
    cfg = config_from_options(None, **DEFAULTS)
    controller = Controller(as_policy(policy), {k: as_reward(v, k) for k, v in rewards.items()}, cfg)
    engine = Engine(controller, max_prompts=max_prompts)
    server_cfg = ServerConfig(max_tokens_cap=64, max_queue=max_queue)
    return Running(Server(engine, cfg, list(rewards), server_cfg, "tiny", api_key, system_prompt))


@pytest.fixture(scope="module")
def running():
    r = _start()
    yield r
    r.stop()


def _http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of a plain HTTP request (no client library)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else None)


def _ask(client, content="Is the earth flat?", **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def test_a_plain_completion(running):
    r = _ask(running.client(), max_tokens=20, seed=1)
    assert r.object == "chat.completion" and r.model == "tiny"
    text = r.choices[0].message.content
    assert text and r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["mahalo"]
    assert set(extra["scores"]) == {"truth"} and extra["strategy"] == "step_best_of_n"
    assert extra["policy_tokens"] > 0 and extra["reward_tokens"] > 0
    steps = _ask(running.client(), max_tokens=20, seed=1, extra_body={"mahalo": {"return_steps": True}})
    assert steps.choices[0].message.content == text
    assert len(steps.model_extra["mahalo"]["steps"]) == extra["steps_taken"] >= 2
    got = steps.model_extra["mahalo"]
    path = got["answer_path"]  # the answer's candidate per step: their chunks spell the answer
    assert len(path) == len(got["steps"]) and "".join(st["candidates"][c]["text"] for st, c in zip(got["steps"], path)) == text


def test_a_configured_system_prompt_goes_first_when_a_request_has_none():
    """``system_prompt`` (e.g. ``+objective=truth``'s primer) is the system turn of requests without
    one; a request's own system turn is kept."""
    primer = "Answer in one short sentence."
    r = _start(system_prompt=primer)
    try:
        client = r.client()
        question = [{"role": "user", "content": "Is the earth flat?"}]

        def text(messages):
            out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, seed=3)
            return out.choices[0].message.content, out.usage.prompt_tokens

        configured = text(question)
        assert configured == text([{"role": "system", "content": primer}, *question])
        own = text([{"role": "system", "content": "You are terse."}, *question])
        assert own != configured
    finally:
        r.stop()
    plain = _start()
    try:
        out = plain.client().chat.completions.create(model="tiny", messages=question, max_tokens=16, seed=3)
        assert out.usage.prompt_tokens < configured[1]  # no system turn without the option
    finally:
        plain.stop()


def test_models_and_health(running):
    models = running.client().models.list()
    assert [m.id for m in models.data] == ["mahalo", *search_presets()]  # "tiny", the served name: mahalo's alias
    health = _http(running.url + "/health")[1]
    assert health["status"] == "ok" and set(health["objectives"]) == {"truth", "helpful", "flaky", "slow"}


def test_streamed_deltas_concatenate_to_the_answer_step_by_step(running):
    client = running.client()
    plain = _ask(client, max_tokens=30, seed=4).choices[0].message.content
    chunks = list(_ask(client, max_tokens=30, seed=4, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain
    assert len(deltas) >= 3  # one per accepted step, not one at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[0].choices[0].delta.role == "assistant"


def test_step_beam_streams_its_final_answer(running):
    client = running.client()
    opts = dict(max_tokens=24, seed=2, extra_body={"mahalo": {"strategy": "step_beam", "beam_width": 2}})
    plain = _ask(client, **opts).choices[0].message.content
    deltas = [c.choices[0].delta.content for c in _ask(client, stream=True, **opts)
              if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain and len(deltas) >= 1  # the prefix its beams share, then the rest


def test_per_request_weights_change_the_chosen_answer(running):
    client = running.client()
    by = {w: _ask(client, max_tokens=24, seed=0, extra_body={"mahalo": {"weights": {w: 1.0}}})
          for w in ("truth", "helpful")}
    assert by["truth"].choices[0].message.content != by["helpful"].choices[0].message.content
    assert set(by["helpful"].model_extra["mahalo"]["scores"]) == {"helpful"}
    both = _ask(client, max_tokens=24, seed=0, extra_body={"mahalo": {"weights": {"truth": 1.0, "helpful": 2.0},
                                                                      "normalize": "zscore"}})
    assert set(both.model_extra["mahalo"]["scores"]) == {"truth", "helpful"}


def _error_param(err) -> object:
    body = err.body if isinstance(err.body, dict) else {}
    return body["error"]["param"] if "error" in body else body.get("param")


@pytest.mark.parametrize("kwargs, param", [
    (dict(extra_body={"mahalo": {"weights": {"nope": 1.0}}}), "mahalo.weights"),
    (dict(n=2), "n"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=1000), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(extra_body={"mahalo": {"num_candidates": 0}}), "mahalo.num_candidates"),
    (dict(extra_body={"mahalo": {"strategy": "magic"}}), "mahalo.strategy"),
    (dict(extra_body={"mahalo": {"bogus": 1}}), "mahalo.bogus"),
    (dict(content="word " * 1200), "messages"),
])
def test_bad_requests_get_400_naming_the_field(running, kwargs, param):
    content = kwargs.pop("content", "Is the earth flat?")
    with pytest.raises(openai.BadRequestError) as err:
        _ask(running.client(), content=content, **kwargs)
    assert err.value.status_code == 400 and _error_param(err.value) == param, err.value.body


def test_malformed_json_gets_400(running):
    status, body = _http(running.url + "/v1/chat/completions", "POST", b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"]


def test_a_reward_fault_fails_its_request_only(running):
    client = running.client()
    with pytest.raises(openai.InternalServerError) as err:
        _ask(client, content="NaN please", extra_body={"mahalo": {"weights": {"flaky": 1.0}}})
    assert "flaky" in str(err.value)
    assert _ask(client, max_tokens=8).choices[0].message.content  # still serving


def test_32_concurrent_requests_each_equal_to_the_request_alone(running):
    client = running.client()
    requests = [dict(content=f"Question {i}: is water wet?", seed=i, max_tokens=16 + i % 5,
                     extra_body={"mahalo": {"weights": {("truth", "helpful")[i % 2]: 1.0},
                                            "num_candidates": 2 + i % 3}}) for i in range(32)]
    alone = [_ask(client, **r).choices[0].message.content for r in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: _ask(client, **r).choices[0].message.content, requests))
    assert together == alone


def test_a_client_that_disconnects_has_its_rows_dropped(running):
    engine = running.server.engine
    full = _ask(running.client(), content="slow answer please", max_tokens=60, seed=5,
                extra_body={"mahalo": {"weights": {"slow": 1.0}, "num_candidates": 1}})
    steps = full.model_extra["mahalo"]["steps_taken"]
    assert steps >= 8
    SLOW_CALLS.clear()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "slow answer please"}], "stream": True,
            "max_tokens": 60, "seed": 5, "mahalo": {"weights": {"slow": 1.0}, "num_candidates": 1}}
    host, port = running.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    r = conn.getresponse()
    while True:
        line = r.fp.readline().decode()
        assert line, "the stream ended before any step"
        if '"content": "' in line and '"content": ""' not in line:
            break  # the first accepted step arrived; go away
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while engine.pending or engine.controller.in_flight:
        assert time.time() < deadline, (engine.pending, engine.controller.in_flight)
        time.sleep(0.05)
    assert len(SLOW_CALLS) <= steps // 2, (len(SLOW_CALLS), steps)  # dropped long before its end


def test_more_requests_than_the_queue_get_429():
    r = _start(max_queue=1)
    try:
        GATE.clear()
        client = r.client()
        first = threading.Thread(target=lambda: _ask(client, content="wait for me", max_tokens=8,
                                                     extra_body={"mahalo": {"weights": {"slow": 1.0}}}))
        first.start()
        deadline = time.time() + 10
        while not r.server.engine.pending:
            assert time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            _ask(client, max_tokens=8)
        assert err.value.status_code == 429
    finally:
        GATE.set()
        first.join(30)
        r.stop()


def test_a_key_is_required_when_set():
    r = _start(api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            _ask(r.client("wrong"), max_tokens=4)
        assert _http(r.url + "/v1/models")[0] == 401
        assert _http(r.url + "/v1/chat/completions", "POST", b"{}")[0] == 401
        assert _ask(r.client("s3cret"), max_tokens=4).choices[0].message.content
    finally:
        r.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAHALO_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "mahalo.serve", "models=tiny", "+objective=truth",
                             f"server.port={port}", "search.max_new_tokens=16", "step.kind=max_tokens",
                             "step.min_step_tokens=0", "step.max_step_tokens=4"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            try:
                if _http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        r = _ask(client)
        assert r.choices[0].message.content and set(r.model_extra["mahalo"]["scores"]) == {"truth"}
        assert _http(f"http://127.0.0.1:{port}/v1/models")[0] == 401  # MAHALO_API_KEY
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("args, message", [
    (["server.port=0"], "server.port must be in 1..65535"),
    (["models=tiny", "+objective=nope"], "unknown objective 'nope'"),
    (["models=tiny", "server.objectives=[nope]"], "objective 'nope' needs a reward model"),
    (["models=tiny", "system_prompt=@/no/such/primer.txt"], "system_prompt file not found: /no/such/primer.txt"),
    (["models=tiny", "system_prompt=' '"], "system_prompt is empty"),
])
def test_bad_serve_configuration_is_one_line_and_exit_2(capsys, args, message):
    from mahalo import serve

    assert serve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_json_of_a_vetoed_score_is_valid():
    from mahalo.app.server import _json_safe

    assert json.loads(json.dumps(_json_safe({"a": float("-inf"), "b": [1.0, float("nan")]}))) == {
        "a": None, "b": [1.0, None]}


def test_conversations_pass_through_unchanged(running):
    """A multi-turn conversation with a system turn gets the library's answer for the same
    conversation and options; a malformed one gets 400 naming messages."""
    from mahalo import guided_generate

    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is it flat?"},
                    {"role": "assistant", "content": "No."}, {"role": "user", "content": "Why not?"}]
    r = running.client().chat.completions.create(model="tiny", messages=conversation, max_tokens=20, seed=7)
    lib = guided_generate(tiny_policy(), {"truth": tiny_reward(seed=1)}, conversation,
                          **{**DEFAULTS, "max_new_tokens": 20, "seed": 7})
    assert r.choices[0].message.content == lib.text
    with pytest.raises(openai.BadRequestError) as err:
        running.client().chat.completions.create(model="tiny", messages=conversation[:3], max_tokens=4)
    assert _error_param(err.value) == "messages" and "must end with the user's turn" in str(err.value)
