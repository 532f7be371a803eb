"""The OpenAI-compatible server on a tiny random Llama, over real loopback HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch

from torsion.errors import TorsionError
from torsion.metrics import next_token_logprobs
from torsion.models import chat_prompt
from torsion.serve import ChatServer, make_server, run_server

from tiny import tiny_lm
from torsion.steer import generate_steered

PROMPT = "tell me a story about the dragon"



@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@contextmanager
def running(server: ChatServer) -> Iterator[ChatServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(url: str, body: bytes | dict | None = None) -> tuple[int, Any]:
    """(status, decoded JSON) of a GET (no body) or POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat(url: str, **fields: Any) -> tuple[int, Any]:
    return call(f"{url}/chat/completions", {"messages": [{"role": "system", "content": "ignored"},
                                                         {"role": "user", "content": PROMPT}], **fields})


def test_greedy_completion_has_openai_shape_and_first_token_logprobs(lm):
    with running(make_server(lm)) as server:
        assert server.server_address[0] == "127.0.0.1"
        status, reply = chat(server.url, model="any", temperature=0, max_tokens=6, n=2, logprobs=True,
                             top_logprobs=3)
    assert status == 200
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-llama"
    first, second = reply["choices"]
    assert first["message"]["role"] == "assistant" and first["message"]["content"]
    assert first["message"]["content"] == second["message"]["content"] and second["index"] == 1
    prompt_tokens = len(lm.tokenizer(chat_prompt(lm.tokenizer, PROMPT), add_special_tokens=False)["input_ids"])
    completion = len(first["message"]["content"].split()) * 2  # word-level tokenizer, two choices
    assert reply["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                              "total_tokens": prompt_tokens + completion}
    values, ids = next_token_logprobs(lm, [PROMPT])[0].topk(3)
    entry = first["logprobs"]["content"][0]
    assert [t["token"] for t in entry["top_logprobs"]] == [lm.tokenizer.decode([int(i)]) for i in ids]
    assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-6)
    assert entry["token"] == entry["top_logprobs"][0]["token"] == first["message"]["content"].split()[0]
    assert entry["bytes"] == list(entry["token"].encode())


def test_sampled_choices_follow_the_seed(lm):
    with running(make_server(lm)) as server:
        replies = [chat(server.url, temperature=1.0, n=3, max_tokens=5, seed=7)[1] for _ in range(2)]
        other = chat(server.url, temperature=1.0, n=3, max_tokens=5, seed=8)[1]
    contents = [[c["message"]["content"] for c in reply["choices"]] for reply in replies + [other]]
    assert len(contents[0]) == 3 and contents[0] == contents[1]
    assert contents[2] != contents[0]


def test_steering_changes_the_output_exactly_as_generate_steered(lm):
    vector = torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(1))
    steering = {"vector": vector, "layers": [1], "alpha": 40.0}
    with running(make_server(lm)) as plain, running(make_server(lm, steering=steering)) as steered:
        base = chat(plain.url, temperature=0, max_tokens=8)[1]
        moved = chat(steered.url, temperature=0, max_tokens=8)[1]
        health = call(steered.url.removesuffix("/v1") + "/health")[1]
        base_again = chat(plain.url, temperature=0, max_tokens=8)[1]
    expected = generate_steered(lm, [PROMPT], vectors=vector, layers=[1], alpha=40.0, max_new_tokens=8)
    assert moved["choices"][0]["message"]["content"] == expected[0]["response"]
    assert moved["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert base_again["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
    assert health["steering"]["layers"] == [1] and health["steering"]["alpha"] == [40.0]
    assert health["steering"]["applied_norm"] == pytest.approx([40.0 * vector[1].norm().item()], rel=1e-6)


def test_bad_requests_get_openai_error_bodies_and_the_server_keeps_serving(lm):
    with running(make_server(lm)) as server:
        root = server.url.removesuffix("/v1")
        status, body = call(f"{server.url}/chat/completions", b"{not json")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert "not valid JSON" in body["error"]["message"]
        for fields, message in [({"messages": []}, "no user message"),
                                ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
                                ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n must be"),
                                ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
                                 "needs logprobs")]:
            status, body = call(f"{server.url}/chat/completions", fields)
            assert status == 400 and message in body["error"]["message"]
        assert call(f"{root}/v1/nothing")[0] == 404
        assert call(f"{server.url}/models")[1]["data"][0]["id"] == "tiny-llama"
        health = call(f"{root}/health")[1]
        assert health["status"] == "ok" and health["steering"] is None
        assert chat(server.url, temperature=0, max_tokens=2)[0] == 200
        assert server.requests_served == 9


def test_bad_steering_fails_before_binding(lm):
    vector = torch.ones(lm.n_layers, lm.d_model)
    with pytest.raises(TorsionError, match="out of range"):
        make_server(lm, steering={"vector": vector, "layers": [7], "alpha": 1.0})
    with pytest.raises(TorsionError, match="missing \\['alpha'\\]"):
        make_server(lm, steering={"vector": vector, "layers": [0]})
    with pytest.raises(TorsionError, match="--vector, --layers and --alpha together"):
        run_server("embedded:smollm2-135m", vector_path="v.safetensors")
