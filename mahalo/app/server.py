"""The OpenAI-compatible HTTP server (FastAPI): ``/v1/chat/completions`` on the many-prompt engine.

Requests share one :class:`~mahalo.engine.scheduler.Engine`: they decode in the same batch,
each with its own search (the ``mahalo`` field of the body, the OpenAI client's ``extra_body``):

    {"mahalo": {"strategy": "step_beam", "num_candidates": 5, "beam_width": 2,
                "weights": {"truth": 1.0}, "normalize": "zscore", "return_steps": true}}

The request's ``model`` picks the guidance: ``mahalo`` (or the served model name, its alias) is
the server's configured search, ``mahalo-<preset>`` the search shape of ``conf/search/<preset>.yaml``
(``mahalo-step-beam``, ``mahalo-sample``, ...: ``GET /v1/models`` lists them), which tools that
cannot send ``extra_body`` can select; the ``mahalo`` field still overrides it. ``stop`` (up to 4
strings) ends a candidate where its text reaches one, the stop string cut (:mod:`mahalo.stops`).
``temperature: 0`` (greedy, lm-eval's default) with a search of several candidates samples at the
server's ``sampling.temperature`` instead (1.0 if that is 0) and says so in ``mahalo.notes``.

``stream=true`` sends the answer's text as soon as it is final: ``sample`` token by token, a
step search (``step_best_of_n``, ``step_beam``, ``dvts``) the prefix that every response it can
still answer with shares, after each selection; the rest (``best_of_n``: all of it) when the search
ends. The deltas always concatenate to the non-streamed text. ``n > 1`` returns the best ``n``
distinct finished responses of the search's pool, ranked by its final rule (streamed: each choice
whole, at the end); ``logprobs=true`` the policy's log-probabilities of the returned tokens
(temperature 1; streamed: on each choice's last chunk). Bad requests get 400 with an OpenAI-style
error naming the field; a reward-model fault fails its request only (500).

Faults stay with their request: a body over ``max_body_bytes`` is 413 before it is read whole;
parsing and tokenising run off the event loop (``/health`` stays responsive); a prompt too long
for any model it would read is 400 before it queues; ``max_queue`` counts streams too (429); a
client that leaves has its prompt dropped. If the engine itself stops (a bug, out of memory),
``/health`` answers 503 with the reason, every pending request fails at once (503) and
``mahalo.serve`` exits non-zero so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mahalo.app.config import ServerConfig
from mahalo.chat import ROLES as CHAT_ROLES
from mahalo.chat import Messages, as_messages, with_system
from mahalo.config import GuideConfig, _is_int, config_from_options
from mahalo.engine.rows import Plan, Prompt
from mahalo.engine.scheduler import Busy, Engine, EngineStopped
from mahalo.result import Answer, GuidedResult, PromptError
from mahalo.stops import safe_length

log = logging.getLogger(__name__)

# The request's "mahalo" options -> guided_generate options (mahalo.config.OPTIONS).
GUIDE_FIELDS = ("strategy", "num_candidates", "beam_width", "weights", "normalize", "top_k", "min_step_tokens",
                "max_step_tokens", "dedupe", "length_penalty", "prune", "prune_every", "prune_keep", "prune_by")
MAHALO_FIELDS = (*GUIDE_FIELDS, "return_steps")
ROLES = (*CHAT_ROLES, "developer")  # developer: OpenAI's newer name for system


class BadRequest(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


def error_response(err: BadRequest) -> JSONResponse:
    body = {"error": {"message": str(err), "type": err.kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status)


@dataclass
class ChatRequest:
    """A validated chat-completion request, its prompt checked against every model's context."""

    prompt: Prompt
    stream: bool
    return_steps: bool
    model: str = "mahalo"  # the model name it asked for, which its answer carries
    notes: list[str] = field(default_factory=list)  # what the server changed in it (greedy -> sampling)
    n: int = 1  # choices: the best n distinct finished responses of the pool
    logprobs: bool = False

    @property
    def plan(self) -> Plan:
        return self.prompt.plan

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)


