"""The steering server on a tiny random Llama, through the real ``openai`` client over loopback HTTP."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from contextlib import nullcontext
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI

from torsion.models import chat_prompt
from torsion.serve import ServerThread, build_state
from torsion.serve.condition import Condition
from torsion.serve.engine import model_lock
from torsion.serve.server import api_key_from_env
from torsion.steer import ablate_direction, dense_steering, generate_steered
from torsion.steering import get_method

from tiny import tiny_lm

PROMPT = "tell me a story about the dragon"
OTHER = "how do i bake bread please"
TIMEOUT = 60


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def axis(lm):
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def spline(lm):
    """A spline-a method on block 1 with a recorded coherent range [0.2, 0.8]."""
    rng = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(lm.d_model, 2, generator=rng))[0].T[None]  # [1, 2, d] orthonormal rows
    knots = torch.tensor([[[-3.0, 1.0], [0.0, 0.0], [3.0, -1.0]]])
    return get_method("spline-a", layers=[1], basis=basis, mean=torch.randn(1, lm.d_model, generator=rng),
                      knots=knots, knots_t=torch.tensor([0.0, 0.5, 1.0]), t_range=(0.2, 0.8))


@pytest.fixture(scope="module")
def server(lm, axis, spline, tmp_path_factory):
    path = spline.save(tmp_path_factory.mktemp("methods") / "spline.safetensors")
    state = build_state(lm, max_applied_norm=100.0, max_body_bytes=4096, method_files=[("spline", path)])
    state.vectors.add("axis", axis, source="test", meta={"method": "md"})
    with ServerThread(state) as running:
        yield running


def client(server: ServerThread, key: str = "none") -> OpenAI:
    return OpenAI(base_url=server.url, api_key=key, timeout=TIMEOUT, max_retries=0)


def ask(server: ServerThread, content: str | list = PROMPT, **fields: Any):
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    extra = {k: fields.pop(k) for k in ("steering", "condition") if k in fields}
    temperature = fields.pop("temperature", 0)
    return client(server).chat.completions.create(model="any", messages=messages, temperature=temperature,
                                                  max_tokens=fields.pop("max_tokens", 6), extra_body=extra, **fields)


def prompt_ids(lm, messages: str | list) -> list[int]:
    return lm.tokenizer(chat_prompt(lm.tokenizer, messages), add_special_tokens=False)["input_ids"]


def reference(lm, messages: str | list, max_new: int, steering=None) -> tuple[str, int]:
    """Hugging Face greedy generate of the templated conversation: (text, generated token count)."""
    ids = torch.tensor([prompt_ids(lm, messages)])
    with model_lock(lm), torch.inference_mode(), steering or nullcontext():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1]:]
    return lm.tokenizer.decode(new, skip_special_tokens=True), len(new)


def steered(lm, prompts: list[str], **options: Any) -> list[dict]:
    """generate_steered under the model lock: the engine may still be removing a finished batch's hooks."""
    with model_lock(lm):
        return generate_steered(lm, prompts, **options)


def post(server: ServerThread, path: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url.removesuffix("/v1") + path, content=data, timeout=TIMEOUT,
                      headers={"Content-Type": "application/json", **(headers or {})})


