"""Faults stay with the prompt that caused them: clients that leave, reward models that raise or
overflow, huge searches and huge bodies never stop the shared engine, and the other prompts'
answers are their answers alone. Tried as users meet them: raw sockets and the ``openai`` client
against a uvicorn server, the ``mahalo.serve`` and ``mahalo.decode`` commands, a local Ray."""

import http.client
import json
import os
import random
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
pytest.importorskip("uvicorn")

from mahalo import decode, guided_generate, guided_generate_many  # noqa: E402
from mahalo.app.config import ServerConfig  # noqa: E402
from mahalo.app.server import Server  # noqa: E402
from mahalo.app.tiny import tiny_policy, tiny_reward  # noqa: E402
from mahalo.chat import as_messages, generation_prompt_ids  # noqa: E402
from mahalo.config import config_from_options  # noqa: E402
from mahalo.engine.controller import Controller  # noqa: E402
from mahalo.engine.scheduler import Engine  # noqa: E402
from mahalo.policy import as_policy  # noqa: E402
from mahalo.result import PromptError  # noqa: E402
from mahalo.rewards import SequenceClassifierReward, as_reward  # noqa: E402
from tests.test_serve import Running, _free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(strategy="step_best_of_n", num_candidates=3, max_new_tokens=24, step="max_tokens", min_step_tokens=0,
            max_step_tokens=6, weights={"truth": 1.0})
GATE = threading.Event()
GATE.set()


def boom(prompt: str, response: str) -> float:
    """A programmatic reward with a bug that only some prompts reach."""
    if "BOOM" in prompt:
        raise KeyError("boom")
    return -len(response) / 100


def nan(prompt: str, response: str) -> float:
    """A reward that returns NaN (a fault, unlike -inf, a veto) for some prompts only."""
    return float("nan") if "BOOM" in prompt else -len(response) / 100


def gate(prompt: str, response: str) -> float:
    """Holds prompts that ask to wait until the test opens the gate."""
    if "wait" in prompt:
        GATE.wait(30)
    return 0.0


class RaisingModel:
    """A model-backed reward (the tiny classifier) whose forward fails for prompts that contain
    BOOM, as a CUDA assert would: it raises something other than ValueError, from inside a batch."""

    def __init__(self, inner: SequenceClassifierReward) -> None:
        self.inner = inner

    def start(self):
        return {"inner": self.inner.start(), "boom": [False]}

    def add(self, state, prompts):
        self.inner.add(state["inner"], prompts)
        state["boom"] = [any("BOOM" in m[-1]["content"] for m in prompts)]

    def score(self, state, candidates):
        if any(state["boom"]):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.inner.score(state["inner"], candidates)

    def keep(self, state, rows):
        self.inner.keep(state["inner"], rows)

    def merge(self, states):
        return {"inner": self.inner.merge([s["inner"] for s in states]), "boom": [any(s["boom"]) for s in states]}

    def split(self, state, sizes):
        parts = self.inner.split(state["inner"], sizes)
        return [{"inner": part, "boom": [flag]} for part, flag in zip(parts, state["boom"])]


def _rewards(**extra):
    return {"truth": tiny_reward(seed=1), "boom": boom, "gate": gate, **extra}


def _server(max_queue=64, api_key=None, rewards=None, max_prompts=16, max_body_bytes=4 * 2**20) -> Running:
    rewards = rewards or _rewards()
    cfg = config_from_options(None, **BASE)
    controller = Controller(as_policy(tiny_policy()), {k: as_reward(v, k) for k, v in rewards.items()}, cfg)
    engine = Engine(controller, max_prompts=max_prompts)
    server_cfg = ServerConfig(max_tokens_cap=512, max_queue=max_queue, max_body_bytes=max_body_bytes)
    return Running(Server(engine, cfg, list(rewards), server_cfg, "tiny", api_key))


@pytest.fixture(scope="module")
def running():
    r = _server()
    yield r
    r.stop()


