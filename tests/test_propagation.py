"""Causal propagation on tiny random models, against explicit forwards and hand-computed cosines."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_lm

import torsion.analysis.propagation as propagation
import torsion.steering.flat as flat_module
from torsion.analysis.propagation import back_half_layers, propagate, propagation_table, run_propagation
from torsion.capture import capture_batch, encode, output_tensor
from torsion.errors import TorsionError
from torsion.report.geometry_figures import propagation_figure
from torsion.steer import add_steering
from torsion.data import make_prompt, read_prompts_jsonl, sample, write_prompts_jsonl
from torsion.store import RunDir
from torsion.vectors import SteeringVector, save_vectors

PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and knight", "why is the sky blue"]
N_LAYERS = 4



@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama", n_layers=N_LAYERS)


def axis_for(lm, seed: int = 1) -> torch.Tensor:
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def explicit_last_token_states(lm, component: str, hook=None) -> dict[str, torch.Tensor]:
    """One full decoder forward; ``{component, resid}`` outputs at the last token, ``[batch, n_layers, d]``."""
    seen = {name: [None] * lm.n_layers for name in (component, "resid")}
    handles = []
    for name in seen:
        for layer in range(lm.n_layers):
            def record(_m, _i, out, name=name, layer=layer):
                seen[name][layer] = output_tensor(out)[:, -1].double()
            handles.append(lm.layout.component_module(name, layer).register_forward_hook(record))
    if hook is not None:
        handles.append(hook())
    try:
        lm.layout.decoder(**encode(lm, PROMPTS), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.stack(states, dim=1) for name, states in seen.items()}


@pytest.mark.parametrize("component, positions", [("attn", "last"), ("resid", "all"), ("mlp", "all")])
def test_matches_two_explicit_forwards_and_hand_cosines(llama, component, positions):
    axis, resid_axis, alpha, source = axis_for(llama, 1), axis_for(llama, 2), -1.5, 1
    result = propagate(llama, PROMPTS, axis, sources=[source], alpha=alpha, component=component,
                       positions=positions, resid_axis=resid_axis, batch_size=3)

    delta = alpha * axis[source]

    def manual_hook():
        def add(_m, _i, out):
            hidden = output_tensor(out).clone()
            if positions == "all":
                hidden += delta
            else:
                hidden[:, -1] += delta
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        return llama.layout.component_module(component, source).register_forward_hook(add, prepend=True)

    base = explicit_last_token_states(llama, component)
    steered = explicit_last_token_states(llama, component, manual_hook)
    rows = {r["layer"]: r for r in result["rows"]}
    assert sorted(rows) == list(range(source, N_LAYERS))
    for stream, name, v in (("component", component, axis), ("resid", "resid", resid_axis)):
        for layer in range(source, N_LAYERS):
            dh = steered[name][:, layer] - base[name][:, layer]  # [n_prompts, d]
            cos_axis = F.cosine_similarity(dh, v[layer].double()[None], dim=-1).mean()
            cos_source = F.cosine_similarity(dh, axis[source].double()[None], dim=-1).mean()
            ratio = dh.norm(dim=-1).mean() / delta.double().norm()
            assert rows[layer][f"cos_dh_axis_{stream}"] == pytest.approx(float(cos_axis), abs=1e-5)
            assert rows[layer][f"cos_dh_source_{stream}"] == pytest.approx(float(cos_source), abs=1e-5)
            assert rows[layer][f"norm_ratio_{stream}"] == pytest.approx(float(ratio), rel=1e-5)
    assert result["applied_norm"] == {str(source): pytest.approx(1.5 * float(axis[source].double().norm()))}
    assert result["conventions"]["positions"] == positions and result["conventions"]["cosine"] == "signed"
    assert result["n_prompts"] == len(PROMPTS)


@pytest.mark.parametrize("alpha", [-1.0, 0.7])
@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
def test_cosine_at_source_is_the_sign_of_alpha(llama, alpha, component):
    result = propagate(llama, PROMPTS, axis_for(llama), sources=[0, 2], alpha=alpha, component=component,
                       positions="last")
    at_source = [r for r in result["rows"] if r["layer"] == r["source"]]
    assert len(at_source) == 2
    for row in at_source:
        assert row["cos_dh_axis_component"] == pytest.approx(1.0 if alpha > 0 else -1.0, abs=1e-5)
        assert row["cos_dh_source_component"] == pytest.approx(1.0 if alpha > 0 else -1.0, abs=1e-5)
        assert row["norm_ratio_component"] == pytest.approx(1.0, abs=1e-5)
    downstream = [r["cos_dh_axis_component"] for r in result["rows"] if r["layer"] > r["source"]]
    assert all(abs(c) < 0.999 for c in downstream)  # the perturbation does not stay on a random axis


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_fast_path_equals_full_steered_forward(family, positions):
    lm = tiny_lm(family, n_layers=N_LAYERS, seed=3)
    axis, source = axis_for(lm), 1
    base, inputs = propagation._base_pass(lm, PROMPTS, ("resid", "mlp"), source)
    with add_steering(lm, axis, layers=[source], alpha=-2.0, component="mlp", positions=positions):
        fast = propagation._replayed_states(lm, inputs, ("resid", "mlp"), source)
        full = capture_batch(lm, PROMPTS, components=("resid", "mlp"))
    for name in ("resid", "mlp"):
        reference = full[name]["last"][:, source:]
        assert not torch.allclose(reference, base[name][:, source:])  # the steering changed something
        gap = (fast[name] - reference).abs().max() / reference.abs().max()
        assert gap <= 1e-4
    fast_result = propagate(lm, PROMPTS, axis, sources=[1, 2], positions=positions, batch_size=3)
    full_result = propagate(lm, PROMPTS, axis, sources=[1, 2], positions=positions, batch_size=3, fast=False)
    assert fast_result["fast_path"] is True and full_result["fast_path"] is False
    for fast_row, full_row in zip(fast_result["rows"], full_result["rows"]):
        for key, value in full_row.items():
            assert fast_row[key] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_unsafe_replay_falls_back_to_the_full_forward(llama, monkeypatch):
    axis = axis_for(llama)
    reference = propagate(llama, PROMPTS, axis, sources=[2], fast=False)
    real_replay = propagation._replayed_states
    monkeypatch.setattr(propagation, "_replayed_states",  # a replay that drifts 1% from the base pass
                        lambda *args: {c: states * 1.01 for c, states in real_replay(*args).items()})
    result = propagate(llama, PROMPTS, axis, sources=[2])
    assert result["fast_path"] is False and result["fast_path_check"]["requested"] is True
    assert result["fast_path_check"]["max_relative_gap"] == pytest.approx(0.01, rel=1e-3)
    assert "fell back" in result["fast_path_check"]["note"]
    assert result["rows"] == reference["rows"]


def test_back_half_layers():
    assert back_half_layers(24) == [12, 16, 19, 23]
    assert back_half_layers(32, k=4) == [16, 21, 26, 31]
    assert back_half_layers(3) == [1, 2]


def test_table_has_the_write_up_rows(llama):
    result = propagate(llama, PROMPTS, axis_for(llama), sources=[0, 1], alpha=-1.0)
    table = propagation_table(result).splitlines()
    assert table[0] == "| Downstream layer | src=0 | src=1 | norm_ratio (src=0) |"
    assert table[2] == "| src (injection) | -1.000 | -1.000 | 1.000 |"
    assert table[3].startswith("| src + 1 |")
    assert table[-1].startswith(f"| {N_LAYERS - 1} (final) |")
    rows = {(r["source"], r["layer"]): r for r in result["rows"]}
    assert table[4].split("|")[:5] == ["", " 2 ", f" {rows[0, 2]['cos_dh_axis_component']:+.3f} ",
                                       f" {rows[1, 2]['cos_dh_axis_component']:+.3f} ",
                                       f" {rows[0, 2]['norm_ratio_component']:.3f} "]


def test_run_propagation_reads_the_run_and_writes_json_and_figure(llama, tmp_path):
    run = RunDir(tmp_path / "run")
    write_prompts_jsonl(run.prompts_path, [replace(make_prompt(f"{p} {i}", "x", "test"), split=split)
                                           for i, (p, split) in enumerate(zip(PROMPTS * 2, ["train", "holdout"] * 4))])
    axis, resid_axis = axis_for(llama, 1), axis_for(llama, 2)
    save_vectors(run.vectors_path, {"md/attn": SteeringVector(axis), "md/resid": SteeringVector(resid_axis)},
                 run_meta={})
    run.update_manifest(seed=5)
    result = run_propagation(run.root, llama, sources=[2], component="attn", n_prompts=3)
    saved = json.loads(run.analysis_path("propagation").read_text())
    assert saved == json.loads(json.dumps(result))
    assert not run.analysis_path("propagation").with_suffix(".png").exists()  # analyses return data; report/ draws
    assert propagation_figure(saved, tmp_path / "propagation.png").read_bytes().startswith(b"\x89PNG")
    assert saved["conventions"]["axis"] == "md/attn" and saved["conventions"]["resid_axis"] == "md/resid"
    assert saved["seed"] == 5 and saved["n_prompts"] == 3 and saved["conventions"]["split"] == "train"
    train = [p for p in read_prompts_jsonl(run.prompts_path) if p.split == "train"]
    expected = propagate(llama, [p.prompt for p in sample(train, 3, seed=5)], axis, sources=[2], component="attn",
                         resid_axis=resid_axis)
    assert saved["rows"] == [pytest.approx(row) for row in expected["rows"]]


def test_a_replay_that_is_right_only_without_steering_falls_back(llama, monkeypatch):
    """The unsteered replay matches the base pass; a steered one drifts 1%: the check must see it."""
    axis = axis_for(llama)
    reference = propagate(llama, PROMPTS, axis, sources=[1, 2], fast=False)
    steering_on = []
    real_add_steering, real_replay = flat_module.add_steering, propagation._replayed_states

    @contextmanager
    def flagged_add_steering(*args, **kwargs):
        with real_add_steering(*args, **kwargs) as record:
            steering_on.append(True)
            try:
                yield record
            finally:
                steering_on.pop()

    def drifting_replay(*args):
        states = real_replay(*args)
        return {c: x * 1.01 for c, x in states.items()} if steering_on else states

    monkeypatch.setattr(flat_module, "add_steering", flagged_add_steering)  # what the default flat method calls
    monkeypatch.setattr(propagation, "_replayed_states", drifting_replay)
    result = propagate(llama, PROMPTS, axis, sources=[1, 2])
    check = result["fast_path_check"]
    assert check["unsteered_gap"] < 1e-6 and check["steered_gap"] == pytest.approx(0.01, rel=1e-3)
    assert result["fast_path"] is False and "the steered replay differed" in check["note"]
    assert result["rows"] == reference["rows"]


@pytest.mark.parametrize("sources", [[-1], [0, 4], [99]])
def test_sources_outside_the_model_are_refused(llama, sources):
    with pytest.raises(TorsionError, match=rf"source layer {sources[-1]} is out of range; this model has blocks 0..3"):
        propagate(llama, PROMPTS, axis_for(llama), sources=sources)


def ace_for(lm, source: int, seed: int = 3):
    from torsion.steering import get_method

    means = torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(seed))
    return get_method("ace", vectors=axis_for(lm, 1), means=means, layers=[source], positions="all")


@pytest.mark.parametrize("fast", [True, False])
def test_a_replacement_method_is_injected_and_its_norm_ratio_divides_by_mean_delta(llama, fast):
    """ACE at block 1: ``‖h' − h‖ = |α − (h − μ)·v̂|`` per token (β = 1), averaged over every steered token."""
    source, alpha, prompt = 1, 0.7, ["tell me a story about the dragon and knight"]  # one prompt: no padding
    method = ace_for(llama, source)
    seen = []
    handle = llama.layout.component_module("resid", source).register_forward_hook(
        lambda _m, _i, out: seen.append(output_tensor(out).double()))
    with torch.inference_mode():
        llama.layout.decoder(**encode(llama, prompt), use_cache=False)
    handle.remove()
    unit = F.normalize(method.vectors[source].double(), dim=0)
    expected = (alpha - (seen[0][0] - method.means[source].double()) @ unit).abs().mean()
    result = propagate(llama, prompt, axis_for(llama, 1), sources=[source], alpha=alpha, method=method, fast=fast)
    assert result["applied_norm"]["1"] == pytest.approx(float(expected), rel=1e-5)
    assert result["method"]["name"] == "ace" and result["conventions"]["method"] == "ace"
    assert "‖h' − h‖" in result["conventions"]["norm_ratio"]
    full = propagate(llama, prompt, axis_for(llama, 1), sources=[source], alpha=alpha, method=method, fast=False)
    for got, want in zip(result["rows"], full["rows"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_an_explicit_flat_method_equals_the_default(llama):
    from torsion.steering import get_method

    axis = axis_for(llama)
    default = propagate(llama, PROMPTS, axis, sources=[1, 2], alpha=-1.5, positions="last")
    flat = get_method("flat", vectors=axis, layers=[0], positions="last")
    explicit = propagate(llama, PROMPTS, axis, sources=[1, 2], alpha=-1.5, positions="last", method=flat)
    assert explicit["rows"] == default["rows"] and explicit["applied_norm"] == default["applied_norm"]
    assert default["applied_norm"]["2"] == pytest.approx(1.5 * float(axis[2].double().norm()))


def test_a_method_without_layers_cannot_be_injected_at_one_block(llama):
    from torsion.steering import get_method

    with pytest.raises(TorsionError, match="steers every block at once"):
        propagate(llama, PROMPTS, axis_for(llama), sources=[1], method=get_method("ablation", directions=axis_for(llama)))


def test_run_propagation_takes_a_method_by_name(llama, tmp_path):
    run = RunDir(tmp_path / "run")
    write_prompts_jsonl(run.prompts_path, [replace(make_prompt(f"{p} {i}", "x", "test"), split="train")
                                           for i, p in enumerate(PROMPTS)])
    save_vectors(run.vectors_path, {"md/resid": SteeringVector(axis_for(llama, 1))}, run_meta={})
    run.update_manifest(seed=5)
    means = ace_for(llama, 1).means
    result = run_propagation(run.root, llama, sources=[1, 2], n_prompts=2, alpha=0.5, steering="ace",
                             steering_params={"means": means, "beta": 0.5})
    assert result["method"]["name"] == "ace" and result["method"]["params"]["beta"] == 0.5
    assert json.loads(run.analysis_path("propagation").read_text())["method"]["name"] == "ace"
    assert result["applied_norm"]["1"] > 0 and result["applied_norm"]["1"] != pytest.approx(0.25)