def test_plain_completion_equals_greedy_generate_and_counts_token_ids(lm, server):
    reply = ask(server, max_tokens=6, logprobs=True, top_logprobs=2)
    text, n_new = reference(lm, PROMPT, 6)
    choice = reply.choices[0]
    assert choice.message.content == text and reply.model == "tiny-llama"
    assert reply.usage.prompt_tokens == len(prompt_ids(lm, PROMPT))
    assert reply.usage.completion_tokens == n_new
    assert choice.finish_reason == ("length" if n_new == 6 else "stop")
    assert choice.model_extra["steering"] is None
    first = choice.logprobs.content[0]
    with model_lock(lm), torch.inference_mode():
        logits = lm.model(torch.tensor([prompt_ids(lm, PROMPT)])).logits[0, -1].log_softmax(-1)
    values, ids = logits.topk(2)
    assert first.token == lm.tokenizer.decode([int(ids[0])])
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
    assert len(choice.logprobs.content) == n_new
    completion = client(server).completions.create(model="any", prompt="tell me", max_tokens=3, temperature=0)
    ids_ = lm.tokenizer("tell me")["input_ids"]
    with model_lock(lm):
        out = lm.model.generate(input_ids=torch.tensor([ids_]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert completion.choices[0].text == lm.tokenizer.decode(out[0, len(ids_):], skip_special_tokens=True)
    assert client(server).models.list().data[0].id == "tiny-llama"


def test_stream_is_openai_chunks_ending_done_and_joins_to_the_plain_reply(server):
    plain = ask(server, max_tokens=8).choices[0].message.content
    chunks = list(ask(server, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage.completion_tokens >= len(plain.split()) and chunks[-2].choices[0].finish_reason
    with httpx.stream("POST", server.url + "/chat/completions", timeout=TIMEOUT, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_whole_conversation_goes_through_the_chat_template_with_stop_sequences(lm, server):
    conversation = [{"role": "system", "content": "explain why"}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "cat dog"}, {"role": "user", "content": PROMPT}]
    reply = ask(server, conversation, max_tokens=8)
    text, _ = reference(lm, conversation, 8)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(prompt_ids(lm, conversation)) > len(prompt_ids(lm, PROMPT))
    assert text != reference(lm, PROMPT, 8)[0]  # the earlier turns matter
    words = text.split()
    cut = ask(server, conversation, max_tokens=8, stop=[words[2]])
    assert cut.choices[0].message.content == text[:text.index(words[2])]
    assert cut.choices[0].finish_reason == "stop"


def test_per_request_steering_equals_the_library_hooks(lm, server, axis):
    base = ask(server, max_tokens=8).choices[0].message.content
    flat = ask(server, max_tokens=8, steering={"vector": "axis", "layers": [1], "strength": 8.0}).choices[0]
    expected = steered(lm, [PROMPT], vectors=axis, layers=[1], alpha=8.0, max_new_tokens=8)[0]
    assert flat.message.content.strip() == expected["response"] and flat.message.content != base
    meta = flat.model_extra["steering"]
    assert meta["method"] == "flat" and meta["layers"] == [1] and meta["strength"] == 8.0
    assert meta["applied_norm"] == pytest.approx([8.0 * axis[1].double().norm().item()], rel=1e-9)
    dense = ask(server, max_tokens=8, steering={"method": "dense", "vector": "axis", "strength": 3.0,
                                                "scale": "applied_norm"}).choices[0]
    assert dense.message.content == reference(lm, PROMPT, 8, dense_steering(lm, axis, applied_norm=3.0))[0]
    assert dense.model_extra["steering"]["applied_norm"] == pytest.approx([3.0] * lm.n_layers)
    ablated = ask(server, max_tokens=8, steering={"method": "ablation", "vector": "axis"}).choices[0]
    assert ablated.message.content == reference(lm, PROMPT, 8, ablate_direction(lm, axis))[0]
    assert ask(server, max_tokens=8).choices[0].message.content == base  # hooks are gone


def test_registry_methods_equal_their_own_hooks(lm, server, axis, spline):
    weighted = {"method": "weighted-ablation", "vector": "axis", "strength": 0.7,
                "params": {"peak_position": 1, "width": 1.5, "floor": 0.2}}
    reply = ask(server, max_tokens=8, steering=weighted).choices[0]
    method = get_method("weighted-ablation", directions=axis, peak_position=1, width=1.5, floor=0.2)
    assert reply.message.content == reference(lm, PROMPT, 8, method.apply(lm, 0.7))[0]
    means = torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(4))
    ace = {"method": "ace", "vector": "axis", "layers": [1, 2], "strength": 2.0, "params": {"means": means.tolist()}}
    reply = ask(server, max_tokens=8, steering=ace).choices[0]
    method = get_method("ace", vectors=axis, means=means, layers=[1, 2])
    assert reply.message.content == reference(lm, PROMPT, 8, method.apply(lm, 2.0))[0]
    assert reply.model_extra["steering"]["applied_norm"] == pytest.approx([2.0, 2.0])  # beta |alpha|
    reply = ask(server, max_tokens=8, steering={"vector": "spline", "strength": 0.6}).choices[0]
    assert reply.message.content == reference(lm, PROMPT, 8, spline.apply(lm, 0.6))[0]
    assert reply.model_extra["steering"]["method"] == "spline-a"
    listed = {v["name"]: v for v in httpx.get(server.url + "/steering", timeout=TIMEOUT).json()["data"]}
    assert listed["spline"]["kind"] == "method" and listed["spline"]["params"]["t_range"] == [0.2, 0.8]
    with pytest.raises(openai.BadRequestError, match="outside the recorded coherent range"):
        ask(server, steering={"vector": "spline", "strength": 0.9})


def test_register_a_vector_list_it_and_steer_with_it(lm, server):
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    reply = post(server, "/v1/steering", {"name": "posted", "vector": direction.tolist(), "meta": {"by": "test"}})
    assert reply.status_code == 201 and reply.json()["shape"] == [lm.n_layers, lm.d_model]
    listed = {v["name"]: v for v in httpx.get(server.url + "/steering", timeout=TIMEOUT).json()["data"]}
    assert listed["posted"]["meta"] == {"by": "test"} and listed["posted"]["source"] == "POST /v1/steering"
    assert listed["axis"]["meta"] == {"method": "md"}
    reply = ask(server, max_tokens=6, steering={"vector": "posted", "layers": [0, 2], "strength": 5.0})
    vectors = direction.expand(lm.n_layers, -1)
    expected = steered(lm, [PROMPT], vectors=vectors, layers=[0, 2], alpha=5.0, max_new_tokens=6)[0]
    assert reply.choices[0].message.content.strip() == expected["response"]
    assert post(server, "/v1/steering", {"name": "posted", "vector": direction.tolist()}).status_code == 409
    assert post(server, "/v1/steering", {"name": "short", "vector": [1.0, 2.0]}).status_code == 400


@pytest.mark.parametrize("steering, status, words", [
    ({"method": "spin", "vector": "axis", "strength": 1.0}, 400, "unknown steering method 'spin'"),
    ({"method": "flat", "vector": "axis", "layers": "1", "strength": 1.0}, 400, "must be a list of block"),
    ({"method": "flat", "vector": "axis", "layers": [1, 1], "strength": 1.0}, 400, "repeats a block"),
    ({"method": "ace", "vector": "axis", "layers": [1], "strength": 1.0}, 400, "needs means"),
    ({"vector": "axis", "layers": [7], "strength": 1.0}, 400, "out of range"),
    ({"vector": "axis", "layers": [1], "strength": 1.0, "alpah": 1}, 400, "unknown field 'alpah'"),
    ({"vector": "nope", "layers": [1], "strength": 1.0}, 404, "unknown vector 'nope'"),
    ({"vector": "axis", "layers": [1], "strength": 1e6}, 400, "over the server's limit 100"),
    ({"vector": "axis", "layers": [1]}, 400, "strength is missing"),
])
def test_bad_steering_is_a_one_line_4xx_and_the_next_request_succeeds(server, steering, status, words):
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, steering=steering)
    assert caught.value.status_code == status
    message = caught.value.body["message"]
    assert words in message and "\n" not in message
    assert ask(server, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_bad_bodies_get_the_right_status(server):
    assert post(server, "/v1/chat/completions", b"{not json").status_code == 400
    assert "not valid JSON" in post(server, "/v1/chat/completions", b"{not json").json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "hi " * 3000}]}
    assert post(server, "/v1/chat/completions", big).status_code == 413
    assert post(server, "/v1/chat/completions", {"messages": []}).status_code == 400
    assert post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 500}).status_code == 400  # past the context
    unbounded = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "temperature": 0}).json()  # the default fits the context
    assert unbounded["usage"]["total_tokens"] <= 128
    assert httpx.get(server.url + "/nothing", timeout=TIMEOUT).status_code == 404
    assert ask(server, max_tokens=2).choices[0].message.content is not None


