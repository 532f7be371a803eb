"""Random-direction control: norm matching, the fast path against the naive loop, summaries, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_lm

import torsion.analysis.random_control as random_control_module
from torsion.analysis.random_control import (naive_kls, random_control, random_directions, run_random_control,
                                             summarize_kls)
from torsion.capture import encode
from torsion.data import load_source, sample
from torsion.metrics import kl_divergence, kl_divergences, next_token_logprobs
from torsion.replay import last_token_inputs
from torsion.errors import TorsionError
from torsion.report.geometry_figures import random_control_figure
from torsion.store import RunDir
from torsion.vectors import SteeringVector, save_vectors

PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and knight", "why is the sky blue",
           "write a poem about a cat"]
# Same length, so no padding: Hugging Face's eager attention turns float64 padding rows into NaN.
UNPADDED = ["how do i bake bread", "tell me a story please", "what is capital of france", "why is the sky blue"]
N_LAYERS, N_RANDOM = 4, 6



def axis_for(lm) -> torch.Tensor:
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(1))


def all_kls(result: dict) -> np.ndarray:
    """Every steering and random KL of a result, in a fixed order."""
    values = []
    for arms in result["layers"].values():
        for arm in arms.values():
            for direction in ("kl_base_to_steered", "kl_steered_to_base"):
                values += [arm[direction]["steering"], *arm[direction]["random"]]
    return np.array(values)


@pytest.mark.parametrize("family, component, positions", [("llama", "resid", "all"), ("qwen2", "mlp", "last"),
                                                           ("llama", "attn", "all"), ("qwen2", "resid", "last"),
                                                           ("gemma2", "resid", "all"), ("gemma2", "attn", "last")])
@pytest.mark.parametrize("dtype, rtol, atol, prompts", [(torch.float64, 1e-5, 0, UNPADDED),
                                                        (torch.float32, 1e-4, 1e-7, PROMPTS)])
def test_fast_path_equals_naive_loop(family, component, positions, dtype, rtol, atol, prompts):
    # float64 isolates the algorithm; in float32 the batched LM head rounds differently, ~1e-7 in
    # log-probs, which is ~5e-6 of these KLs (up to 1e-4 of Gemma 2's small ones, ~1e-7 absolute)
    lm = tiny_lm(family, n_layers=N_LAYERS, seed=2)
    lm.model.to(dtype)
    options = dict(layers=[1, 3], alpha=0.8, component=component, positions=positions, n_random=N_RANDOM, seed=4,
                   batch_size=2)  # layer 3 is the last block: a resid step there replays no block at all
    fast = random_control(lm, prompts, axis_for(lm), **options)
    naive = random_control(lm, prompts, axis_for(lm), fast=False, **options)
    assert fast["fast_path"] is True and naive["fast_path"] is False
    fast_kls, naive_kls_ = all_kls(fast), all_kls(naive)
    assert len(fast_kls) == 2 * 2 * 2 * (1 + N_RANDOM)
    assert naive_kls_.min() > 1e-4  # the steps move the distribution, so the comparison means something
    np.testing.assert_allclose(fast_kls, naive_kls_, rtol=rtol, atol=atol)


def test_fast_path_batches_many_directions_like_one_at_a_time():
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    steps = random_directions(lm.d_model, 5, 2.0, seed=0)
    batched, gaps = random_control_module.fast_kls(lm, PROMPTS, {2: steps}, batch_size=3, max_rows=1000)
    one_by_one = naive_kls(lm, PROMPTS, 2, steps, batch_size=3)
    assert set(gaps) == {"unsteered", "steered"} and max(gaps.values()) < 1e-5
    for name, values in one_by_one.items():
        torch.testing.assert_close(batched[2][name], values, rtol=1e-4, atol=0)


def test_unsafe_replay_falls_back_to_the_naive_loop(monkeypatch):
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    options = dict(layers=[2], n_random=N_RANDOM, seed=1)
    naive = random_control(lm, PROMPTS, axis_for(lm), fast=False, **options)
    real_replay = random_control_module._replay_logprobs
    monkeypatch.setattr(random_control_module, "_replay_logprobs",  # a replay that drifts from the base pass
                        lambda *args, **kwargs: real_replay(*args, **kwargs) * 1.01)
    result = random_control(lm, PROMPTS, axis_for(lm), **options)
    assert result["fast_path"] is False and result["fast_path_check"]["requested"] is True
    assert result["fast_path_check"]["max_relative_gap"] == pytest.approx(0.01, rel=1e-3)
    assert "fell back to the naive loop" in result["fast_path_check"]["note"]
    assert result["layers"] == naive["layers"]


def test_random_directions_have_exactly_the_applied_norm_and_are_seeded():
    directions = random_directions(64, 50, 3.7, seed=11)
    assert directions.shape == (50, 64) and directions.dtype == torch.float32
    torch.testing.assert_close(directions.double().norm(dim=1), torch.full((50,), 3.7, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.equal(directions, random_directions(64, 50, 3.7, seed=11))
    assert not torch.equal(directions, random_directions(64, 50, 3.7, seed=12))
    cosines = torch.nn.functional.normalize(directions, dim=1) @ torch.nn.functional.normalize(directions, dim=1).T
    assert cosines.fill_diagonal_(0).abs().max() < 0.6  # distinct directions, not one repeated


def test_steering_and_random_arms_share_the_applied_norm(monkeypatch):
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    axis, alpha, seen = axis_for(lm), -2.5, {}

    def recording_fast_kls(lm_, prompts, steps, **kwargs):
        seen.update(steps)
        return real_fast_kls(lm_, prompts, steps, **kwargs)

    real_fast_kls = random_control_module.fast_kls
    monkeypatch.setattr(random_control_module, "fast_kls", recording_fast_kls)
    result = random_control(lm, PROMPTS, axis, layers=[2], alpha=alpha, n_random=N_RANDOM)
    applied = abs(alpha) * float(axis[2].double().norm())
    assert result["applied_norm"] == {"2": pytest.approx(applied)}
    assert result["layers"]["2"]["-alpha"]["applied_norm"] == pytest.approx(applied)
    norms = seen[2].double().norm(dim=1)  # [+αv, −αv, N random, N negated random]
    assert len(norms) == 2 + 2 * N_RANDOM
    torch.testing.assert_close(norms, torch.full_like(norms, applied), rtol=1e-5, atol=0)
    torch.testing.assert_close(seen[2][0], (alpha * axis[2].double()).float())
    torch.testing.assert_close(seen[2][2 + N_RANDOM:], -seen[2][2:2 + N_RANDOM])


def test_summary_percentile_rank_and_privilege_on_a_hand_built_case():
    randoms = [0.1 * k for k in range(1, 11)]  # 0.1 … 1.0
    below = summarize_kls(0.05, randoms)
    assert below["geometric_privilege"] is True and below["percentile_rank"] == 0.0
    assert below["random_min"] == pytest.approx(0.1) and below["random_max"] == pytest.approx(1.0)
    assert below["random_mean"] == pytest.approx(0.55) and below["random_median"] == pytest.approx(0.55)
    assert below["random_p5"] == pytest.approx(0.145)  # linear: 0.1 + 0.45 · 0.1
    assert below["random_p95"] == pytest.approx(0.955)
    middle = summarize_kls(0.55, randoms)
    assert middle["geometric_privilege"] is False and middle["percentile_rank"] == pytest.approx(50.0)
    tie = summarize_kls(0.1, randoms)  # equal to the minimum: not below it, and not above any
    assert tie["geometric_privilege"] is False and tie["percentile_rank"] == 0.0
    assert summarize_kls(2.0, randoms)["percentile_rank"] == 100.0


def test_result_is_reproducible_and_names_its_conventions():
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    options = dict(layers=[3], alpha=1.0, n_random=N_RANDOM, seed=9)
    first = random_control(lm, PROMPTS, axis_for(lm), **options)
    assert random_control(lm, PROMPTS, axis_for(lm), **options) == first
    other_seed = random_control(lm, PROMPTS, axis_for(lm), **{**options, "seed": 10})
    assert all_kls(other_seed)[1] != all_kls(first)[1]  # first random direction differs
    assert all_kls(other_seed)[0] == all_kls(first)[0]  # the steering arm does not depend on the seed
    assert first["conventions"]["norm_matched"] == "random directions scaled to ||alpha v||"
    arm = first["layers"]["3"]["+alpha"]
    assert set(arm) == {"alpha", "applied_norm", "kl_base_to_steered", "kl_steered_to_base", "geometric_privilege"}
    kl = arm["kl_base_to_steered"]
    assert arm["geometric_privilege"] == kl["geometric_privilege"] == (kl["steering"] < min(kl["random"]))
    assert first["layers"]["3"]["-alpha"]["alpha"] == -1.0 and first["seed"] == 9 and first["n_random"] == N_RANDOM


def test_run_random_control_writes_json_and_figure(tmp_path):
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    run = RunDir(tmp_path / "run")
    save_vectors(run.vectors_path, {"md/resid": SteeringVector(axis_for(lm))}, run_meta={})
    run.update_manifest(seed=3)
    result = run_random_control(run.root, lm, layers=[2], n_random=N_RANDOM, n_prompts=3)
    saved = json.loads(run.analysis_path("random_control").read_text())
    assert saved == json.loads(json.dumps(result))
    assert not run.analysis_path("random_control").with_suffix(".png").exists()  # analyses return data
    assert random_control_figure(saved, tmp_path / "rc.png").read_bytes().startswith(b"\x89PNG")
    assert saved["seed"] == 3 and saved["n_prompts"] == 3 and saved["conventions"]["vector"] == "md/resid"
    assert saved["schema_version"] == 1 and saved["analysis"] == "random_control"
    assert saved["conventions"]["positions"] == "last"  # the default: the position the first-token KL reads
    assert saved["fast_path"] and saved["fast_path_check"]["replayed_tokens"].startswith("the final prompt token")
    neutral = [p.prompt for p in sample(load_source("neutral"), 3, seed=3)]  # the shipped set, seeded sample
    expected = random_control(lm, neutral, axis_for(lm), layers=[2], n_random=N_RANDOM, seed=3, vector_name="md/resid")
    assert saved["layers"] == json.loads(json.dumps(expected["layers"]))


@pytest.mark.parametrize("layers, fast", [([-1], True), ([-1], False), ([99], True), ([1, 4], False)])
def test_blocks_outside_the_model_are_refused(layers, fast):
    # -1 used to pass the fast path and steer the embedding output under the label "-1"; 99 was an IndexError
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    with pytest.raises(TorsionError, match=rf"layer {layers[-1]} is out of range; this model has blocks 0..3"):
        random_control(lm, PROMPTS, axis_for(lm), layers=layers, n_random=2, fast=fast)


def test_a_replay_that_is_right_only_without_steering_falls_back(monkeypatch):
    """The unsteered check passes (a zero step is unchanged) but the steered replay adds 1.5 times the step."""
    lm = tiny_lm("llama", n_layers=N_LAYERS)
    options = dict(layers=[1], n_random=N_RANDOM, seed=1, alpha=2.0)
    naive = random_control(lm, PROMPTS, axis_for(lm), fast=False, **options)
    real_add_rows = random_control_module._add_rows
    monkeypatch.setattr(random_control_module, "_add_rows",
                        lambda hidden, steps, positions: real_add_rows(hidden, 1.5 * steps, positions))
    result = random_control(lm, PROMPTS, axis_for(lm), **options)
    check = result["fast_path_check"]
    assert check["unsteered_gap"] < 1e-5 and check["steered_gap"] > 1e-4
    assert result["fast_path"] is False and "the steered replay differed" in check["note"]
    assert result["layers"] == naive["layers"]


def test_the_steered_check_compares_with_the_full_steered_forward():
    lm = tiny_lm("qwen2", n_layers=N_LAYERS)
    result = random_control(lm, PROMPTS, axis_for(lm), layers=[2], n_random=2, alpha=3.0)
    check = result["fast_path_check"]
    assert result["fast_path"] is True and check["used"] is True
    assert 0 < check["steered_gap"] <= check["max_relative_gap"] <= 1e-4 and check["tolerance"] == 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
@pytest.mark.parametrize("dtype, prompts", [(torch.float64, UNPADDED), (torch.float32, PROMPTS)])
def test_last_position_replay_equals_the_full_forward_steering_the_last_position(family, component, dtype, prompts):
    """One token replayed on the prefix's KV cache = a full forward with the step added at the last position."""
    lm = tiny_lm(family, n_layers=N_LAYERS, seed=5)
    lm.model.to(dtype)
    steps = random_directions(lm.d_model, 3, 4.0, seed=7)
    inputs, logits = last_token_inputs(lm, encode(lm, prompts), 1)
    assert inputs.hidden(1).shape[:2] == (len(prompts), 1) and inputs.prefix_cache is not None
    torch.testing.assert_close(torch.log_softmax(logits.float(), -1), next_token_logprobs(lm, prompts),
                               atol=1e-5, rtol=0)
    for layer in (1, 2, 3):
        replayed = random_control_module._replay_logprobs(lm, inputs, layer, steps, component=component,
                                                          positions="last")  # [3, batch, vocab]
        again = random_control_module._replay_logprobs(lm, inputs, layer, steps[:1], component=component,
                                                       positions="last")
        torch.testing.assert_close(again[0], replayed[0], atol=1e-5, rtol=0)  # the prefix cache is not extended
        for i, step in enumerate(steps):
            full = next_token_logprobs(lm, prompts, steer=random_control_module._steering(
                lm, layer, step, component=component, positions="last"))
            assert (full - next_token_logprobs(lm, prompts)).abs().max() > 1e-3  # the step moved the distribution
            torch.testing.assert_close(replayed[i], full, atol=1e-5, rtol=0)


