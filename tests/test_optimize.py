"""Strength search on a tiny run: objective values, split bookkeeping, resume, CLI and bad input."""

import json
import math
from dataclasses import replace

import optuna
import pytest

import torsion.behaviour as behaviour
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES
from torsion.models import load_model
from torsion.judge import RuleJudge
from torsion.judge.correction import corrected
from torsion.optimize import SearchSettings, capability_penalty, objective_score, run_optimize, strength_objective
from torsion.store import append_jsonl, read_jsonl
from torsion.vectors import load_vectors


def _rows(*labels):
    return [corrected(*label) if isinstance(label, tuple) else corrected(label) for label in labels]


def test_objective_matches_methods_by_hand():
    # comply: mean_score + w*min(KL, cap); refuse: -mean_score + w*min(KL, cap)
    two = _rows("strong_refuse", "strong_comply", "weak_refuse", "strong_comply")  # mean score -0.125
    assert strength_objective("comply", two, 0.3, kl_weight=2.0, kl_cap=1.0) == pytest.approx(-0.125 + 0.6)
    assert strength_objective("comply", two, 3.0, kl_weight=2.0, kl_cap=1.0) == pytest.approx(-0.125 + 2.0)
    assert strength_objective("refuse", two, 0.3, kl_weight=2.0, kl_cap=1.0, penalty=0.1) == pytest.approx(
        0.125 + 0.6 + 0.1)
    # degenerate adds +2 to the minimised value in both objectives; judge errors are left out
    rows = _rows("strong_refuse", "degenerate", "weak_comply", "judge_error")
    assert objective_score("comply", rows) == pytest.approx((1.0 + 2.0 - 0.5) / 3)
    assert objective_score("refuse", rows) == pytest.approx((-1.0 + 2.0 + 0.5) / 3)
    # so the refuse search cannot buy its target with noise: all-degenerate is worse than all-complied
    assert objective_score("refuse", _rows("degenerate", "degenerate")) == 2.0
    assert objective_score("refuse", _rows("strong_comply")) == 1.0
    assert objective_score("refuse", _rows("strong_refuse")) == -1.0
    # scores are corrected: an AI-identity comply is a refusal (+0.5)
    assert objective_score("comply", _rows(("strong_comply", "fp_refuse"), "strong_comply")) == pytest.approx(-0.25)
    assert objective_score("refuse", _rows("judge_error")) is None
    with pytest.raises(TorsionError, match="judge error"):
        strength_objective("refuse", _rows("judge_error"), 0.0, kl_weight=1.0, kl_cap=1.0)
    base = {"mcq_accuracy": 0.8, "perplexity": 10.0}
    steered = {"mcq_accuracy": 0.6, "perplexity": 20.0}
    assert capability_penalty(base, steered, mcq_weight=2.0, perplexity_weight=1.0) == pytest.approx(
        2.0 * 0.2 + math.log(2.0))
    better = {"mcq_accuracy": 0.9, "perplexity": 5.0}  # improvements are not rewarded
    assert capability_penalty(base, better, mcq_weight=2.0, perplexity_weight=1.0) == 0.0


RULES = RuleJudge()


@pytest.fixture(scope="module")
def tiny_lm_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _settings(**overrides):
    return SearchSettings(**{"objective": "comply", "n_trials": 3, "sampler": "grid", "n_prompts": 10,
                             "n_kl_prompts": 4, "top_k": 2, "layer_window": (0.0, 1.0), "prune": False,
                             "batch_size": 4, **overrides})


def _spy(monkeypatch):
    seen = []
    original = behaviour.iter_generate
    monkeypatch.setattr(behaviour, "iter_generate", lambda lm, batch, s: seen.extend(batch) or original(lm, batch, s))
    return seen


def test_search_values_and_split_bookkeeping(tiny_run, tiny_lm_loaded, monkeypatch):
    seen = _spy(monkeypatch)
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(), judge=RULES, log=lambda m: None)
    assert [t["alpha"] for t in result["trials"]] == [-4.0, -2.0, 0.0]
    for trial in result["trials"]:  # each value recomputed from the stored labels and KL
        labels = trial["rates"]
        n = labels["strong_comply"]["n"]
        assert labels["fp_refuse"]["k"] == 0  # (word salad never narrates an AI identity) so scores are the judge's
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
    first = run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe"), evaluate=False, judge=RULES, log=lambda m: None)
    seen = _spy(monkeypatch)
    again = run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe"), evaluate=False, judge=RULES, log=lambda m: None)
    assert seen == []  # finished trials are neither re-run nor re-scored
    assert [(t["number"], t["value"]) for t in again["trials"]] == [(t["number"], t["value"]) for t in first["trials"]]
    with pytest.raises(TorsionError, match=r"different objective \(settings.kl_weight 1.0 -> 2.0\)"):
        run_optimize(tiny_run, tiny_lm_loaded, _settings(sampler="tpe", kl_weight=2.0), evaluate=False,
                     judge=RULES, log=lambda m: None)


def test_a_resume_may_raise_the_budget_and_runs_only_the_extra_trials(tiny_run, tiny_lm_loaded, monkeypatch):
    settings = _settings(sampler="tpe", n_trials=2, batch_size=4, seed=0)
    first = run_optimize(tiny_run, tiny_lm_loaded, settings, evaluate=False, judge=RULES, log=lambda m: None)
    seen = _spy(monkeypatch)
    more = run_optimize(tiny_run, tiny_lm_loaded, replace(settings, n_trials=3, batch_size=5),
                        evaluate=False, judge=RULES, log=lambda m: None)
    assert len(more["trials"]) == 3 and len(seen) == settings.n_prompts  # one new trial's prompts, no replay
    assert [t["value"] for t in more["trials"][:2]] == [t["value"] for t in first["trials"]]
    spec = optuna.load_study(study_name="comply-global", storage=f"sqlite:///{tiny_run / 'optimize.db'}").user_attrs
    assert not {"n_trials", "batch_size", "seed"} & set(spec["torsion_spec"]["settings"])
    with pytest.raises(TorsionError, match=r"settings.kl_weight 1.0 -> 2.0"):
        run_optimize(tiny_run, tiny_lm_loaded, replace(settings, n_trials=3, kl_weight=2.0), evaluate=False,
                     judge=RULES, log=lambda m: None)