def test_batched_rows_equal_each_request_alone(lm, axis):
    state = build_state(lm, max_batch_size=16, batch_window_ms=400)
    state.vectors.add("axis", axis, source="test")
    requests = [
        (PROMPT, None, {}),
        (OTHER, {"vector": "axis", "layers": [1], "strength": 8.0}, {}),
        (PROMPT, {"vector": "axis", "layers": [1], "strength": -6.0, "positions": "all"}, {}),
        ("hello", {"method": "dense", "vector": "axis", "strength": 0.5}, {}),
        (PROMPT, {"method": "ablation", "vector": "axis", "strength": 1.0}, {}),
        (OTHER, None, {"temperature": 1.0, "seed": 3, "n": 2}),
        ("what is the capital of france", {"vector": "axis", "layers": [0, 2], "strength": 4.0,
                                           "component": "mlp"}, {"stop": ["dragon"]}),
        (OTHER, {"method": "weighted-ablation", "vector": "axis", "strength": 0.5, "params": {"width": 2.0}}, {}),
        (PROMPT, {"method": "ace", "vector": "axis", "layers": [1], "strength": 3.0,
                  "params": {"means": axis.flip(0).tolist()}}, {}),
    ]

    def one(server, prompt, steering, extra):
        fields = {"steering": steering} if steering else {}
        reply = ask(server, prompt, max_tokens=10, **{"temperature": 0, **extra, **fields})
        return [(c.message.content, c.finish_reason, c.model_extra["steering"]) for c in reply.choices]

    with ServerThread(state) as server:
        alone = [one(server, *request) for request in requests]
        assert state.engine.stats["largest_batch"] == 2  # the n=2 sampled request
        together: list[Any] = [None] * len(requests)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, one(server, *requests[i])))
                   for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert state.engine.stats["largest_batch"] == len(requests)  # every per-row request's rows in one batch
    assert together == alone
    assert len({choices[0][0] for choices in alone}) > 5  # the steerings differ


