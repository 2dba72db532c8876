"""The OpenAI-compatible HTTP server (FastAPI): ``/v1/chat/completions`` on the many-prompt engine.

Requests share one :class:`~mahalo.engine.scheduler.Engine`: they decode in the same batch,
each with its own search (the ``mahalo`` field of the body, the OpenAI client's ``extra_body``):

    {"mahalo": {"strategy": "step_beam", "num_candidates": 5, "beam_width": 2,
                "weights": {"truth": 1.0}, "normalize": "zscore", "return_steps": true}}

``stream=true`` sends each accepted step as an OpenAI chunk as soon as it is selected
(``step_best_of_n``); other searches send their answer when it is final. Bad requests get 400
with an OpenAI-style error naming the field; a reward-model fault fails its request only (500).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mahalo.app.config import ServerConfig
from mahalo.chat import ROLES as CHAT_ROLES
from mahalo.chat import Messages, as_messages, generation_prompt_ids, with_system
from mahalo.config import GuideConfig, _is_int, config_from_options
from mahalo.engine.controller import Plan
from mahalo.engine.scheduler import Engine
from mahalo.result import GuidedResult

log = logging.getLogger(__name__)

# The request's "mahalo" options -> guided_generate options (mahalo.config.OPTIONS).
GUIDE_FIELDS = ("strategy", "num_candidates", "beam_width", "weights", "normalize", "top_k", "min_step_tokens",
                "max_step_tokens", "dedupe", "length_penalty")
MAHALO_FIELDS = (*GUIDE_FIELDS, "return_steps")
ROLES = (*CHAT_ROLES, "developer")  # developer: OpenAI's newer name for system


class BadRequest(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(err: BadRequest) -> JSONResponse:
    body = {"error": {"message": str(err), "type": err.kind, "param": err.param, "code": None}}
    return JSONResponse(body, status_code=err.status)


@dataclass
class ChatRequest:
    """A validated chat-completion request."""

    messages: Messages
    plan: Plan
    stream: bool
    return_steps: bool
    prompt_tokens: int


class Server:
    """What the routes need: the engine, the default options and the limits."""

    def __init__(self, engine: Engine, defaults: GuideConfig, objectives: list[str], cfg: ServerConfig,
                 model_id: str, api_key: str | None = None, system_prompt: str | None = None) -> None:
        self.engine, self.defaults, self.cfg, self.model_id = engine, defaults, cfg, model_id
        self.system_prompt = system_prompt  # put first in a request that has no system turn
        self.objectives = list(objectives)  # what the server loaded
        self.default_objectives = [n for n in defaults.objective.weights]
        self.api_key = api_key
        controller = engine.controller
        # The event loop's own tokenizer: the engine thread uses the policy's at the same time.
        self.tokenizer = copy.deepcopy(controller.policy.tokenizer)
        self.max_context = controller.policy.max_context
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
        """Validate a chat-completion body into a :class:`ChatRequest`.

        Raises:
            BadRequest: naming the field.
        """
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", None)
        messages = with_system(_messages(body.get("messages")), self.system_prompt)
        n = body.get("n")
        if n is not None and n != 1:
            raise BadRequest(f"n must be 1 (one answer per request; send more requests), got {n!r}", "n")
        if body.get("stop") not in (None, [], ""):
            raise BadRequest("stop is not supported: a response ends at the model's end of turn or max_tokens",
                             "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
        options: dict[str, Any] = {}
        key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
        budget = body.get(key)
        if budget is not None:
            if not _is_int(budget) or budget < 1:
                raise BadRequest(f"{key} must be an integer >= 1, got {budget!r}", key)
            if budget > self.cfg.max_tokens_cap:
                raise BadRequest(f"{key}={budget} is above this server's cap ({self.cfg.max_tokens_cap})", key)
            options["max_new_tokens"] = budget
        elif self.defaults.search.max_new_tokens > self.cfg.max_tokens_cap:
            options["max_new_tokens"] = self.cfg.max_tokens_cap
        for name in ("temperature", "top_p", "seed"):
            if body.get(name) is not None:
                options[name] = body[name]
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
        objectives = self._objectives(options)
        cfg = self._config(options)
        try:
            plan = self.engine.controller.plan(cfg, objectives)
        except ValueError as err:
            raise BadRequest(str(err), "mahalo.weights") from None
        prompt_tokens = len(generation_prompt_ids(self.tokenizer, messages))
        budget = cfg.search.max_new_tokens
        if self.max_context is not None and prompt_tokens + budget > self.max_context:
            raise BadRequest(
                f"the prompt ({prompt_tokens} tokens) + max_tokens ({budget}) exceeds the model's context "
                f"({self.max_context} tokens): shorten the messages or lower max_tokens", "messages")
        return ChatRequest(messages, plan, stream, return_steps, prompt_tokens)

    def _objectives(self, options: dict[str, Any]) -> list[str]:
        """The objectives a request is guided by; unguided requests decode with ``sample``."""
        weights = options.get("weights")
        if weights is None:
            names = self.default_objectives
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
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _finish(result), "logprobs": None}],
            "usage": _usage(req, result),
            "mahalo": self.extras(req, result),
        }

    def extras(self, req: ChatRequest, result: GuidedResult) -> dict[str, Any]:
        s = result.stats
        out: dict[str, Any] = {
            "scores": result.scores, "strategy": req.plan.cfg.search.strategy, "steps_taken": s.steps,
            "policy_tokens": s.policy_tokens, "reward_tokens": s.prm_tokens, "wall_s": round(s.wall_s, 4),
        }
        if req.return_steps:
            out["steps"] = [asdict(step) for step in result.steps]
        return _json_safe(out)

    def chunk(self, rid: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"


def _param(option: str) -> str:
    return option if option in ("temperature", "top_p", "seed") else (
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


def _finish(result: GuidedResult) -> str:
    return "length" if result.stop_reason == "length" else "stop"


def _usage(req: ChatRequest, result: GuidedResult) -> dict[str, int]:
    completion = result.stats.response_tokens
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion,
            "total_tokens": req.prompt_tokens + completion}


def _stable(text: str) -> str:
    """``text`` without a trailing incomplete character (it may decode differently once whole)."""
    return text.rstrip("\ufffd")


async def _wait(future: Any, request: Request, engine: Engine) -> Any:
    """The engine's answer; a client that goes away has its prompt dropped."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            engine.cancel(future)
            raise asyncio.CancelledError


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of ``server``."""
    app = FastAPI(title="mahalo", version="1")
    app.state.server = server

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest) -> JSONResponse:
        return error_response(err)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "objectives": server.objectives,
                "pending": server.engine.pending}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "mahalo"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        server.authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"malformed JSON: {err}", None) from None
        req = server.parse(body)
        if server.engine.pending >= server.cfg.max_queue:
            raise BadRequest(f"the server is busy ({server.cfg.max_queue} requests in progress): retry later",
                             None, 429, "rate_limit_error")
        if req.stream:
            return StreamingResponse(_stream(server, req), media_type="text/event-stream")
        future = server.engine.submit(req.messages, req.plan)
        try:
            result = await _wait(future, request, server.engine)
        except asyncio.CancelledError:
            return JSONResponse({}, status_code=499)
        if isinstance(result, ValueError):
            log.warning("request failed: %s", result)
            raise BadRequest(f"the request failed: {result}", None, 500, "server_error")
        return server.completion(req, result)

    return app


async def _stream(server: Server, req: ChatRequest) -> AsyncIterator[str]:
    """Server-sent events: the role, each accepted step's new text, the rest at the end, [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_step(text: str) -> None:  # engine thread
        loop.call_soon_threadsafe(events.put_nowait, text)

    future = server.engine.submit(req.messages, req.plan, on_step if req.plan.streams_steps else None)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    rid, sent = f"chatcmpl-{uuid.uuid4().hex}", ""
    try:
        yield server.chunk(rid, {"role": "assistant", "content": ""})
        while (text := await events.get()) is not None:
            text = _stable(text)
            if text.startswith(sent) and len(text) > len(sent):
                yield server.chunk(rid, {"content": text[len(sent):]})
                sent = text
        result = future.result()
        if isinstance(result, ValueError):
            log.warning("request failed: %s", result)
            error = {"message": f"the request failed: {result}", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            rest = result.text[len(sent):] if result.text.startswith(sent) else ""
            if rest:
                yield server.chunk(rid, {"content": rest})
            yield server.chunk(rid, {}, _finish(result), usage=_usage(req, result),
                               mahalo=server.extras(req, result))
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