def test_both_kl_directions_at_once_equal_two_kl_divergence_calls_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    base = torch.log_softmax(3 * torch.randn(4, 50, generator=generator), -1)  # [batch, vocab]
    steered = torch.log_softmax(3 * torch.randn(6, 4, 50, generator=generator), -1)  # [steps, batch, vocab]
    forward, backward = kl_divergences(base[None], steered)
    assert torch.equal(forward, kl_divergence(base.expand_as(steered), steered))
    assert torch.equal(backward, kl_divergence(steered, base.expand_as(steered)))
    masked = base.clone()
    masked[0, 0] = -torch.inf  # p = 0 for one token: its term is 0 one way, the other way KL is infinite
    forward, backward = kl_divergences(masked, steered[0])
    assert torch.equal(forward, kl_divergence(masked, steered[0])) and torch.isfinite(forward).all()
    assert torch.equal(backward, kl_divergence(steered[0], masked)) and backward[0] == torch.inf


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # gemma2: final norm with an offset, logit soft-cap
def test_head_block_kls_equal_kl_divergences_of_the_head_logprobs(family, monkeypatch):
    """The fast path's LM-head blocks with a per-row KL = kl_divergences on the whole [steps, batch, vocab]."""
    lm = tiny_lm(family, n_layers=N_LAYERS, seed=3)
    monkeypatch.setattr(random_control_module, "HEAD_ROWS", 4)  # 15 rows: blocks of 4, 4, 4, 3
    generator = torch.Generator().manual_seed(0)
    batch, n_steps = 3, 5
    hidden = 3 * torch.randn(n_steps * batch, 2, lm.d_model, generator=generator)
    base = torch.log_softmax(3 * torch.randn(batch, len(lm.tokenizer), generator=generator), -1)
    base[1, 0] = -torch.inf  # p = 0 for one token of prompt 1: that prompt's rows take kl_divergences' own path
    steered = random_control_module._head_logprobs(lm, hidden).reshape(n_steps, batch, -1)
    forward, backward = random_control_module._steered_kls(lm, hidden, base)
    expected_forward, expected_backward = kl_divergences(base[None], steered)
    assert forward.shape == (n_steps, batch) and torch.isfinite(forward).all()
    assert torch.isinf(backward[:, 1]).all() and torch.isfinite(backward[:, [0, 2]]).all()
    # the head's float32 matmul on 4-row blocks may take another CPU kernel than on all 15 rows (seen: 2e-8 relative)
    torch.testing.assert_close(forward, expected_forward, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(backward, expected_backward, rtol=1e-6, atol=1e-9)
    assert forward.min() > 1e-3  # the rows differ from the base, so the comparison means something


def test_any_method_steering_arm_comes_from_its_factory_and_sets_the_random_norm(monkeypatch):
    """ACE (a replacement method): its ±α KLs are first_token_kl of its factory, and the random
    directions have the +α arm's mean ``‖h' − h‖``, measured independently here."""
    from torsion.metrics import first_token_kl
    from torsion.steering import get_method

    lm = tiny_lm("llama", n_layers=N_LAYERS)
    means = torch.randn(N_LAYERS, lm.d_model, generator=torch.Generator().manual_seed(4))
    ace = get_method("ace", vectors=axis_for(lm), means=means, layers=[2], positions="last")
    alpha, seen = 0.8, {}
    real_fast_kls = random_control_module.fast_kls
    monkeypatch.setattr(random_control_module, "fast_kls",
                        lambda lm_, prompts, steps, **kw: (seen.update(steps), real_fast_kls(lm_, prompts, steps, **kw))[1])
    result = random_control(lm, UNPADDED, axis_for(lm), layers=[2], alpha=alpha, n_random=N_RANDOM, method=ace)
    states = []  # block 2's resid output at the last token, per prompt (one batch, no padding)
    handle = lm.layout.component_module("resid", 2).register_forward_hook(
        lambda _m, _i, out: states.append(out[0][:, -1].double() if isinstance(out, tuple) else out[:, -1].double()))
    next_token_logprobs(lm, UNPADDED, len(UNPADDED))
    handle.remove()
    unit = axis_for(lm)[2].double() / axis_for(lm)[2].double().norm()
    expected = (alpha - (states[0] - means[2].double()) @ unit).abs().mean()
    assert result["applied_norm"]["2"] == pytest.approx(float(expected), rel=1e-5)
    norms = seen[2][2:].double().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(expected)), rtol=1e-5, atol=0)
    for arm, strength in (("+alpha", alpha), ("-alpha", -alpha)):
        own = first_token_kl(lm, UNPADDED, ace.factory(lm, strength))
        assert result["layers"]["2"][arm]["kl_base_to_steered"]["steering"] == pytest.approx(own["kl_base_to_steered"])
    assert result["method"]["name"] == "ace" and result["fast_path"] is True
    naive = random_control(lm, UNPADDED, axis_for(lm), layers=[2], alpha=alpha, n_random=N_RANDOM, method=ace,
                           fast=False)
    np.testing.assert_allclose(all_kls(result), all_kls(naive), rtol=1e-4, atol=1e-7)


def test_analyze_parser_takes_a_steering_method_and_refuses_an_unknown_one(capsys, tmp_path):
    from torsion.cli import build_parser

    (tmp_path / "manifest.json").write_text("{}")
    run = str(tmp_path)
    args = build_parser().parse_args(["analyze", "random-control", run, "--method", "ace", "--param", "beta=0.5"])
    assert args.method == "ace" and args.param == ["beta=0.5"]
    assert build_parser().parse_args(["analyze", "propagation", run]).method == "flat"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["analyze", "propagation", run, "--method", "splin-a"])
    assert exit_info.value.code == 2 and "unknown steering method" in capsys.readouterr().err