def test_conditional_steering_fires_by_projection(lm, axis):
    layer = 1
    captured = {}
    handle = lm.layout.blocks[layer].register_forward_hook(
        lambda _m, _i, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    xs = []
    for prompt in (PROMPT, OTHER):
        with torch.inference_mode():
            lm.model(torch.tensor([prompt_ids(lm, prompt)]))
        xs.append(captured["h"][0, -1].double())
    handle.remove()
    direction = axis[0] / axis[0].norm()
    first, second = (float(x @ direction.double()) for x in xs)
    threshold = (first + second) / 2
    gate = Condition("gate", direction, layer, threshold, "a")
    state = build_state(lm)
    state.vectors.add("axis", axis, source="test")
    state.conditions["gate"] = gate
    steering = {"vector": "axis", "layers": [1], "strength": 8.0, "condition": "gate"}
    with ServerThread(state) as server:
        replies = {p: ask(server, p, max_tokens=8, steering=steering).choices[0] for p in (PROMPT, OTHER)}
        top_level = ask(server, PROMPT, max_tokens=8, steering={k: v for k, v in steering.items() if k != "condition"},
                        condition="gate").choices[0]
    for prompt, projection in ((PROMPT, first), (OTHER, second)):
        meta = replies[prompt].model_extra["steering"]
        assert meta["condition"] == "gate" and meta["condition_fired"] is (projection > threshold)
        expected = steered(lm, [prompt], vectors=axis, layers=[1], alpha=8.0, max_new_tokens=8)[0]["response"]
        plain = reference(lm, prompt, 8)[0]
        assert replies[prompt].message.content.strip() == (expected if projection > threshold else plain.strip())
        assert meta["applied_norm"] == ([pytest.approx(8.0 * axis[1].norm().item())] if projection > threshold
                                        else [0.0])
    assert top_level.model_extra["steering"] == replies[PROMPT].model_extra["steering"]


def test_api_key_is_required_checked_and_never_logged(lm, caplog, monkeypatch):
    with pytest.raises(Exception, match="needs an API key"):
        api_key_from_env(None, "0.0.0.0")
    monkeypatch.setenv("TORSION_TEST_KEY", "sk-secret-7f3a9")
    key = api_key_from_env("TORSION_TEST_KEY", "0.0.0.0")
    state = build_state(lm, api_key=key)
    caplog.set_level(logging.DEBUG)
    with ServerThread(state, log_level="debug") as server:
        for bad in ("none", "sk-secret-7f3a"):
            with pytest.raises(openai.AuthenticationError) as caught:
                client(server, bad).models.list()
            assert "API key" in caught.value.body["message"]
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=TIMEOUT).status_code == 401
        reply = client(server, key).chat.completions.create(model="any", max_tokens=2, temperature=0,
                                                             messages=[{"role": "user", "content": PROMPT}])
        assert reply.choices[0].message.content is not None
    assert caplog.records and not any(key in record.getMessage() for record in caplog.records)
    assert key not in repr(state)


