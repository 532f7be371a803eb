"""Strength search on a tiny run: objective values, split bookkeeping, resume, CLI and bad input."""

import json
import math

import pytest

import torsion.behaviour as behaviour
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES
from torsion.models import load_model
from torsion.optimize import SearchSettings, capability_penalty, run_optimize, strength_objective
from torsion.store import read_jsonl
from torsion.vectors import load_vectors


def test_objective_matches_methods_by_hand():
    # comply: mean_score + w*min(KL, cap); refuse: -mean_score + w*min(KL, cap)
    assert strength_objective("comply", 0.5, 0.3, kl_weight=2.0, kl_cap=1.0) == pytest.approx(0.5 + 0.6)
    assert strength_objective("comply", 0.5, 3.0, kl_weight=2.0, kl_cap=1.0) == pytest.approx(0.5 + 2.0)
    assert strength_objective("refuse", 0.5, 0.3, kl_weight=2.0, kl_cap=1.0, penalty=0.1) == pytest.approx(0.2)
    base = {"mcq_accuracy": 0.8, "perplexity": 10.0}
    steered = {"mcq_accuracy": 0.6, "perplexity": 20.0}
    assert capability_penalty(base, steered, mcq_weight=2.0, perplexity_weight=1.0) == pytest.approx(
        2.0 * 0.2 + math.log(2.0))
    better = {"mcq_accuracy": 0.9, "perplexity": 5.0}  # improvements are not rewarded
    assert capability_penalty(base, better, mcq_weight=2.0, perplexity_weight=1.0) == 0.0


@pytest.fixture(scope="module")
def tiny_lm_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _settings(**overrides):
    return SearchSettings(**{"objective": "comply", "n_trials": 3, "sampler": "grid", "n_prompts": 10,
                             "n_kl_prompts": 4, "top_k": 2, "layer_window": (0.0, 1.0), "prune": False,
                             "batch_size": 4, **overrides})


def _spy(monkeypatch):
    seen = []
    original = behaviour.generate_batch
    monkeypatch.setattr(behaviour, "generate_batch", lambda lm, batch, s: seen.extend(batch) or original(lm, batch, s))
    return seen


def test_search_values_and_split_bookkeeping(tiny_run, tiny_lm_loaded, monkeypatch):
    seen = _spy(monkeypatch)
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(), log=lambda m: None)
    assert [t["alpha"] for t in result["trials"]] == [-4.0, -2.0, 0.0]
    for trial in result["trials"]:  # each value recomputed from the stored labels and KL
        labels = trial["rates"]
        n = labels["strong_comply"]["n"]
        mean = sum(LABEL_SCORES[c] * labels[c]["k"] for c in LABEL_SCORES) / n
        assert trial["mean_score"] == pytest.approx(mean)
        assert trial["value"] == pytest.approx(mean + min(trial["kl_base_to_steered"], 10.0))
    assert result["best"]["value"] == min(t["value"] for t in result["trials"])
    assert result["alpha"] == result["best"]["alpha"]
    zero = next(t for t in result["trials"] if t["alpha"] == 0.0)
    assert zero["kl_base_to_steered"] == pytest.approx(0.0, abs=1e-9)

    prompts = {p["id"]: p for p in read_jsonl(tiny_run / "prompts.jsonl")}
    ids = result["prompt_ids"]
    fit = set(ids["fit_and_layer_selection"])
    assert all(prompts[i]["split"] == "train" for i in fit | set(ids["search"]))
    assert {prompts[i]["split"] for i in ids["holdout"]} == {"holdout"}
    assert len(ids["holdout"]) == 8 and not set(ids["holdout"]) & (fit | set(ids["search"]))
    assert not set(ids["kl_probe"]) & set(ids["kl_eval"])
    # what was actually generated: the search prompts in trials, the holdout only once, after the search
    search_text = {prompts[i]["prompt"] for i in ids["search"]}
    holdout_text = [prompts[i]["prompt"] for i in ids["holdout"]]
    assert set(seen[:-len(holdout_text)]) == search_text and sorted(seen[-len(holdout_text):]) == sorted(holdout_text)
    vectors = load_vectors(tiny_run / "vectors.safetensors")
    assert vectors["md/resid"].meta["split"] == "train"
    assert result["held_out"]["n_prompts"] == 8 and result["held_out"]["steering"]["alpha"] == [result["alpha"]] * 2
    saved = json.loads((tiny_run / "analysis" / "optimize_comply-global.json").read_text())
    assert saved["alpha"] == result["alpha"]