class Server:
    """What the routes need: the engine, the default options and the limits."""

    def __init__(self, engine: Engine, defaults: GuideConfig, objectives: list[str], cfg: ServerConfig,
                 model_id: str, api_key: str | None = None, system_prompt: str | None = None,
                 presets: dict[str, dict[str, Any]] | None = None) -> None:
        self.engine, self.defaults, self.cfg, self.model_id = engine, defaults, cfg, model_id
        if presets is None:
            from mahalo.app.compose import search_presets

            presets = search_presets()
        # model name -> the guidance options of its search preset (the budget and seed stay the request's)
        self.presets = {name: {k: v for k, v in p.items() if k in GUIDE_FIELDS} for name, p in presets.items()}
        self.models = ["mahalo", *self.presets]  # what /v1/models lists; model_id is an alias of "mahalo"
        self.system_prompt = system_prompt  # put first in a request that has no system turn
        self.objectives = list(objectives)  # what the server loaded
        self.default_objectives = [n for n in defaults.objective.weights]
        self.api_key = api_key
        self.created = int(time.time())

    # -- requests -------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            raise BadRequest("missing or wrong API key: send Authorization: Bearer <key>", None, 401,
                             "authentication_error")

    def parse(self, body: Any) -> ChatRequest:
        """Validate a chat-completion body into a :class:`ChatRequest`: its options, then its
        prompt against every model it will read. Tokenises: run it off the event loop.

        Raises:
            BadRequest: naming the field.
        """
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", None)
        model, preset = self._model(body.get("model"))
        messages = with_system(_messages(body.get("messages")), self.system_prompt)
        n = 1 if body.get("n") is None else body["n"]
        if not _is_int(n) or n < 1:
            raise BadRequest(f"n must be an integer >= 1, got {n!r}", "n")
        logprobs = bool(body.get("logprobs") or False)
        if body.get("logprobs") not in (None, True, False):
            raise BadRequest(f"logprobs must be true or false, got {body['logprobs']!r}", "logprobs")
        if body.get("top_logprobs") not in (None, 0):
            raise BadRequest("top_logprobs is not supported (only the chosen tokens' logprobs): send 0 or omit it",
                             "top_logprobs")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
        options: dict[str, Any] = dict(preset)
        key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
        budget = body.get(key)
        if budget is not None:
            if not _is_int(budget) or budget < 1:
                raise BadRequest(f"{key} must be an integer >= 1, got {budget!r}", key)
            if budget > self.cfg.max_tokens_cap:
                raise BadRequest(f"{key}={budget} is above this server's cap ({self.cfg.max_tokens_cap})", key)
            options["max_new_tokens"] = budget
        elif options.get("max_new_tokens", self.defaults.search.max_new_tokens) > self.cfg.max_tokens_cap:
            options["max_new_tokens"] = self.cfg.max_tokens_cap
        for name in ("temperature", "top_p", "seed"):
            if body.get(name) is not None:
                options[name] = body[name]
        if body.get("stop") is not None:  # checked by SamplingConfig, like the other options
            options["stop"] = body["stop"]
        extra = body.get("mahalo") or {}
        if not isinstance(extra, dict):
            raise BadRequest("mahalo must be an object of search options", "mahalo")
        unknown = sorted(set(extra) - set(MAHALO_FIELDS))
        if unknown:
            raise BadRequest(f"unknown option mahalo.{unknown[0]}: valid options are {list(MAHALO_FIELDS)}",
                             f"mahalo.{unknown[0]}")
        options.update({k: v for k, v in extra.items() if k in GUIDE_FIELDS})
        return_steps = extra.get("return_steps", False)
        if not isinstance(return_steps, bool):
            raise BadRequest(f"mahalo.return_steps must be true or false, got {return_steps!r}", "mahalo.return_steps")
        objectives = self._objectives(options, bool(preset))
        notes = self._greedy(options)
        cfg = self._config(options)
        try:
            plan = self.engine.plan(cfg, objectives)
        except ValueError as err:
            raise BadRequest(str(err), "mahalo.weights") from None
        try:
            prompt = self.engine.prepare(messages, plan)
        except PromptError as err:
            raise BadRequest(str(err).replace("max_new_tokens", "max_tokens"), "messages") from None
        holds = plan.strategy.holds
        if n > holds:
            raise BadRequest(f"n={n} but {plan.cfg.search.strategy} keeps at most {holds} finished response(s) "
                             f"({_holds_why(plan.cfg.search.strategy)}): lower n or widen the search", "n")
        return ChatRequest(prompt, stream, return_steps, model, notes, n, logprobs)

    def _model(self, value: Any) -> tuple[str, dict[str, Any]]:
        """The model a request names (``mahalo`` when it names none) and its preset's options.

        Raises:
            BadRequest: 404, a model this server does not serve, naming those it does.
        """
        if value is None or value in ("mahalo", self.model_id):
            return value or "mahalo", {}
        if isinstance(value, str) and value in self.presets:
            return value, self.presets[value]
        raise BadRequest(f"unknown model {value!r}: this server serves {self.models} (and {self.model_id!r}, "
                         "an alias of 'mahalo')", "model", 404, code="model_not_found")

    def _greedy(self, options: dict[str, Any]) -> list[str]:
        """Greedy decoding (``temperature`` 0, lm-eval's default) of a search with several
        candidates would make them all the same: it samples at the server's temperature instead
        (1.0 if that is 0). Returns the note that says so (none when nothing changed)."""
        if options.get("temperature", self.defaults.sampling.temperature) != 0:
            return []
        fallback = self.defaults.sampling.temperature or 1.0
        b, n = self._config({**options, "temperature": fallback}).search.shape
        if b * n == 1:
            return []
        options["temperature"] = fallback
        note = (f"temperature 0 (greedy) would make the {b * n} candidates of this search identical: "
                f"sampled at temperature {fallback} (the server's sampling.temperature) instead")
        log.info(note)
        return [note]

    def _objectives(self, options: dict[str, Any], preset: bool = False) -> list[str]:
        """The objectives a request is guided by; unguided requests decode with ``sample``. A
        preset model on a server with no default objective is guided by every objective it loaded."""
        weights = options.get("weights")
        if weights is None:
            names = self.default_objectives or (self.objectives if preset else [])
        elif not isinstance(weights, dict):
            raise BadRequest("mahalo.weights must be an object {objective: weight}", "mahalo.weights")
        else:
            unknown = sorted(set(weights) - set(self.objectives))
            if unknown:
                raise BadRequest(f"mahalo.weights names objective(s) {unknown} this server did not load "
                                 f"(it has {self.objectives})", "mahalo.weights")
            names = list(weights)
        if not names:
            if options.get("strategy", "sample") != "sample":
                raise BadRequest(f"strategy {options['strategy']!r} needs an objective: send mahalo.weights "
                                 f"(this server has {self.objectives})", "mahalo.weights")
            options["strategy"] = "sample"
        elif "strategy" not in options and self.defaults.search.strategy == "sample":
            options["strategy"] = "step_best_of_n"
        return names

    def _config(self, options: dict[str, Any]) -> GuideConfig:
        """The request's options over the server's defaults; a bad value names its field."""
        try:
            return config_from_options(self.defaults, **options)
        except (ValueError, TypeError) as err:
            culprit = next((name for name in options if not self._valid(name, options[name])), None)
            param = _param(culprit) if culprit else ("temperature" if "temperature" in str(err) else "mahalo")
            raise BadRequest(str(err), param) from None

    def _valid(self, name: str, value: Any) -> bool:
        try:
            config_from_options(self.defaults, **{name: value})
        except (ValueError, TypeError):
            return False
        return True

    # -- answers ----------------------------------------------------------------------------

    def completion(self, req: ChatRequest, result: GuidedResult) -> dict[str, Any]:
        answers = choices_of(req, result)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": a.text},
                         "finish_reason": _finish(a), "logprobs": self.logprobs(req, a)}
                        for i, a in enumerate(answers)],
            "usage": _usage(req, result),
            "mahalo": self.extras(req, result),
        }

    def logprobs(self, req: ChatRequest, answer: Answer) -> dict[str, Any] | None:
        """OpenAI's ``choices[i].logprobs`` of ``answer`` (None unless the request asked)."""
        if not req.logprobs:
            return None
        tokenizer = self.engine.tokenizer
        content = []
        for token, logprob in zip(answer.token_ids, answer.logprobs):
            text = tokenizer.decode([token])  # type: ignore[attr-defined]
            content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": []})
        return {"content": _json_safe(content), "refusal": None}

    def extras(self, req: ChatRequest, result: GuidedResult) -> dict[str, Any]:
        s = result.stats
        out: dict[str, Any] = {
            "scores": result.scores, "strategy": req.plan.cfg.search.strategy, "steps_taken": s.steps,
            "policy_tokens": s.policy_tokens, "reward_tokens": s.prm_tokens, "wall_s": round(s.wall_s, 4),
        }
        if req.notes:
            out["notes"] = req.notes
        if req.n > 1:  # each choice's raw scores and its final score over the pool
            out["choices"] = [{"scores": a.scores, "score": a.score} for a in result.pool[:req.n]]
        if req.return_steps:
            out["steps"] = [asdict(step) for step in result.steps]
            out["answer_path"] = result.answer_path  # the answer's candidate in each step
        return _json_safe(out)

    def chunk(self, rid: str, delta: dict[str, Any], finish: str | None = None, index: int = 0,
              logprobs: dict[str, Any] | None = None, *, model: str | None = None, **extra: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model or self.model_id,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
                **extra}
        return f"data: {json.dumps(body)}\n\n"