def test_best_threshold_by_hand():
    from torsion.serve.condition import best_threshold

    assert best_threshold(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == (1.5, 1.0)
    # candidates -1, 0.5, 1.5, 2.5 score 0.5, 0.75, 0.5, 0.75: the smallest best wins
    assert best_threshold(np.array([1.0, 3.0]), np.array([0.0, 2.0])) == (0.5, 0.75)


@pytest.fixture()
def condition_run(tmp_path):
    """A run directory with prompts and resid activations where category a sits +3 along e_0 at block 2."""
    from safetensors.torch import save_file

    from torsion.data.records import make_prompt, write_prompts_jsonl

    rng = torch.Generator().manual_seed(0)
    prompts = [dataclasses.replace(make_prompt(f"prompt {i}", "ab"[i % 2], "test"),
                                   split="train" if i < 30 else "holdout") for i in range(40)]
    resid = torch.randn(40, 3, 8, generator=rng)
    resid[0::2, 2, 0] += 3.0
    write_prompts_jsonl(tmp_path / "prompts.jsonl", prompts)
    save_file({"resid": resid}, str(tmp_path / "activations.safetensors"), metadata={"primary_position": "last"})
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"model_id": "tiny-llama"}}))
    return tmp_path, prompts, resid


def test_condition_fit_is_the_train_mean_difference_and_the_best_balanced_threshold(condition_run, capsys):
    from torsion.cli import main
    from torsion.serve.condition import balanced_accuracy, fit_condition, load_condition
    from torsion.store import RunDir

    root, prompts, resid = condition_run
    fitted = fit_condition(RunDir(root), "a")
    assert fitted.layer == 2 and fitted.meta["model_id"] == "tiny-llama"
    x = resid[:30, 2].double().numpy()
    inside, outside = x[0:30:2], x[1:30:2]
    diff = inside.mean(0) - outside.mean(0)
    assert fitted.direction.numpy() == pytest.approx(diff / np.linalg.norm(diff), abs=1e-6)
    unit = fitted.direction.double().numpy()
    projections_in, projections_out = inside @ unit, outside @ unit
    brute = max(balanced_accuracy(projections_in, projections_out, t)
                for t in np.concatenate([projections_in, projections_out]))
    assert fitted.meta["train_balanced_accuracy"] == pytest.approx(brute)
    assert balanced_accuracy(projections_in, projections_out, fitted.threshold) == pytest.approx(brute)
    assert fitted.meta["heldout_balanced_accuracy"] is not None
    assert main(["condition", "fit", str(root), "--category", "a", "--layer", "1"]) == 0
    assert "block 1" in capsys.readouterr().out
    loaded = load_condition(root / "condition-a.safetensors")
    assert loaded.layer == 1 and loaded.category == "a" and loaded.name == "a"
    assert main(["condition", "fit", str(root), "--category", "zzz"]) == 2
    assert "category 'zzz' has 0 train rows" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["serve", "--model", "nowhere", "--host", "0.0.0.0"], "needs an API key"),
    (["serve", "--model", "nowhere", "--api-key-env", "TORSION_UNSET_KEY_1"], "TORSION_UNSET_KEY_1 is unset"),
    (["serve", "--vector", "novalue"], "is not NAME=FILE:KEY"),
    (["serve", "--vector", "v=absent.safetensors:md/resid"], "does not exist"),
    (["serve", "--steering", "[1]"], "is not a JSON object"),
    (["serve", "--batch-window-ms", "-1"], "argument --batch-window-ms"),
])
def test_serve_arguments_fail_in_one_line_before_loading(args, message, capsys):
    from torsion.cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err


