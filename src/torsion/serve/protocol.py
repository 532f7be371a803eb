"""The OpenAI request fields the server honours, checked into plain values, and its response shapes.

Chat and completion requests share ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` (0 is greedy; OpenAI's default 1), ``top_p``, ``n``, ``seed``, ``stop`` (a
string or up to 4), ``stream`` and ``stream_options.include_usage``. Log probabilities of every
generated token: chat takes ``logprobs: true`` and ``top_logprobs`` (0 to 20) and answers
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}``;
completions take ``logprobs`` (0 to 5 alternatives) and answer OpenAI's legacy
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (:func:`completion_logprobs`).
They are the model's own log-softmax (before temperature and top-p), floored at -9999, and
come in streamed chunks too, one entry per token. Unknown OpenAI fields are ignored, as OpenAI
ignores fields it does not use; the extension fields are ``steering`` and ``condition``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from torsion.serve.steering import RequestError

DEFAULT_MAX_TOKENS = 128
MAX_TOKENS = 1 << 14
MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit (completions)
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Sampling:
    """Decoding fields of one request; ``top_logprobs`` is None when logprobs are off."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = True  # False: the default, which the server may shorten to fit the context


def _number(body: Mapping[str, Any], name: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {str(value)[:40]!r}",
                           param=name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return kind(value)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name) or False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {str(value)[:40]!r}", param=name)
    return value


def parse_sampling(body: Mapping[str, Any], *, chat: bool) -> Sampling:
    """The decoding fields of a request body; :class:`RequestError` names a bad one."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP}", param="stop")
    top_logprobs = None
    if chat:
        logprobs = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        top_logprobs = top if logprobs else None
    else:
        top_logprobs = _number(body, "logprobs", None, int, 0, MAX_COMPLETION_LOGPROBS)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, int, 1, MAX_TOKENS)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise RequestError(f"seed must be a whole number >= 0, got {str(seed)[:40]!r}", param="seed")
    return Sampling(
        max_tokens=_number(body, "max_completion_tokens", max_tokens, int, 1, MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        n=_number(body, "n", 1, int, 1, MAX_N), seed=seed, stop=tuple(stop), top_logprobs=top_logprobs,
        stream=_flag(body, "stream"), include_usage=bool(options.get("include_usage")),
        max_tokens_given=body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None)


def _text(content: Any) -> str:
    """A message's text: a string, or the ``text`` of a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError("message content must be a string or a list of text parts", param="messages")


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The whole conversation, ``[{"role", "content"}]``; ``developer`` is read as ``system``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for message in messages:
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"message role {str(role)[:20]!r} is not served; use system, user or assistant",
                               param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": _text(message.get("content"))})
    if not any(m["role"] == "user" for m in out):
        raise RequestError("messages has no user message; send at least one", param="messages")
    return out


def completion_prompt(body: Mapping[str, Any]) -> str:
    """The ``prompt`` of a completion request: a string, or a list holding one string."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (or a list of one)", param="prompt")
    return prompt


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, list]:
    """OpenAI's legacy completion ``logprobs`` from chat-style token entries (:mod:`torsion.serve.engine`).

    ``top_logprobs`` maps token text to logprob, the chosen token included (so up to ``logprobs + 1``
    entries, as OpenAI); ``text_offset`` is each token's character offset in the completion, counting
    from ``offset`` (the characters already sent, when streamed).
    """
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        top = {alternative["token"]: alternative["logprob"] for alternative in entry["top_logprobs"]}
        top.setdefault(entry["token"], entry["logprob"])
        out["tokens"].append(entry["token"])
        out["token_logprobs"].append(entry["logprob"])
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(entry["token"])
    return out


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; ``message`` is one line."""
    return {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": code}}


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def envelope(ident: str, chat: bool, model: str, *, chunk: bool) -> dict[str, Any]:
    """The fields every response or chunk starts with."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
