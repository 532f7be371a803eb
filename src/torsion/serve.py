"""An OpenAI-compatible chat server for a loaded model, optionally steered (stdlib HTTP only).

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. A chat request's
last user message goes through :func:`~torsion.generate.generate_batch`, which applies the chat
template; other messages (system, earlier turns) are ignored. Requests run one at a time: one
lock per model object, shared by every server on that model, so a steered and an unsteered
server on the same weights never mix hooks.

Supported request fields: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 is
greedy; OpenAI's default 1), ``top_p``, ``n`` (greedy choices are identical copies), ``seed``
(seeds sampling), ``logprobs`` and ``top_logprobs`` (0–20; first generated token only, from
one extra forward of the prompt). ``stream`` is refused. ``usage`` and ``finish_reason`` count
the completion's tokens by re-encoding its text, since generation returns text.

Example::

    server = make_server(lm, port=0, steering={"vector": axis, "layers": [10], "alpha": 4.0})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url  # "http://127.0.0.1:54321/v1", for any OpenAI client
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import torch

from torsion.errors import TorsionError
from torsion.generate import GenerationSettings, generate_batch
from torsion.metrics import next_token_logprobs
from torsion.models import LoadedModel, chat_prompt, load_model
from torsion.steer import add_steering

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
MAX_N = 64  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_BODY_BYTES = 1 << 20
LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for a probability that underflows to 0
STEERING_KEYS = ("vector", "layers", "alpha", "component", "positions")

_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


class BadRequest(ValueError):
    """A request the server answers with HTTP 400 and an OpenAI-style error body."""


@dataclass(frozen=True)
class ChatRequest:
    """The fields of a chat-completion request that the server honours."""

    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None


def _number(body: Mapping[str, Any], name: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return kind(value)


def _text(content: Any) -> str:
    """A message's text: a string, or the ``text`` of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise BadRequest("message content must be a string or a list of text parts")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded ``/v1/chat/completions`` body; raise :class:`BadRequest` on a bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream is not supported; send stream: false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a list of {role, content} objects")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise BadRequest("messages has no user message; the last user message is the prompt")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise BadRequest(f"logprobs must be true or false, got {logprobs!r}")
    top_logprobs = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true")
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, int, 1, 1 << 16)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}")
    return ChatRequest(
        prompt=_text(users[-1].get("content")),
        max_tokens=_number(body, "max_completion_tokens", max_tokens, int, 1, 1 << 16),
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        n=_number(body, "n", 1, int, 1, MAX_N),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        seed=seed,
    )