LONG = [{"role": "system", "content": "explain why " * 6}, {"role": "user", "content": PROMPT + " " + OTHER}]
STAGGERED = [  # (messages, steering spec, extra Job fields): mixed steering, short and long prompts
    (PROMPT, None, {}),
    (OTHER, {"vector": "axis", "layers": [1], "strength": 8.0}, {}),
    (LONG, {"method": "dense", "vector": "axis", "strength": 0.5}, {}),
    ("hello", {"vector": "axis", "layers": [0, 2], "strength": -6.0, "positions": "all"}, {}),
    (PROMPT, {"method": "ablation", "vector": "axis"}, {"max_tokens": 5}),
    (LONG, {"method": "ace", "vector": "axis", "layers": [1], "strength": 3.0}, {}),
    (OTHER, {"method": "weighted-ablation", "vector": "axis", "strength": 0.5, "params": {"width": 2.0}}, {}),
    (PROMPT, {"method": "ace", "vector": "axis", "layers": [1], "strength": 3.0}, {"stop": ("dragon",)}),
    ("what is the capital of france", None, {"temperature": 1.0, "seed": 7, "n": 2}),
    (LONG, {"vector": "axis", "layers": [2], "strength": 4.0, "component": "mlp"}, {"max_tokens": 3}),
]


def engine_jobs(lm, axis, max_batch_size: int = 16, continuous: bool = True, window_s: float = 0.0):
    """An engine over the tiny model and a ``run(indices, stagger)`` that returns each job's choices.

    ``stagger``: job ``k + 1`` is submitted when job ``k`` is admitted, from the engine thread, so
    it arrives while job ``k`` decodes; otherwise every job is submitted at once.
    """
    from torsion.serve.engine import Engine, Job
    from torsion.serve.steering import VectorRegistry, resolve_steering

    registry = VectorRegistry(lm)
    registry.add("axis", axis, source="test")
    means = axis.flip(0).tolist()
    engine = Engine(lm, max_batch_size=max_batch_size, batch_window_s=window_s, continuous=continuous).start()

    def run(indices: list[int], stagger: bool) -> list[list[tuple[str, str, int]]]:
        results: list[dict[int, tuple[str, str, int]]] = [{} for _ in indices]
        finished = threading.Semaphore(0)
        jobs: list[Job] = []

        def emit_for(k: int):
            def emit(event: dict[str, Any]) -> None:
                if event["type"] == "steering" and stagger and k + 1 < len(jobs):
                    engine.submit(jobs[k + 1])  # queued during job k's admission: it joins a later step
                if event["type"] == "error":
                    results[k][-1] = ("error", event["message"], 0)
                    finished.release()
                if event["type"] == "done":
                    results[k][event["choice"]] = (event["text"], event["finish_reason"], event["tokens"])
                    if len(results[k]) == jobs[k].n:
                        finished.release()
            return emit

        for k, index in enumerate(indices):
            messages, spec, extra = STAGGERED[index]
            if spec is not None and spec.get("method") == "ace":
                spec = {**spec, "params": {"means": means}}
            steering = resolve_steering(spec, lm, registry, {})
            jobs.append(Job(prompt_ids(lm, messages), extra.get("max_tokens", 12), emit_for(k), steering=steering,
                            **{key: value for key, value in extra.items() if key != "max_tokens"}))
        for k in range(len(jobs) if not stagger else 1):
            engine.submit(jobs[k])
        for _ in jobs:
            assert finished.acquire(timeout=TIMEOUT)
        return [[result[c] for c in sorted(result)] for result in results]

    return engine, run