def choices_of(req: ChatRequest, result: GuidedResult) -> list[Answer]:
    """The request's ``n`` answers, best first (the pool's order: the search's final rule).

    Raises:
        BadRequest: the search ended with fewer distinct finished responses than ``n``.
    """
    pool = result.pool or [Answer(result.text, result.token_ids, result.stop_reason, result.scores, 0.0,
                                  result.logprobs)]
    if len(pool) < req.n:
        raise BadRequest(f"n={req.n} but the search ended with {len(pool)} distinct finished response(s): "
                         "lower n, or widen the search (more candidates or beams)", "n")
    return pool[:req.n]


def _holds_why(strategy: str) -> str:
    return {"best_of_n": "one per candidate: mahalo.num_candidates", "step_beam": "one per beam: mahalo.beam_width",
            "dvts": "one per subtree: mahalo.beam_width"}.get(strategy, "it returns one answer")


def _param(option: str) -> str:
    return option if option in ("temperature", "top_p", "seed", "stop") else (
        "max_tokens" if option == "max_new_tokens" else f"mahalo.{option}")


def _messages(value: Any) -> Messages:
    """OpenAI chat messages -> mahalo's (text content; text parts joined)."""
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] needs a role in {list(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return as_messages(out)  # the same rules as the library: passed through unchanged
    except ValueError as err:
        raise BadRequest(str(err), "messages") from None


def _finish(result: GuidedResult | Answer) -> str:
    return "length" if result.stop_reason == "length" else "stop"


def _usage(req: ChatRequest, result: GuidedResult) -> dict[str, int]:
    completion = result.stats.response_tokens if req.n == 1 else sum(len(a.token_ids) for a in result.pool[:req.n])
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion,
            "total_tokens": req.prompt_tokens + completion}


async def _wait(future: Any, request: Request, engine: Engine) -> Any:
    """The engine's answer; a client that goes away has its prompt dropped."""
    waiting = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError
    finally:
        if not future.done():  # the client went away (or this task was cancelled): free its rows
            engine.cancel(future)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> BadRequest:
    return BadRequest(f"the request body ({size} bytes) is larger than this server's limit ({limit} bytes, "
                      "server.max_body_bytes)", None, 413)


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}", None) from None