def check_steering(lm: LoadedModel, steering: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``steering`` (keys ``vector``, ``layers``, ``alpha``, optional ``component``,
    ``positions``) by entering :func:`add_steering` once; return its recorded conventions."""
    if steering is None:
        return None
    unknown = sorted(set(steering) - set(STEERING_KEYS))
    missing = [key for key in ("vector", "layers", "alpha") if key not in steering]
    if unknown or missing:
        raise TorsionError(f"steering needs vector, layers and alpha (optional component, positions); "
                           f"got unknown {unknown or 'none'}, missing {missing or 'none'}")
    with _steered(lm, steering) as record:
        return {**record.conventions(), "vector_meta": dict(getattr(steering["vector"], "meta", {}))}


def _steered(lm: LoadedModel, steering: Mapping[str, Any] | None) -> contextlib.AbstractContextManager[Any]:
    if steering is None:
        return contextlib.nullcontext()
    options = {key: steering[key] for key in ("component", "positions") if key in steering}
    return add_steering(lm, steering["vector"], layers=steering["layers"], alpha=steering["alpha"], **options)


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    """One token's entry; a log-prob of -inf is written as OpenAI's -9999.0, keeping the JSON strict."""
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}


def _first_token_logprobs(lm: LoadedModel, row: torch.Tensor, content: str, greedy: bool,
                          top: int) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for the first generated token; ``row`` is ``[vocab]`` log-probs.

    The token is the argmax when greedy (exact), else the first token of the re-encoded content.
    """
    encoded = lm.tokenizer(content, add_special_tokens=False)["input_ids"]
    token_id = int(row.argmax()) if greedy or not encoded else encoded[0]
    values, ids = row.topk(top)
    entry = _token_entry(lm.tokenizer, token_id, float(row[token_id]))
    entry["top_logprobs"] = [_token_entry(lm.tokenizer, int(i), float(v)) for v, i in zip(values, ids)]
    return {"content": [entry], "refusal": None}


def complete(lm: LoadedModel, request: ChatRequest, steering: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Answer one chat request with an OpenAI ``chat.completion`` object. Not thread-safe: hold the model lock."""
    greedy = request.temperature == 0
    settings = GenerationSettings(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                  top_p=request.top_p, batch_size=request.n)
    with _steered(lm, steering):
        if not greedy and request.seed is not None:
            torch.manual_seed(request.seed)
        texts = generate_batch(lm, [request.prompt] * (1 if greedy else request.n), settings)
        first = next_token_logprobs(lm, [request.prompt])[0] if request.logprobs else None
    texts = texts * request.n if greedy else texts
    prompt_tokens = len(lm.tokenizer(chat_prompt(lm.tokenizer, request.prompt), add_special_tokens=False)["input_ids"])
    completion_tokens = [len(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    choices = [{
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None if first is None else _first_token_logprobs(lm, first, text, greedy, request.top_logprobs),
        "finish_reason": "length" if n_tokens >= request.max_tokens else "stop",
    } for index, (text, n_tokens) in enumerate(zip(texts, completion_tokens))]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": lm.model_id,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion_tokens),
                  "total_tokens": prompt_tokens + sum(completion_tokens)},
    }


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ChatServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one model; ``requests_served`` counts every HTTP request."""

    daemon_threads = True

    def __init__(self, lm: LoadedModel, address: tuple[str, int],
                 steering: Mapping[str, Any] | None = None) -> None:
        with _MODEL_LOCKS_GUARD:
            self.model_lock = _MODEL_LOCKS.setdefault(lm.model, threading.Lock())
        with self.model_lock:  # validating enters the hooks once; no other server may be generating
            self.steering_record = check_steering(lm, steering)
        self.lm, self.steering = lm, steering
        self.requests_served = 0
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://host:port/v1``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def count_request(self) -> None:
        with self._count_lock:
            self.requests_served += 1

    def answer(self, request: ChatRequest) -> dict[str, Any]:
        with self.model_lock:
            return complete(self.lm, request, self.steering)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.count_request()
        path = urlsplit(self.path).path
        model_id = self.server.lm.model_id
        if path == "/health":
            self._send(200, {"status": "ok", "model": model_id, "steering": self.server.steering_record,
                             "requests_served": self.server.requests_served})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "torsion"}]})
        else:
            self._send(404, _error_body(f"no route GET {path}", "invalid_request_error"))

    def do_POST(self) -> None:
        self.server.count_request()
        path = urlsplit(self.path).path
        if path != "/v1/chat/completions":
            self._send(404, _error_body(f"no route POST {path}", "invalid_request_error"))
            return
        try:
            request = parse_chat_request(self._read_json())
        except BadRequest as error:
            self._send(400, _error_body(str(error), "invalid_request_error"))
            return
        try:
            self._send(200, self.server.answer(request))
        except Exception as error:  # the server keeps serving; the client sees an OpenAI error body
            logger.exception("chat completion failed")
            self._send(500, _error_body(f"{type(error).__name__}: {error}", "server_error"))

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"request body is not valid JSON: {error}") from None

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:  # an unread request body would corrupt the next request on this connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def make_server(lm: LoadedModel, host: str = "127.0.0.1", port: int = 0,
                steering: Mapping[str, Any] | None = None) -> ChatServer:
    """A bound, not yet serving, server; ``port=0`` picks a free port (read ``server.url``)."""
    return ChatServer(lm, (host, port), steering)


def serve(lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, *,
          steering: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C); ``log`` gets the base URL and the steering conventions."""
    with make_server(lm, host, port, steering) as server:
        steering_note = "unsteered" if server.steering_record is None else f"steering {server.steering_record}"
        log(f"torsion serve: {lm.model_id} at {server.url} ({steering_note}); Ctrl-C stops")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def run_server(model_spec: str, host: str = "127.0.0.1", port: int = 8000, vector_path: str | None = None,
               layers: list[int] | None = None, alpha: float | list[float] | None = None,
               component: str = "resid", *, key: str | None = None, positions: str = "last",
               dtype: str = "float32", device: str = "cpu", log: Callable[[str], None] = print) -> None:
    """Load ``model_spec`` (and the vector ``key`` of ``vector_path``, steering ``layers`` by ``alpha``) and serve."""
    from torsion.vectors import load_vector

    if (vector_path is None) != (layers is None) or (vector_path is None) != (alpha is None):
        raise TorsionError("steering needs --vector, --layers and --alpha together; pass all three or none")
    lm = load_model(model_spec, dtype=dtype, device=device)
    steering = None
    if vector_path is not None:
        steering = {"vector": load_vector(vector_path, key, d_model=lm.d_model), "layers": layers,
                    "alpha": alpha, "component": component, "positions": positions}
    serve(lm, host, port, steering=steering, log=log)