def test_staggered_arrivals_join_the_running_batch_and_equal_each_request_alone(lm, axis):
    engine, run = engine_jobs(lm, axis)
    try:
        everyone = list(range(len(STAGGERED)))
        alone = [run([i], stagger=False)[0] for i in everyone]
        assert engine.stats["joined"] == 0 and engine.stats["largest_batch"] == 2  # the n=2 sampled request
        staggered = run(everyone, stagger=True)
        # each job arrives while the one before decodes: all but the first join a running lane, except a
        # hooked method's first row (its own lane) and the rows that find their lane gone
        assert engine.stats["joined"] >= 6 and engine.stats["largest_batch"] >= 4
        assert engine.mode == "continuous"
    finally:
        engine.close()
    assert staggered == alone
    assert alone[0][0][0] == reference(lm, PROMPT, 12)[0]
    assert len({choices[0][0] for choices in alone}) > 6  # the steerings differ


def test_continuous_batches_stay_within_max_batch_size_and_static_waits(lm, axis):
    everyone = list(range(len(STAGGERED)))
    engine, run = engine_jobs(lm, axis, max_batch_size=3)
    try:
        alone = [run([i], stagger=False)[0] for i in everyone]
        together = run(everyone, stagger=False)
        assert engine.stats["largest_batch"] <= 3 and engine.stats["joined"] > 0  # later jobs fill freed rows
    finally:
        engine.close()
    assert together == alone
    engine, run = engine_jobs(lm, axis, continuous=False)
    try:
        assert run(everyone, stagger=True) == alone
        assert engine.stats["joined"] == 0 and engine.mode == "static"
    finally:
        engine.close()


def forced_logprobs(lm, prompt: list[int], new: list[int]) -> torch.Tensor:
    """``[len(new), vocab]`` log-softmax of the model at each generated position (teacher forcing)."""
    with model_lock(lm), torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(-1)


def test_logprobs_in_openai_format_plain_and_streamed_for_chat_and_completions(lm, server):
    reply = ask(server, max_tokens=6, logprobs=True, top_logprobs=3)
    plain = reply.choices[0].logprobs.content
    chunks = list(ask(server, max_tokens=6, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in plain]
    assert len(plain) == reply.usage.completion_tokens
    ids = prompt_ids(lm, PROMPT)
    vocab = {lm.tokenizer.decode([i]): i for i in range(len(lm.tokenizer))}
    new = [vocab[e.token] for e in plain]
    expected = forced_logprobs(lm, ids, new)
    for row, entry in zip(expected, plain):
        values, top = row.topk(3)
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-5)  # greedy: the chosen token is the top
        assert [t.token for t in entry.top_logprobs] == [lm.tokenizer.decode([int(i)]) for i in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    assert ask(server, max_tokens=2, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert ask(server, max_tokens=2).choices[0].logprobs is None

    completions = client(server).completions
    text = completions.create(model="any", prompt="tell me", max_tokens=5, temperature=0, logprobs=2).choices[0]
    legacy = text.logprobs
    ids = lm.tokenizer("tell me")["input_ids"]
    expected = forced_logprobs(lm, ids, [vocab[t] for t in legacy.tokens])
    assert legacy.token_logprobs == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
    for row, token, top in zip(expected, legacy.tokens, legacy.top_logprobs):
        values, best = row.topk(2)
        assert top == pytest.approx({lm.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, best)},
                                    abs=1e-5)
        assert token in top  # greedy: the chosen token is one of the two
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:k]) for k in range(len(legacy.tokens))]
    stream = list(completions.create(model="any", prompt="tell me", max_tokens=5, temperature=0, logprobs=2,
                                     stream=True))
    pieces = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == legacy.tokens
    assert [o for p in pieces for o in p.text_offset] == legacy.text_offset
    assert [x for p in pieces for x in p.token_logprobs] == legacy.token_logprobs
    assert completions.create(model="any", prompt="tell me", max_tokens=2, temperature=0).choices[0].logprobs is None
    for bad, words in ((6, "between 0 and 5"), (True, "must be an integer")):
        with pytest.raises(openai.BadRequestError, match=words):
            completions.create(model="any", prompt="tell me", max_tokens=2, logprobs=bad)