def _http(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 60) -> tuple[int, dict | None]:
    """(status, parsed JSON body) of a plain HTTP request."""
    host, rest = url.removeprefix("http://").split(":", 1)
    port, _, path = rest.partition("/")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request(method, "/" + path, body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, (json.loads(data) if data else None)
    except json.JSONDecodeError:
        return r.status, {"text": data.decode(errors="replace")}


def _body(content: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    return _http(url + "/v1/chat/completions", "POST", json.dumps(body).encode(), timeout=timeout)


def _text(url: str, body: dict) -> str:
    status, out = _post(url, body)
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


def _settled(engine: Engine, timeout: float = 20) -> None:
    """Wait until nothing is pending or in flight (cancelled prompts have left the batch)."""
    deadline = time.time() + timeout
    while engine.pending or engine.controller.in_flight:
        assert time.time() < deadline, (engine.pending, engine.controller.in_flight)
        time.sleep(0.02)


def _leave(url: str, body: dict, after: float, stream: bool, first_chunk: bool) -> None:
    """A client that sends ``body`` on a raw socket and goes away: after ``after`` seconds, or
    (streams) right after the first content chunk."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps({**body, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    if first_chunk:
        seen = b""
        while b'"content": "' not in seen.replace(b'"content": ""', b""):
            got = sock.recv(4096)
            if not got:
                break
            seen += got
    else:
        time.sleep(after)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# -- clients that leave -----------------------------------------------------------------------

STAYERS = [
    _body("Is the earth flat?", max_tokens=24, seed=1),
    _body("Why is the sky blue?", max_tokens=30, seed=2, mahalo={"strategy": "step_beam", "beam_width": 2}),
    _body("Name a cat.", max_tokens=20, seed=3, mahalo={"strategy": "best_of_n", "num_candidates": 4}),
    _body("Tell me a story.", max_tokens=28, seed=4, mahalo={"strategy": "dvts", "beam_width": 2,
                                                            "num_candidates": 2}),
]
LEAVERS = [
    _body("Tell me a long story about the earth.", max_tokens=120, seed=0,
          mahalo={"strategy": "best_of_n", "num_candidates": 16}),
    _body("Why?", max_tokens=60, seed=5),
    _body("Where is Paris?", max_tokens=60, seed=6, mahalo={"strategy": "step_beam", "beam_width": 2}),
]


def test_clients_that_leave_at_random_moments_never_stop_the_engine(running):
    """10 rounds; in each, requests that stay run beside 3 clients that leave at a random moment
    (plain and streaming, several at once: the issue's repros among them). After every round the
    staying requests got their answers alone, nothing is left in flight, and a normal request is
    answered."""
    url, engine = running.url, running.server.engine
    alone = [_text(url, b) for b in STAYERS]
    rng = random.Random(20)
    for round_ in range(10):
        leavers = [(b, rng.uniform(0.0, 0.4), rng.random() < 0.5, round_ % 3 == 0) for b in LEAVERS]
        with ThreadPoolExecutor(len(STAYERS) + len(leavers)) as pool:
            left = [pool.submit(_leave, url, b, after, stream, first and stream)
                    for b, after, stream, first in leavers]
            stayed = list(pool.map(lambda b: _text(url, b), STAYERS))
            for f in left:
                f.result()
        assert stayed == alone, round_
        _settled(engine)
        assert _text(url, _body("Hi", max_tokens=8)), round_
        assert _http(url + "/health")[1]["status"] == "ok"
    assert engine.stopped is None


def test_a_client_that_leaves_when_nothing_else_runs_does_not_stop_the_engine(running):
    """The issue's first repro exactly: best_of_n N=16, max_tokens=120, closed after 0.05 s, alone
    on the server; then a step_best_of_n stream dropped after its first chunk. The next request is
    answered."""
    url = running.url
    _settled(running.server.engine)
    _leave(url, LEAVERS[0], 0.05, stream=False, first_chunk=False)
    _settled(running.server.engine)
    assert _text(url, _body("Hi", max_tokens=8))
    _leave(url, _body("Why?", max_tokens=60, seed=5), 0.0, stream=True, first_chunk=True)
    _settled(running.server.engine)
    assert _text(url, _body("Hi", max_tokens=8))


# -- reward models that raise -----------------------------------------------------------------

PROMPTS = [f"Question {i}: {t}?" for i, t in enumerate(["Is the earth flat", "Why is the sky blue", "What is water",
                                                         "Name a cat", "Where is Paris", "How do dogs sleep"])]


@pytest.mark.parametrize("objective", ["boom", "nan", "model"])
def test_a_reward_model_that_raises_fails_its_prompt_only(objective):
    """A programmatic reward that raises (KeyError), one that returns NaN, and a model-backed one
    that raises inside a merged batch (RuntimeError): the prompt that triggers it gets a ValueError
    naming the objective; every other prompt gets its answer alone, in batches of 1, 3 and 6."""
    policy, truth = tiny_policy(), tiny_reward(seed=1)
    prms = {"boom": {"boom": boom}, "nan": {"nan": nan}}.get(objective) or {
        "model": RaisingModel(SequenceClassifierReward(*truth))}
    prompts = [*PROMPTS[:3], "BOOM " + PROMPTS[3], *PROMPTS[4:]]
    opts = {**BASE, "weights": {objective: 1.0}}
    clean = {**prms}
    alone = {i: guided_generate(policy, clean, p, **opts).token_ids for i, p in enumerate(prompts) if i != 3}
    for max_prompts in (1, 3, 6):
        out = dict(guided_generate_many(policy, prms, prompts, errors="return", max_prompts=max_prompts, **opts))
        assert isinstance(out[3], ValueError) and objective in str(out[3]), out[3]
        assert {i: r.token_ids for i, r in out.items() if i != 3} == alone, max_prompts


def test_a_raising_reward_fails_its_request_only_on_the_server(running):
    url = running.url
    alone = [_text(url, b) for b in STAYERS]
    bad = _body("BOOM now", max_tokens=24, mahalo={"weights": {"truth": 1.0, "boom": 1.0}})
    with ThreadPoolExecutor(len(STAYERS) + 1) as pool:
        failing = pool.submit(_post, url, bad)
        stayed = list(pool.map(lambda b: _text(url, b), STAYERS))
    status, body = failing.result()
    assert status == 500 and "boom" in body["error"]["message"] and "KeyError" in body["error"]["message"], body
    assert stayed == alone
    assert _text(url, _body("Hi", max_tokens=8))


# -- contexts ---------------------------------------------------------------------------------

def _near_limit_prompt(tokenizer, budget: int, context: int = 1024) -> str:
    """A user message whose chat prompt + ``budget`` is the policy's context or one less: the
    policy has room, a reward model that adds its end-of-turn suffix (2 tokens) does not."""
    for words in range(10, 2000):
        for tail in ("", " x", " so", " Ok."):
            text = "Tell me a long story about the earth. " + "and then " * words + tail
            total = len(generation_prompt_ids(tokenizer, as_messages(text))) + budget
            if total in (context - 1, context):
                return text
            if total > context:
                break
    raise AssertionError("no prompt length hits the limit")


def test_a_reward_side_overflow_is_refused_before_decoding():
    """The issue's repro, in the library: the policy has room for prompt + budget, the reward model
    (prompt + budget + its scoring suffix) does not. The prompt is refused at admission with a
    PromptError naming the reward model; the others decode as alone."""
    policy, truth = tiny_policy(), tiny_reward(seed=1)
    long = _near_limit_prompt(policy[1], 455)
    opts = {**BASE, "strategy": "step_beam", "beam_width": 2, "num_candidates": 4, "max_new_tokens": 455}
    out = dict(guided_generate_many(policy, {"truth": truth}, [PROMPTS[0], long, PROMPTS[1]], errors="return",
                                    max_prompts=3, **opts))
    assert isinstance(out[1], PromptError) and "reward model of ['truth']" in str(out[1]), out[1]
    assert "above its context (1024 tokens)" in str(out[1])
    for i, p in ((0, PROMPTS[0]), (2, PROMPTS[1])):
        assert out[i].token_ids == guided_generate(policy, {"truth": truth}, p, **opts).token_ids


def test_an_overflow_found_while_scoring_fails_its_prompt_only(monkeypatch):
    """Where a model's need is not known before decoding (another vocabulary), the overflow is
    found when the candidates are scored, before the reward state changes: that prompt fails,
    batched or alone, and the others are unchanged."""
    from mahalo.rewards.backbone import BackboneReward

    policy = tiny_policy()
    truth = SequenceClassifierReward(*tiny_reward(seed=1))
    truth.max_context = 1000  # a reward model with a smaller context than the policy's ...
    monkeypatch.setattr(BackboneReward, "context_need", lambda self, *a: (0, None))  # ... unknown before decoding
    long = _near_limit_prompt(policy[1], 40)  # about 984 prompt tokens: the first scored step overflows 1000
    alone = {i: guided_generate(policy, {"truth": truth}, p, **BASE).token_ids for i, p in enumerate(PROMPTS[:3])}
    for max_prompts in (1, 4):
        out = dict(guided_generate_many(policy, {"truth": truth}, [*PROMPTS[:3], long], errors="return",
                                        max_prompts=max_prompts, **BASE))
        assert isinstance(out[3], PromptError) and "exceeds its context (1000)" in str(out[3]), out[3]
        assert {i: out[i].token_ids for i in range(3)} == alone


def test_a_reward_side_overflow_is_400_on_the_server(running):
    """The issue's repro on the server (step_beam 2x4, max_tokens 455): 400 naming messages, at
    once; the server goes on."""
    long = _near_limit_prompt(running.server.engine.controller.policy.tokenizer, 455)
    status, body = _post(running.url, _body(long, max_tokens=455, seed=0, mahalo={
        "strategy": "step_beam", "num_candidates": 4, "beam_width": 2, "weights": {"truth": 1.0}}))
    assert status == 400 and body["error"]["param"] == "messages", body
    assert "reward model of ['truth']" in body["error"]["message"] and "max_tokens" in body["error"]["message"]
    assert _text(running.url, _body("Hi", max_tokens=8))


# -- bounded work -----------------------------------------------------------------------------

def test_a_huge_search_is_refused_before_anything_is_allocated(running, capsys):
    status, body = _post(running.url, _body("Hi", mahalo={"num_candidates": 100000}))
    assert status == 400 and body["error"]["param"] == "mahalo.num_candidates", body
    assert "above the default bound of 1024" in body["error"]["message"]
    assert _text(running.url, _body("Hi", max_tokens=8))
    with pytest.raises(ValueError, match="100000 rows, above the default bound of 1024"):
        guided_generate(tiny_policy(), {"truth": tiny_reward(seed=1)}, "Hi", num_candidates=100000)
    assert decode.main(["models=tiny", "+objective=truth", "prompt=hi", "search.num_candidates=100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "above the default bound of 1024" in err and "models loaded" not in err


def _raw_post(url: str, data: bytes, length: int | None = None) -> tuple[int, float]:
    """POST ``data`` on a raw socket (the declared length may differ); (status, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    t = time.perf_counter()
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data) if length is None else length}\r\n\r\n").encode()
    try:
        sock.sendall(head + data)
    except OSError:  # the server answered and closed before the whole body was sent
        pass
    reply = sock.recv(4096).decode(errors="replace")
    sock.close()
    return int(reply.split()[1]), time.perf_counter() - t


def test_huge_bodies_get_413_and_health_stays_responsive(running):
    url = running.url
    huge = json.dumps(_body("word " * 4_000_000)).encode()  # 20 MB
    assert len(huge) > 20e6
    health: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            t = time.perf_counter()
            assert _http(url + "/health")[0] == 200
            health.append(time.perf_counter() - t)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        status, seconds = _raw_post(url, huge)
        assert status == 413 and seconds < 5
        # under the limit but far over every context: parsed and tokenised off the event loop
        big = json.dumps(_body("word " * 700_000)).encode()  # 3.5 MB
        assert len(big) < 4 * 2**20
        status, body = _http(url + "/v1/chat/completions", "POST", big, timeout=120)
        assert status == 400 and body["error"]["param"] == "messages"
    finally:
        stop.set()
        prober.join()
    assert health and max(health) < 1.0, max(health)
    assert _text(url, _body("Hi", max_tokens=8))


def test_max_queue_counts_streams():
    """50 streams at once against max_queue=4: 4 are admitted, the others get 429 at once."""
    r = _server(max_queue=4)
    try:
        GATE.clear()
        held = _body("wait for me", max_tokens=8, stream=True, mahalo={"weights": {"gate": 1.0}})

        def status():
            return _post(r.url, held, timeout=60)[0]

        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(status) for _ in range(50)]
            deadline = time.time() + 30
            while sum(f.done() for f in futures) < 46:
                assert time.time() < deadline
                time.sleep(0.05)
            GATE.set()
            codes = [f.result() for f in futures]
        assert codes.count(200) == 4 and codes.count(429) == 46, codes
    finally:
        GATE.set()
        r.stop()


def test_the_docs_routes_need_the_key_when_one_is_set():
    r = _server(api_key="s3cret")
    try:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert _http(r.url + path)[0] == 404, path
    finally:
        r.stop()
    r = _server()
    try:
        assert _http(r.url + "/openapi.json")[0] == 200
    finally:
        r.stop()


# -- the engine itself stops -----------------------------------------------------------------

def test_an_engine_that_stops_says_so_and_fails_pending_requests_at_once(monkeypatch):
    r = _server()
    try:
        engine = r.server.engine
        real = engine.controller.tick

        def step():
            if any(s.index == crash for s in engine.controller.searches):
                raise MemoryError("CUDA out of memory")
            return real()

        crash = -1
        monkeypatch.setattr(engine.controller, "tick", step)
        assert _text(r.url, _body("Hi", max_tokens=8))
        crash = engine._tickets + 1  # the second request from now
        GATE.clear()
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(_post, r.url, _body("wait for me", max_tokens=200, mahalo={"weights": {"gate": 1.0}}))
            time.sleep(0.3)
            t = time.perf_counter()
            crashing = pool.submit(_post, r.url, _body("Hi", max_tokens=8))
            GATE.set()
            codes = [waiting.result()[0], crashing.result()[0]]
            assert time.perf_counter() - t < 10
        assert codes == [503, 503], codes
        status, health = _http(r.url + "/health")
        assert status == 503 and health["status"] == "stopped" and "CUDA out of memory" in health["reason"]
        status, body = _post(r.url, _body("Hi", max_tokens=8))
        assert status == 503 and "engine has stopped" in body["error"]["message"]
    finally:
        GATE.set()
        r.stop()


CRASHING_SERVER = """
import sys
from mahalo.engine.controller import Controller
CRASH = []
real_admit, real_tick = Controller.admit, Controller.tick
def admit(self, prompts):  # a bug that a prompt containing CRASH triggers at the next token
    CRASH.extend(p for p in prompts if "CRASH" in repr(p))
    return real_admit(self, prompts)
def tick(self):
    if CRASH:
        raise MemoryError("CUDA out of memory")
    return real_tick(self)
Controller.admit, Controller.tick = admit, tick
from mahalo import serve
sys.exit(serve.main(sys.argv[1:]))
"""


def test_the_serve_command_exits_non_zero_when_its_engine_stops(tmp_path):
    """A bug that stops the engine: the request gets 503, and the process exits 1 with one line
    saying why (a supervisor restarts it) instead of accepting requests it can never answer."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SERVER, "models=tiny", "+objective=truth",
                             "system_prompt=null", f"server.port={port}", "search.max_new_tokens=8"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            try:
                if _http(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert _text(url, _body("Hi", max_tokens=8))
        try:
            status, _ = _post(url, _body("CRASH please", max_tokens=8))
            assert status == 503
        except OSError:
            pass  # the process may already be gone
        assert proc.wait(30) == 1
        err = proc.stderr.read()
        assert "mahalo: error: the engine stopped (MemoryError: CUDA out of memory); exiting" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


# -- a prompt file with one overflowing prompt ------------------------------------------------

def _prompt_file(tmp_path: Path, budget: int) -> tuple[Path, int]:
    """10 ordinary prompts and one (at index 4) that fits the policy but not the reward model."""
    policy = tiny_policy()
    long = _near_limit_prompt(policy[1], budget)
    prompts = [f"Tell me about {t}." for t in ["the sky", "water", "cats", "Paris", "the moon", "bread", "rain",
                                               "music", "iron", "trees"]]
    prompts.insert(4, long)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path, 4


CLI = ["models=tiny", "+objective=truth", "search=step_best_of_n", "system_prompt=null", "search.num_candidates=3",
       "search.seed=7"]


def _check_records(out: Path, bad: int) -> dict[int, dict]:
    records = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
    by = {r["index"]: r for r in records}
    assert len(by) == len(records) == 11
    assert "error" in by[bad] and "reward model of ['truth']" in by[bad]["error"], by[bad]
    assert all("text" in r for i, r in by.items() if i != bad)
    return by


def test_a_prompt_file_with_one_overflowing_prompt_writes_10_answers_and_1_error(tmp_path, capsys):
    path, bad = _prompt_file(tmp_path, 400)
    for max_prompts in (8, 1):
        out = tmp_path / f"out{max_prompts}.jsonl"
        code = decode.main([*CLI, "search.max_new_tokens=400", f"prompts={path}", f"output={out}",
                            f"batch.max_prompts={max_prompts}"])
        assert code == 1  # some prompts failed; their records say why
        by = _check_records(out, bad)
        if max_prompts == 8:
            first = {i: r["text"] for i, r in by.items() if i != bad}
        else:
            assert {i: r["text"] for i, r in by.items() if i != bad} == first
    err = capsys.readouterr().err
    assert f"prompt {bad}:" in err and "1 of 11 prompts failed" in err


def test_a_prompt_file_with_one_overflowing_prompt_on_ray(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    path, bad = _prompt_file(tmp_path, 400)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert decode.main([*CLI, "search.max_new_tokens=400", f"prompts={path}", f"output={local}"]) == 1
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        code = decode.main([*CLI, "search.max_new_tokens=400", f"prompts={path}", f"output={remote}", "launcher=ray",
                            "launcher.replicas=2", "launcher.batch_size=2"])
    finally:
        ray.shutdown()
    assert code == 1
    here, there = _check_records(local, bad), _check_records(remote, bad)
    assert all(r["attempt"] == 1 for r in there.values())  # one pass: nothing died
    assert {i: r.get("text") for i, r in there.items()} == {i: r.get("text") for i, r in here.items()}


def test_the_library_and_engine_never_stop_on_a_cancel_alone():
    """Engine level: a cancel that arrives when nothing else waits or runs wakes the engine, which
    applies it and goes on waiting (the bug: it took that wake-up for 'stop')."""
    controller = Controller(as_policy(tiny_policy()), {}, config_from_options(None, strategy="sample",
                                                                              max_new_tokens=200))
    engine = Engine(controller, max_prompts=4)
    try:
        f = engine.submit("Tell me a long story.")
        time.sleep(0.05)
        engine.cancel(f)
        _settled(engine)
        assert engine._thread.is_alive()
        assert not isinstance(engine.submit("Hi").result(timeout=30), BaseException)
    finally:
        engine.close()


def test_prepare_reports_every_models_context():
    """Controller.prepare (what the server calls off the event loop) checks the policy and each
    reward model the plan reads, in its own tokens."""
    policy = tiny_policy()
    short = tiny_reward(seed=1, max_position_embeddings=256)
    controller = Controller(as_policy(policy), {"truth": as_reward(short, "truth")}, config_from_options(None, **BASE))
    prompt = controller.prepare(as_messages("Hi"))
    assert prompt.ids == generation_prompt_ids(policy[1], as_messages("Hi"))
    text = "word " * 150
    with pytest.raises(PromptError, match=r"reward model of \['truth'\] would read up to \d+ tokens .* \(256 tokens\)"):
        controller.prepare(as_messages(text))
    unguided = controller.plan(config_from_options(None, **{**BASE, "strategy": "sample", "weights": {}}), [])
    assert controller.prepare(as_messages(text), unguided).ids  # the reward model is not read: no check
    with pytest.raises(PromptError, match="exceeds the policy's context"):
        controller.prepare(as_messages("word " * 1200))
