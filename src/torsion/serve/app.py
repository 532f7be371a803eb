"""The FastAPI app: OpenAI-compatible routes over the batch engine, steering routes, auth, limits.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` answers with
server-sent events in OpenAI's chunk format, ending ``data: [DONE]``; ``logprobs`` as OpenAI
gives them, per chunk when streamed: see :mod:`~torsion.serve.protocol`), ``GET /v1/models``,
``GET /health``, ``GET /v1/steering`` (vectors with provenance, conditions, methods, limits)
and ``POST /v1/steering`` (``{"name", "vector": [..] or [[..], ..], "meta": {..}}``).

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a one-line
message: 400 bad field, 401 missing or wrong key, 404 unknown route, vector or condition,
409 a taken vector name, 413 a body over the limit, 500 a failed generation (the server keeps
serving). With an API key, every request needs ``Authorization: Bearer KEY``; the key is
compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from torsion.models import LoadedModel, chat_prompt
from torsion.serve import protocol
from torsion.serve.condition import Condition
from torsion.serve.engine import Engine, Job
from torsion.serve.steering import PER_ROW, RequestError, RowSteering, VectorRegistry, resolve_steering, served_methods

MAX_BODY_BYTES = 1 << 20


@dataclass
class ServeState:
    """Everything the routes share: the model, its engine, named vectors and conditions, limits."""

    lm: LoadedModel
    engine: Engine
    vectors: VectorRegistry
    conditions: dict[str, Condition] = field(default_factory=dict)
    default_steering: RowSteering | None = None
    max_applied_norm: float | None = None
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES

    @property
    def context_limit(self) -> int | None:
        return getattr(self.lm.model.config, "max_position_embeddings", None)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param), status_code=status)


async def _read_json(request: Request, limit: int) -> Any:
    """The decoded body; over ``limit`` bytes is a 413, bad JSON a 400."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(f"request body is {declared} bytes; the limit is {limit}", status=413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", status=413)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"request body is not valid JSON: {error}") from None


def _steering_of(state: ServeState, body: Mapping[str, Any]) -> RowSteering | None:
    """The request's steering: its ``steering`` field (null = none), else the server default; then ``condition``."""
    if "steering" in body:
        steering = resolve_steering(body["steering"], state.lm, state.vectors, state.conditions,
                                    max_applied_norm=state.max_applied_norm)
    else:
        steering = state.default_steering
    name = body.get("condition")
    if name is not None:
        if steering is None:
            raise RequestError("condition needs steering to gate; send steering too", param="condition")
        if not isinstance(name, str) or name not in state.conditions:
            loaded = ", ".join(sorted(state.conditions)) or "none"
            raise RequestError(f"unknown condition {str(name)[:64]!r}; loaded: {loaded}"
                               " (start the server with --condition)", status=404, param="condition")
        steering = dataclasses.replace(steering, condition=state.conditions[name])
    return steering


def _job(state: ServeState, body: Mapping[str, Any], chat: bool) -> tuple[Job, protocol.Sampling, asyncio.Queue]:
    sampling = protocol.parse_sampling(body, chat=chat)
    if chat:
        ids = state.lm.tokenizer(chat_prompt(state.lm.tokenizer, protocol.chat_messages(body)),
                                 add_special_tokens=False)["input_ids"]
    else:
        ids = state.lm.tokenizer(protocol.completion_prompt(body))["input_ids"]
    if not ids:
        raise RequestError("the prompt encodes to no tokens; send some text", param="prompt")
    limit = state.context_limit
    if limit is not None and not sampling.max_tokens_given and len(ids) < limit:
        sampling = dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, limit - len(ids)))
    if limit is not None and len(ids) + sampling.max_tokens > limit:
        raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {sampling.max_tokens}; together "
                           f"they exceed the model's {limit}; shorten one", param="max_tokens")
    steering = _steering_of(state, body)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(ids, sampling.max_tokens, emit,
              temperature=sampling.temperature, top_p=sampling.top_p, n=sampling.n, seed=sampling.seed,
              stop=sampling.stop, top_logprobs=sampling.top_logprobs, steering=steering)
    return job, sampling, events