class _FixedJudge:
    """Calls everything a strong refusal; named like an LLM judge."""

    name = "llm:tiny-judge"

    def judge(self, prompts, responses):
        from torsion.judge.base import Verdict

        return [Verdict("strong_refuse", 1.0, self.name) for _ in prompts]


def test_the_search_labels_with_the_runs_judge(tiny_run, tiny_lm_loaded, monkeypatch):
    import torsion.runs

    rows = read_jsonl(tiny_run / "responses.jsonl")
    (tiny_run / "responses.jsonl").unlink()
    append_jsonl(tiny_run / "responses.jsonl", [{**r, "judge": _FixedJudge.name} for r in rows])
    built = []
    monkeypatch.setattr(torsion.runs, "get_judge", lambda name, **options: built.append((name, options))
                        or _FixedJudge())
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(n_trials=2), log=lambda m: None)
    assert built == [("llm", {"model": "tiny-judge"})]  # rebuilt from the recorded name
    assert result["judge"] == "llm:tiny-judge"
    assert all(t["rates"]["strong_refuse"]["rate"] == 1.0 for t in result["trials"])
    assert result["held_out"]["judge"] == "llm:tiny-judge" and result["held_out"]["rates"]["refused"]["rate"] == 1.0
    baseline = result["baseline_in_sample"]  # the run's own labels, not judged again
    assert baseline["judge"] == "llm:tiny-judge" and baseline["source"].startswith("responses.jsonl labels")
    stored = optuna.load_study(study_name="comply-global", storage=f"sqlite:///{tiny_run / 'optimize.db'}")
    assert stored.user_attrs["torsion_spec"]["judge"] == "llm:tiny-judge"
    with pytest.raises(TorsionError, match=r"different objective \(judge llm:tiny-judge -> rules"):
        run_optimize(tiny_run, tiny_lm_loaded, _settings(n_trials=2), judge=RULES, log=lambda m: None)


def test_kl_weight_and_cap_enter_the_value(tiny_run, tiny_lm_loaded):
    cap = 0.005  # the tiny model's KLs at these alphas are about 0.003 and 0.006: one below, one above
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(n_trials=2, alpha_range=(-8.0, -4.0), kl_weight=3.0,
                                                              kl_cap=cap), evaluate=False, judge=RULES, log=lambda m: None)
    kls = sorted(t["kl_base_to_steered"] for t in result["trials"])
    assert kls[0] < cap < kls[1]
    for trial in result["trials"]:
        assert trial["value"] == pytest.approx(trial["mean_score"] + 3.0 * min(trial["kl_base_to_steered"], cap))


def test_refuse_objective_and_category_scope(tiny_run, tiny_lm_loaded):
    result = run_optimize(tiny_run, tiny_lm_loaded, _settings(objective="refuse", category="a", n_trials=2),
                          judge=RULES, log=lambda m: None)
    assert result["study"] == "refuse-a" and result["vector_key"] == "md/resid/a"
    assert [t["alpha"] for t in result["trials"]] == [0.0, 4.0]
    for trial in result["trials"]:  # -mean_score, with each degenerate response at +2 instead of -2
        degenerate = trial["rates"]["degenerate"]
        assert trial["value"] == pytest.approx(-trial["mean_score"] + 4 * degenerate["k"] / degenerate["n"]
                                               + min(trial["kl_base_to_steered"], 10.0))
    prompts = {p["id"]: p for p in read_jsonl(tiny_run / "prompts.jsonl")}
    # layers were scored on category a's own train rows
    assert result["layer_selection"]["rows"] == "train, category a"
    assert {prompts[i]["category"] for i in result["prompt_ids"]["fit_and_layer_selection"]} == {"a"}
    assert {prompts[i]["category"] for i in result["prompt_ids"]["search"] + result["prompt_ids"]["holdout"]} == {"a"}


def test_perplexity_penalty_enters_the_trial_value(tiny_run, tiny_lm_loaded):
    from torsion.metrics import perplexity
    from torsion.optimize import prompt_sets
    from torsion.steering import get_method
    from torsion.store import RunDir

    settings = _settings(n_trials=2, alpha_range=(-8.0, -4.0), perplexity_weight=0.5)
    result = run_optimize(tiny_run, tiny_lm_loaded, settings, evaluate=False, judge=RULES, log=lambda m: None)
    probe = [p.prompt for p in prompt_sets(RunDir(tiny_run), settings)["kl_probe"]]
    vector = load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions
    steering = get_method("flat", vectors=vector, layers=result["layers"], positions="all").bind(tiny_lm_loaded)
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
    common = [str(tiny_run), "--model", str(tiny_model_dir), "--trials", "2", "--sampler", "grid", "--judge", "rules",
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
    unjudged = [arg for arg in common if arg not in ("--judge", "rules")]  # the tiny run's own judge is a test oracle
    assert main(["optimize", *unjudged]) == 2
    err = capsys.readouterr().err
    assert "labelled by 'oracle', which torsion cannot rebuild; pass --judge rules" in err


def test_search_settings_refuse_batch_size_zero_in_one_line():
    with pytest.raises(TorsionError, match=r"^batch_size = 0; pass at least 1 prompt per batch$"):
        SearchSettings(batch_size=0)