def _stopped(engine: Engine) -> BadRequest:
    err = engine.stopped
    reason = f"{type(err).__name__}: {err}" if err is not None else "closed"
    return BadRequest(f"the engine has stopped ({reason}); the server is restarting", None, 503, "server_error")


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of ``server`` (with an API key, the docs routes are off: they
    would answer without it)."""
    docs = {} if server.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="mahalo", version="1", **docs)
    app.state.server = server

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest) -> JSONResponse:
        return error_response(err)

    @app.get("/health")
    async def health() -> JSONResponse:
        stopped = server.engine.stopped
        body = {"status": "ok" if stopped is None else "stopped", "model": server.model_id,
                "objectives": server.objectives, "pending": server.engine.pending}
        if stopped is not None:
            body["reason"] = f"{type(stopped).__name__}: {stopped}"
        return JSONResponse(body, status_code=200 if stopped is None else 503)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "mahalo"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {"object": "list", "data": [card(name) for name in server.models]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        server.authorize(request)
        return card(server._model(name)[0])

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        server.authorize(request)
        if server.engine.stopped is not None:
            raise _stopped(server.engine)
        raw = await _read_body(request, server.cfg.max_body_bytes)
        req = await asyncio.to_thread(lambda: server.parse(_decode_json(raw)))  # off the event loop
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_step(text: str) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, text)

        try:  # counted against max_queue now, streams too
            future = server.engine.submit(req.prompt, None, on_step if req.stream and req.n == 1 else None,
                                          limit=server.cfg.max_queue)
        except Busy:
            raise BadRequest(f"the server is busy ({server.cfg.max_queue} requests in progress): retry later",
                             None, 429, "rate_limit_error") from None
        except EngineStopped:
            raise _stopped(server.engine) from None
        if req.stream and req.n > 1:  # the choices are known at the end: a bad count is still a 400
            result = await _answer(future, request, server)
            if isinstance(result, JSONResponse):
                return result
            choices_of(req, result)
            return StreamingResponse(_stream_choices(server, req, result), media_type="text/event-stream")
        if req.stream:
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
            return StreamingResponse(_stream(server, req, future, events), media_type="text/event-stream")
        result = await _answer(future, request, server)
        return result if isinstance(result, JSONResponse) else server.completion(req, result)

    return app


async def _answer(future: Any, request: Request, server: Server) -> GuidedResult | JSONResponse:
    """The request's result (a 499 response when the client left).

    Raises:
        BadRequest: the prompt was refused (400), failed (500) or the engine stopped (503).
    """
    try:
        result = await _wait(future, request, server.engine)
    except asyncio.CancelledError:
        return JSONResponse({}, status_code=499)
    except Exception as err:  # noqa: BLE001 - the engine stopped while this request waited
        log.warning("request failed: the engine stopped (%s)", err)
        raise _stopped(server.engine) from None
    if isinstance(result, PromptError):
        raise BadRequest(str(result), "messages")
    if isinstance(result, ValueError):
        log.warning("request failed: %s", result)
        raise BadRequest(f"the request failed: {result}", None, 500, "server_error")
    return result


async def _stream_choices(server: Server, req: ChatRequest, result: GuidedResult) -> AsyncIterator[str]:
    """Server-sent events of a finished ``n > 1`` request: each choice whole, then [DONE]."""
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    answers = choices_of(req, result)
    for i, a in enumerate(answers):
        yield server.chunk(rid, {"role": "assistant", "content": a.text}, index=i, model=req.model)
    for i, a in enumerate(answers):
        last = i == len(answers) - 1
        extra = {"usage": _usage(req, result), "mahalo": server.extras(req, result)} if last else {}
        yield server.chunk(rid, {}, _finish(a), index=i, logprobs=server.logprobs(req, a), model=req.model,
                           **extra)
    yield "data: [DONE]\n\n"


async def _stream(server: Server, req: ChatRequest, future: Any, events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events: the role, the answer's text as it becomes final (``Controller.watch``),
    the rest at the end (with the logprobs, when asked), [DONE]."""
    rid, sent, stops = f"chatcmpl-{uuid.uuid4().hex}", "", req.plan.cfg.sampling.stop
    try:
        yield server.chunk(rid, {"role": "assistant", "content": ""}, model=req.model)
        while (text := await events.get()) is not None:
            # the engine sends only text more tokens cannot change (controller.stable_text); a stop
            # string may still cut its end
            text = text[:safe_length(text, stops)]
            if text.startswith(sent) and len(text) > len(sent):
                yield server.chunk(rid, {"content": text[len(sent):]}, model=req.model)
                sent = text
        try:
            result = future.result()
        except Exception as err:  # noqa: BLE001 - the engine stopped while this request was in flight
            result = ValueError(f"the engine has stopped ({type(err).__name__}: {err})")
        if isinstance(result, ValueError):
            log.warning("request failed: %s", result)
            error = {"message": f"the request failed: {result}", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            if not result.text.startswith(sent):  # the engine streams only text that cannot change
                log.error("streamed text %r is not a prefix of the answer %r", sent, result.text)
            rest = result.text[len(sent):] if result.text.startswith(sent) else ""
            if rest:
                yield server.chunk(rid, {"content": rest}, model=req.model)
            yield server.chunk(rid, {}, _finish(result), logprobs=server.logprobs(req, choices_of(req, result)[0]),
                               model=req.model, usage=_usage(req, result), mahalo=server.extras(req, result))
        yield "data: [DONE]\n\n"
    finally:
        if not future.done():  # the client went away: its rows leave the batch at the next step
            server.engine.cancel(future)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (a vetoed candidate's -inf) as None: JSON has no infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