def _metadata(job: Job, fired: bool | None, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
    return None if job.steering is None else job.steering.metadata(fired, record)


async def _complete(state: ServeState, job: Job, events: asyncio.Queue, chat: bool) -> JSONResponse:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    tokens: dict[int, int] = {}
    logprobs: dict[int, list] = {i: [] for i in range(job.n)}
    fired = record = None
    while len(finish) < job.n:
        event = await events.get()
        if event["type"] == "error":
            return _error(500, f"generation failed: {event['message']}", "server_error")
        if event["type"] == "steering":
            fired = event["fired"]
        elif event["type"] == "record":
            record = event["record"]
        elif event["type"] == "delta" and event["logprobs"]:
            logprobs[event["choice"]] += event["logprobs"]
        elif event["type"] == "done":
            choice = event["choice"]
            texts[choice], finish[choice], tokens[choice] = event["text"], event["finish_reason"], event["tokens"]
    meta = _metadata(job, fired, record)
    choices = []
    for i in range(job.n):
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": texts[i]}
            choice["logprobs"] = None if job.top_logprobs is None else {"content": logprobs[i], "refusal": None}
        else:
            choice["text"] = texts[i]
            choice["logprobs"] = None if job.top_logprobs is None else protocol.completion_logprobs(logprobs[i])
        choices.append({**choice, "finish_reason": finish[i], "steering": meta})
    body = {**protocol.envelope(protocol.completion_id(chat), chat, state.lm.model_id, chunk=False),
            "choices": choices, "usage": protocol.usage(len(job.prompt_ids), sum(tokens.values()))}
    return JSONResponse(body)


async def _stream(state: ServeState, job: Job, sampling: protocol.Sampling, events: asyncio.Queue,
                  chat: bool) -> AsyncIterator[str]:
    head = protocol.envelope(protocol.completion_id(chat), chat, state.lm.model_id, chunk=True)

    offsets = [0] * job.n  # characters of each choice's token entries sent so far (completions' text_offset)

    def chunk(choice: int, text: str | None, finish: str | None = None, extra: Mapping[str, Any] = {},
              entries: list | None = None) -> str:
        logprobs = None
        if entries and chat:
            logprobs = {"content": entries, "refusal": None}
        elif entries:
            logprobs = protocol.completion_logprobs(entries, offsets[choice])
            offsets[choice] += sum(len(entry["token"]) for entry in entries)
        if chat:
            delta = {} if text is None else {"content": text}
            body = {"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}
        else:
            body = {"index": choice, "text": text or "", "logprobs": logprobs, "finish_reason": finish, **extra}
        return f"data: {json.dumps({**head, 'choices': [body]}, ensure_ascii=False)}\n\n"

    try:
        if chat:
            for i in range(job.n):
                opening = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [opening]})}\n\n"
        done, fired, record, total = 0, None, None, 0
        while done < job.n:
            event = await events.get()
            if event["type"] == "error":
                failure = protocol.error_body(f"generation failed: {event['message']}", "server_error")
                yield f"data: {json.dumps(failure)}\n\n"
                break
            if event["type"] == "steering":
                fired = event["fired"]
            elif event["type"] == "record":
                record = event["record"]
            elif event["type"] == "delta":
                if event["text"] or event["logprobs"]:
                    yield chunk(event["choice"], event["text"], entries=event["logprobs"])
            elif event["type"] == "done":
                done, total = done + 1, total + event["tokens"]
                yield chunk(event["choice"], None, event["finish_reason"], {"steering": _metadata(job, fired, record)})
        else:
            if sampling.include_usage:
                usage = protocol.usage(len(job.prompt_ids), total)
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # a client that hung up frees its rows
        job.cancelled.set()


def create_app(state: ServeState) -> FastAPI:
    """The ASGI app over ``state`` (its engine must be started by the caller)."""
    app = FastAPI(title="torsion serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Any:
        if state.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
                return _error(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                              "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        kind = "request_too_large" if error.status == 413 else "invalid_request_error"
        return _error(error.status, str(error), kind, error.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, f"no route {request.method} {request.url.path}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        default = state.default_steering
        return {"status": "ok", "model": state.lm.model_id,
                "default_steering": None if default is None else default.metadata(None),
                "max_batch_size": state.engine.max_batch_size, "batching": state.engine.mode,
                "batch_window_ms": state.engine.batch_window_s * 1000, "engine": dict(state.engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.lm.model_id, "object": "model", "created": 0,
                                            "owned_by": "torsion"}]}

    @app.get("/v1/steering")
    async def list_steering() -> dict[str, Any]:
        conditions = [{"name": c.name, "category": c.category, "layer": c.layer, "threshold": c.threshold,
                       "position": c.position, "meta": c.meta} for c in state.conditions.values()]
        return {"object": "list", "data": state.vectors.listing(), "conditions": conditions,
                "methods": served_methods(), "per_row_methods": list(PER_ROW),
                "limits": {"max_applied_norm": state.max_applied_norm}}

    @app.post("/v1/steering", status_code=201)
    async def register(request: Request) -> dict[str, Any]:
        body = await _read_json(request, state.max_body_bytes)
        if not isinstance(body, dict) or set(body) - {"name", "vector", "meta"} or "vector" not in body:
            raise RequestError("send {\"name\": NAME, \"vector\": [d_model] or [[...] per block], \"meta\": {...}}")
        meta = body.get("meta") or {}
        if not isinstance(meta, dict):
            raise RequestError("meta must be an object", param="meta")
        entry = await asyncio.to_thread(state.vectors.add, body.get("name"), body["vector"], source="POST /v1/steering",
                                        meta=meta)
        return entry.listing()

    async def generate(request: Request, chat: bool) -> Any:
        body = await _read_json(request, state.max_body_bytes)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        job, sampling, events = _job(state, body, chat)
        state.engine.submit(job)
        if sampling.stream:
            return StreamingResponse(_stream(state, job, sampling, events, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await _complete(state, job, events, chat)
        finally:
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, False)

    return app