def test_rerun_does_not_replay_and_a_changed_scale_is_refused(tiny_run, tiny_lm_loaded, monkeypatch):
    first = run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe"), evaluate=False, log=lambda m: None)
    seen = _spy(monkeypatch)
    again = run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe"), evaluate=False, log=lambda m: None)
    assert seen == []  # finished trials are neither re-run nor re-scored
    assert [(t["number"], t["value"]) for t in again["trials"]] == [(t["number"], t["value"]) for t in first["trials"]]
    with pytest.raises(TorsionError, match=r"different objective \(settings.kl_weight 1.0 -> 2.0\)"):
        run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe", kl_weight=2.0), evaluate=False,
                     log=lambda m: None)


def test_kl_weight_and_cap_enter_the_value(tiny_run, tiny_lm_loaded):
    cap = 0.005  # the tiny model's KLs at these alphas are about 0.003 and 0.006: one below, one above
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(n_trials=2, alpha_range=(-8.0, -4.0), kl_weight=3.0,
                                                              kl_cap=cap), evaluate=False, log=lambda m: None)
    kls = sorted(t["kl_base_to_steered"] for t in result["trials"])
    assert kls[0] < cap < kls[1]
    for trial in result["trials"]:
        assert trial["value"] == pytest.approx(trial["mean_score"] + 3.0 * min(trial["kl_base_to_steered"], cap))


def test_refuse_objective_and_category_scope(tiny_run, tiny_lm_loaded):
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(objective="refuse", category="a", n_trials=2),
                          log=lambda m: None)
    assert result["study"] == "refuse-a" and result["vector_key"] == "md/resid/a"
    assert [t["alpha"] for t in result["trials"]] == [0.0, 4.0]
    for trial in result["trials"]:
        assert trial["value"] == pytest.approx(-trial["mean_score"] + min(trial["kl_base_to_steered"], 10.0))
    prompts = {p["id"]: p for p in read_jsonl(tiny_run / "prompts.jsonl")}
    assert {prompts[i]["category"] for i in result["prompt_ids"]["search"] + result["prompt_ids"]["holdout"]} == {"a"}


def test_perplexity_penalty_enters_the_trial_value(tiny_run, tiny_lm_loaded):
    from torsion.metrics import perplexity
    from torsion.optimize import Steering, prompt_sets
    from torsion.store import RunDir

    settings = _settings(n_trials=2, alpha_range=(-8.0, -4.0), perplexity_weight=0.5)
    result = run_optimize(tiny_run, tiny_lm_loaded, settings, evaluate=False, log=lambda m: None)
    probe = [p.prompt for p in prompt_sets(RunDir(tiny_run), settings)["kl_probe"]]
    vector = load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions
    steering = Steering(tiny_lm_loaded, vector, result["layers"], component="resid", positions="all")
    base = perplexity(tiny_lm_loaded, probe)["perplexity"]
    for trial in result["trials"]:
        steered = perplexity(tiny_lm_loaded, probe, steering(trial["alpha"]))["perplexity"]
        assert trial["capability"]["perplexity"] == pytest.approx(steered)
        assert trial["penalty"] == pytest.approx(0.5 * max(0.0, math.log(steered / base)))
        assert trial["value"] == pytest.approx(trial["mean_score"] + min(trial["kl_base_to_steered"], 10.0)
                                               + trial["penalty"])
    assert any(t["penalty"] > 0 for t in result["trials"])
    with pytest.raises(TorsionError, match="needs --positions all"):
        _settings(perplexity_weight=0.5, positions="last")


def test_cli_optimize_and_bad_input(tiny_run, tiny_model_dir, capsys):
    common = [str(tiny_run), "--model", str(tiny_model_dir), "--trials", "2", "--sampler", "grid",
              "--n-prompts", "4", "--n-kl-prompts", "2", "--layer-window", "0", "1", "--top-k", "1"]
    assert main(["optimize", *common, "--per-category"]) == 0
    assert {p.name for p in (tiny_run / "analysis").glob("optimize_*.json")} == {
        "optimize_comply-a.json", "optimize_comply-b.json"}
    assert "Strength search" in (tiny_run / "report.html").read_text()
    capsys.readouterr()
    for extra, message in ((["--alpha-range", "1", "0"], "low < high"),
                           (["--category", "nope"], "no vector 'md/resid/nope'"),
                           (["--key", "md/nothing"], "no vector 'md/nothing'"),
                           (["--layer-window", "0.9", "0.1"], "layer window")):
        assert main(["optimize", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torsion: error: ") and message in err and len(err.strip().splitlines()) == 1