def test_condition_eval_cli_writes_the_three_arms_and_fails_in_one_line(tiny_run, capsys):
    from torsion.behaviour import correct_rows
    from torsion.cli import main
    from torsion.judge.correction import refusal_rate
    from torsion.runs import labelled_prompts
    from torsion.serve.condition import condition_search, fit_condition, save_condition
    from torsion.store import RunDir

    run = RunDir(tiny_run)
    args = ["condition", "eval", str(tiny_run), "--category", "a", "--judge", "rules"]
    for extra, message in (([], "optimize_comply-global.json does not exist"),
                           (["--study", "other"], "optimize_other.json does not exist")):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("torsion: error: ") and message in err and len(err.strip().splitlines()) == 1
    (tiny_run / "analysis").mkdir(exist_ok=True)
    search = tiny_run / "analysis" / "optimize_comply-global.json"
    search.write_text(json.dumps({"alpha": -4.0, "layers": [1]}))
    assert condition_search(run, "comply-global") == (-4.0, [1], "all")  # a search without positions steered all
    search.write_text(json.dumps({"alpha": -4.0, "layers": [1], "settings": {"positions": "last"}}))
    assert condition_search(run, "comply-global") == (-4.0, [1], "last")
    fitted = fit_condition(run, "a")
    never = save_condition(dataclasses.replace(fitted, threshold=1e9), tiny_run / "never.safetensors")
    always = save_condition(dataclasses.replace(fitted, threshold=-1e9), tiny_run / "always.safetensors")
    for extra, message in ((["--condition", str(tiny_run / "absent.safetensors")], "does not exist"),
                           (["--condition", str(never), "--category", "b"], "gates category 'a', not 'b'")):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["condition", "fit", str(tiny_run), "--category", "a", "--study", "x"]) == 2
    assert "--study is an option of `torsion condition eval`" in capsys.readouterr().err
    assert main(["condition", "eval", str(tiny_run / "nowhere"), "--category", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err

    out = tiny_run / "analysis" / "condition_a.json"
    results = {}
    for name, extra in (("fit", []), ("never", ["--condition", str(never)]), ("always", ["--condition", str(always)])):
        assert main(args + extra) == 0
        assert capsys.readouterr().out.strip() == str(out)
        results[name] = json.loads(out.read_text())
    prompts, rows = labelled_prompts(run)
    held = [i for i, p in enumerate(prompts) if p.split == "holdout"]
    inside = [i for i in held if prompts[i].category == "a"]
    outside = [i for i in held if prompts[i].category != "a"]
    assert inside and outside
    for name, result in results.items():
        assert result["fired"]["n_targeted"] == len(inside) and result["fired"]["n_others"] == len(outside)
        assert result["steering"] == {"method": "flat", "vector": "md/resid", "alpha": -4.0, "layers": [1],
                                      "positions": "last", "study": "comply-global"}
        for scope, ids in (("targeted", inside), ("others", outside)):
            base = correct_rows([prompts[i].prompt for i in ids], [rows[i]["response"] for i in ids],
                                [rows[i]["label"] for i in ids])
            assert result["arms"]["unsteered"][scope]["refused"] == refusal_rate(base)
    assert results["fit"]["condition"]["layer"] == fitted.layer
    assert results["fit"]["condition"]["threshold"] == pytest.approx(fitted.threshold)
    arms = results["never"]["arms"]
    assert arms["conditional"] == arms["unsteered"] and results["never"]["fired"]["targeted"] == 0
    arms = results["always"]["arms"]
    assert arms["conditional"] == arms["unconditional"] and results["always"]["fired"]["others"] == len(outside)
    assert results["always"]["arms"]["unconditional"] == results["fit"]["arms"]["unconditional"]
    assert results["fit"]["arms"]["unconditional"] != results["fit"]["arms"]["unsteered"]  # the arms differ
