"""benchmarks/bench_heretic.py: the hypervolume, the verdict and the two weight edits it evaluates."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_heretic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_heretic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hypervolume_is_the_dominated_area_by_hand(bench):
    # (0.2, 0.5) dominates [0.2, 1] x [0.5, 1] = 0.4; (0.5, 0.1) adds [0.5, 1] x [0.1, 0.5] = 0.2
    assert bench.hypervolume([(0.2, 0.5), (0.5, 0.1)], (1.0, 1.0)) == pytest.approx(0.6)
    # a point beyond the reference adds nothing; an empty front has none
    assert bench.hypervolume([(0.2, 0.5), (0.5, 0.1), (0.1, 1.5)], (1.0, 1.0)) == pytest.approx(0.6)
    assert bench.hypervolume([], (1.0, 1.0)) == 0.0


def point(refusal, kl, marker=None):
    return {"heldout": {"refusal_rate": refusal, "kl_base_to_steered": kl,
                        "heretic_marker_refusal_rate": refusal if marker is None else marker}}


def test_verdict_compares_kl_at_heretics_lowest_refusal_rate(bench):
    fronts = {"heretic": [point(0.25, 0.3), point(0.25, 0.4), point(0.5, 0.1)],
              "torsion": [point(0.2, 0.2), point(0.25, 0.35), point(0.6, 0.05)]}
    v = bench.verdict(fronts, "refusal_rate")
    assert (v["heretic_lowest_refusal_rate"], v["heretic_kl_at_lowest"]) == (0.25, 0.3)
    assert (v["torsion_kl_at_or_below"], v["torsion_lower_kl"]) == (0.2, True)
    fronts["torsion"] = [point(0.25, 0.31), point(0.3, 0.01)]
    assert bench.verdict(fronts, "refusal_rate")["torsion_lower_kl"] is False
    fronts["torsion"] = [point(0.3, 0.01)]  # never reaches heretic's rate: no verdict, not a win
    v = bench.verdict(fronts, "refusal_rate")
    assert (v["torsion_kl_at_or_below"], v["torsion_lower_kl"]) == (None, None)


def test_edits_change_only_a_copy_by_the_stored_amount(bench, tiny_model_dir, tmp_path):
    from torsion.models import load_model

    base = load_model(str(tiny_model_dir))
    name = "model.layers.1.mlp.down_proj"
    weight = dict(base.model.named_parameters())[f"{name}.weight"]
    before = weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, weight.shape[1], generator=generator)
    b = torch.randn(weight.shape[0], 3, generator=generator)
    save_file({f"{name}.lora_A": a, f"{name}.lora_B": b}, str(tmp_path / "trial.safetensors"))
    edited = bench.edited_copy(base, bench.heretic_edit(str(tmp_path / "trial.safetensors")))
    after = dict(edited.model.named_parameters())[f"{name}.weight"]
    torch.testing.assert_close(after, before + b @ a, rtol=0, atol=1e-5)
    assert torch.equal(weight, before)  # the base is untouched
    others = [(n, p) for n, p in edited.model.named_parameters() if n != f"{name}.weight"]
    assert all(torch.equal(p, dict(base.model.named_parameters())[n]) for n, p in others)

    saved = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    saved[f"{name}.weight"] = before + 1.0
    (tmp_path / "model").mkdir()
    save_file(saved, str(tmp_path / "model" / "model.safetensors"))
    again = bench.edited_copy(base, bench.torsion_edit(tmp_path / "model"))
    assert torch.equal(dict(again.model.named_parameters())[f"{name}.weight"], before + 1.0)


def test_evaluator_gives_zero_kl_and_the_base_rates_for_an_unchanged_copy(bench, tiny_model_dir, tmp_path):
    from tiny_run import OracleJudge
    from torsion.data.records import Prompt
    from torsion.generate import GenerationSettings
    from torsion.metrics import next_token_logprobs
    from torsion.models import load_model

    base = load_model(str(tiny_model_dir))
    rows = [Prompt(id=f"p{i}", prompt=f"prompt number {i}", category="", source="t", prompt_hash=str(i))
            for i in range(6)]
    sets = {"holdout": rows[:4], "kl_eval": rows[4:]}
    generation = GenerationSettings(max_new_tokens=3, batch_size=2)
    base_logprobs = next_token_logprobs(base, [p.prompt for p in sets["kl_eval"]], 16, None)
    plain = bench.evaluate(base, None, sets, generation, OracleJudge(), base_logprobs)
    same = bench.evaluate(base, bench.edited_copy(base, lambda params: None), sets, generation, OracleJudge(),
                          base_logprobs)
    # the copy's tensors sit at other addresses, so the CPU kernels may sum in another order (seen: 2e-8)
    assert plain["kl_base_to_steered"] == 0.0 and 0.0 <= same["kl_base_to_steered"] < 1e-6
    assert same["responses"] == plain["responses"] and same["refusal_rate"] == plain["refusal_rate"]
    assert same["n"] == 4 and same["n_kl_prompts"] == 2

    def push(params):  # a large edit of the last block's MLP output moves the next-token distribution
        params["model.layers.3.mlp.down_proj.weight"].mul_(50.0)
    moved = bench.evaluate(base, bench.edited_copy(base, push), sets, generation, OracleJudge(), base_logprobs)
    assert moved["kl_base_to_steered"] > 1e-3 and moved["kl_steered_to_base"] > 1e-3
