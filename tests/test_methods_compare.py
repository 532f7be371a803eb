"""The steering-method protocol in the strength search, and `torsion analyze methods` on a tiny run."""

import json
from dataclasses import replace

import optuna
import pytest

from torsion.analysis.methods import CompareSettings, matched_kl, run_methods
from torsion.behaviour import evaluate_behaviour, result_rows
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge import RuleJudge
from torsion.judge.correction import corrected, genuine_rate, refusal_rate, share
from torsion.metrics import first_token_kl
from torsion.models import load_model
from torsion.optimize import SearchSettings, prompt_sets, run_optimize
from torsion.steer import add_steering
from torsion.store import RunDir, atomic_write_text, read_jsonl
from torsion.vectors import load_vectors

RULES = RuleJudge()


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _settings(**overrides):
    return SearchSettings(**{"objective": "comply", "n_trials": 3, "sampler": "grid", "n_prompts": 6,
                             "n_kl_prompts": 4, "top_k": 2, "layer_window": (0.0, 1.0), "prune": False,
                             "batch_size": 3, **overrides})


def test_flat_through_the_protocol_gives_the_plain_addition_values(tiny_run, lm):
    # the search's flat method vs the hook primitive it replaced (add_steering with the same layers and alpha)
    result = run_optimize(tiny_run, lm, _settings(), judge=RULES, log=lambda m: None)
    assert result["method"]["name"] == "flat" and result["strength_name"] == "alpha"
    sets = prompt_sets(RunDir(tiny_run), _settings())
    vector = load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions
    generation = GenerationSettings(max_new_tokens=4, batch_size=3)
    study = optuna.load_study(study_name="comply-global", storage=f"sqlite:///{tiny_run / 'optimize.db'}")
    spec = study.user_attrs["torsion_spec"]
    assert spec["method"]["name"] == "flat" and spec["param"] == "alpha" and (spec["low"], spec["high"]) == (-4, 0)
    by_alpha = {t.params["alpha"]: t.user_attrs["evaluation"] for t in study.trials}
    for alpha, trial in by_alpha.items():
        plain = lambda a=alpha: add_steering(lm, vector, layers=result["layers"], alpha=a, positions="all")  # noqa
        kl = first_token_kl(lm, [p.prompt for p in sets["kl_probe"]], plain)
        assert trial["kl_base_to_steered"] == kl["kl_base_to_steered"]  # exactly, not approximately
        assert trial["kl_steered_to_base"] == kl["kl_steered_to_base"]
        direct = evaluate_behaviour(lm, [p.prompt for p in sets["search"]], plain, generation, judge=RULES)
        assert trial["responses"] == direct["responses"] and trial["rates"] == direct["rates"]
        assert trial["applied_norm"] == direct["steering"]["applied_norm"]


def test_optimize_other_methods_search_their_own_range(tiny_run, lm):
    result = run_optimize(tiny_run, lm, _settings(method="ablation"), judge=RULES, evaluate=False, log=lambda m: None)
    assert result["strength_name"] == "beta" and [t["beta"] for t in result["trials"]] == [0.0, 0.5, 1.0]
    zero = next(t for t in result["trials"] if t["beta"] == 0.0)
    assert zero["kl_base_to_steered"] == 0.0  # beta = 0 installs no hook
    assert result["settings"]["alpha_range"] == [0.0, 1.0]
    ace = run_optimize(tiny_run, lm, _settings(method="ace", objective="refuse", n_trials=2), judge=RULES,
                       evaluate=False, log=lambda m: None, study_name="ace")
    norms = load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions[ace["layers"]].norm(dim=1)
    assert ace["settings"]["alpha_range"] == pytest.approx([0.0, 2 * float(norms.double().mean())])
    assert ace["trials"][0]["mean_delta_norm"] is not None  # read after generation, when the hooks have run


def test_a_study_made_before_steering_methods_resumes_as_flat(tiny_run, lm):
    first = run_optimize(tiny_run, lm, _settings(n_trials=2), judge=RULES, evaluate=False, log=lambda m: None)
    study = optuna.load_study(study_name="comply-global", storage=f"sqlite:///{tiny_run / 'optimize.db'}")
    legacy = dict(study.user_attrs["torsion_spec"])
    del legacy["method"]
    legacy["settings"] = {k: v for k, v in legacy["settings"].items()
                          if k not in ("method", "method_params", "manifold")}
    study.set_user_attr("torsion_spec", legacy)
    again = run_optimize(tiny_run, lm, _settings(n_trials=2), judge=RULES, evaluate=False, log=lambda m: None)
    assert again["trials"] == first["trials"]  # resumed: nothing re-run
    with pytest.raises(TorsionError, match="different objective"):
        run_optimize(tiny_run, lm, _settings(n_trials=2, method="dense"), judge=RULES, evaluate=False,
                     log=lambda m: None)


def test_matched_kl_names_a_winner_only_for_disjoint_intervals():
    def row(method, kl, k, n=40):
        return {"method": method, "objective": "comply", "kl_base_to_steered": kl,
                "held_out": {"genuine_strong_comply": share(k, n)}}
    pairs = matched_kl([row("flat", 1.0, 2), row("ace", 1.04, 30), row("dense", 1.2, 30), row("ablation", 0.97, 5)])
    found = {tuple(p["methods"]): p["winner"] for p in pairs}
    # 1.0 vs 1.04: |d| = 0.04 <= 0.05 * 1.04; 1.0 vs 1.2 is not matched; 1.04 vs 0.97: 0.07 > 0.052
    assert found == {("flat", "ace"): "ace", ("flat", "ablation"): None}


def test_analyze_methods_end_to_end_and_resume(tiny_run, lm, monkeypatch):
    settings = CompareSettings(methods=("flat", "ablation", "spline-a"), objectives=("comply",), sampler="grid",
                               n_trials=2, curve_points=3, top_k=2, n_prompts=6, n_kl_prompts=4,
                               n_mcq=0, batch_size=3)  # the tiny tokenizer has no answer-letter tokens
    assert not (tiny_run / "manifold.safetensors").exists()
    result = run_methods(tiny_run, lm, settings, judge=RULES, log=lambda m: None)
    assert result["manifold"]["fitted_by_this_comparison"] and (tiny_run / "manifold.safetensors").is_file()
    saved = json.loads((tiny_run / "analysis" / "methods.json").read_text())
    assert [(r["method"], r["objective"]) for r in saved["methods"]] == [
        ("flat", "comply"), ("ablation", "comply"), ("spline-a", "comply")]
    prompts = {p["id"]: p for p in read_jsonl(tiny_run / "prompts.jsonl")}
    storage = f"sqlite:///{tiny_run / 'optimize.db'}"
    for row in saved["methods"]:
        # held-out rates recomputed from the recorded per-prompt labels and corrections
        rows = [corrected(r["label"], r["correction"]) for r in row["held_out"]["rows"]]
        assert row["held_out"]["refused"] == refusal_rate(rows)
        assert row["held_out"]["genuine_strong_comply"] == genuine_rate(rows)
        assert row["held_out"]["degenerate"] == share(sum(r.degenerate for r in rows), sum(r.judged for r in rows))
        assert {prompts[r["id"]]["split"] for r in row["held_out"]["rows"]} == {"holdout"}
        # in-sample rates: the study's best trial, recomputed from its stored labels
        study = optuna.load_study(study_name=row["study"], storage=storage)
        best = study.best_trial
        assert best.params[row["strength_name"]] == row["strength"]
        evaluation = best.user_attrs["evaluation"]
        trial_rows = [corrected(*pair) for pair in zip(evaluation["labels"], evaluation["corrections"])]
        assert row["in_sample"]["refused"] == refusal_rate(trial_rows)
        assert row["kl_base_to_steered"] == evaluation["kl_base_to_steered"]
        # per category: each cell from that category's rows only, with its n
        table = next(t["categories"] for t in saved["by_category"] if t["method"] == row["method"])
        for category, cell in table.items():
            mine = [r for r, raw in zip(rows, row["held_out"]["rows"]) if raw["category"] == category]
            assert cell["refused"] == refusal_rate(mine) and cell["n"] == len(mine)
        assert row["mcq_accuracy"] is None and row["perplexity_ratio"] > 0
    spline = saved["methods"][2]
    bins = [b["t"] for b in json.loads((tiny_run / "analysis" / "manifold.json").read_text())["knots"]["bins"]]
    assert spline["strength_name"] == "t" and spline["search_range"] == [min(bins), max(bins)]  # the outer knots
    assert len(saved["curves"]["flat"]["points"]) == 3
    assert [p["strength"] for p in saved["curves"]["ablation"]["points"]] == [0.0, 0.5, 1.0]
    assert saved["curves"]["ablation"]["points"][0]["kl_base_to_steered"] == 0.0
    from torsion.report import build_report

    page = build_report(tiny_run).read_text()
    assert "Steering methods compared on held-out prompts" in page and "Matched KL" in page
    assert (tiny_run / "analysis" / "methods.png").stat().st_size > 1000

    # a rerun resumes from the checkpoint: nothing is generated again
    import torsion.behaviour as behaviour

    monkeypatch.setattr(behaviour, "iter_generate", lambda *a, **k: pytest.fail("a finished comparison regenerated"))
    again = run_methods(tiny_run, lm, settings, judge=RULES, log=lambda m: None)
    assert again["methods"] == saved["methods"] and again["curves"] == saved["curves"]
    assert again["manifold"]["fitted_by_this_comparison"]
    fewer = run_methods(tiny_run, lm, replace(settings, methods=("ablation",)), judge=RULES, log=lambda m: None)
    assert fewer["methods"] == saved["methods"][1:2] and fewer["curves"] == {"ablation": saved["curves"]["ablation"]}


def test_cli_methods_bad_input(tiny_run, tiny_model_dir, capsys):
    common = ["analyze", "methods", str(tiny_run), "--model", str(tiny_model_dir), "--judge", "rules"]
    cases = ((["--methods", "flat,nope"], "unknown steering method 'nope'"),
             (["--methods", "flat,flat"], "names a method twice"),
             (["--methods", "flat", "ace"], "unrecognized arguments"),
             (["--objectives", "comply,sideways"], "unknown objective"))
    assert main([*common, "--methods", "ablation", "--objectives", "comply", "--sampler", "grid", "--trials", "2",
                 "--curve-points", "1", "--n-prompts", "3", "--top-k", "2", "--n-mcq", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("analysis/methods.json")
    assert "Steering methods compared" in (tiny_run / "report.html").read_text()
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["optimize", str(tiny_run), "--method", "splin-a"]) == 2
    assert "unknown steering method" in capsys.readouterr().err
    assert main(["optimize", str(tiny_run), "--method", "spline-a", "--judge", "rules"]) == 2  # before any model loads
    assert "needs a manifold file" in capsys.readouterr().err
    # a spline without a manifold file, on a run whose labels give fewer than two knots
    responses = read_jsonl(tiny_run / "responses.jsonl")
    lines = [json.dumps({**r, "label": "strong_refuse", "score": 1.0}) + "\n" for r in responses]
    atomic_write_text(tiny_run / "responses.jsonl", "".join(lines))
    assert main([*common, "--methods", "flat,spline-b"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("torsion: error:")]
    assert len(errors) == 1 and "a spline needs two knots" in errors[0] and err.strip().endswith(errors[0]), err


def test_compare_settings_refuse_bad_lists():
    with pytest.raises(TorsionError, match="distinct"):
        CompareSettings(methods=("flat", "flat"))
    with pytest.raises(TorsionError, match="unknown steering method"):
        CompareSettings(methods=("warp",))
    with pytest.raises(TorsionError, match="objectives"):
        CompareSettings(objectives=("comply", "up"))


def test_paper_profile_compares_methods_and_quick_does_not():
    from torsion.config import COMPARED_METHODS, RunConfig

    assert RunConfig.from_profile("paper").compare_methods == COMPARED_METHODS
    assert RunConfig.from_profile("quick").compare_methods == () == RunConfig.from_profile("smoke").compare_methods
    assert set(COMPARED_METHODS) == set(__import__("torsion.steering", fromlist=["method_names"]).method_names())


def test_metrics_and_behaviour_take_any_method(tiny_run, lm):
    from torsion.metrics import perplexity
    from torsion.steering import get_method
    from torsion.steering.ace import complied_means

    vectors = load_vectors(tiny_run / "vectors.safetensors")["md/resid"].directions
    texts = ["how do i bake bread", "tell me a story about the dragon"]
    ace = get_method("ace", vectors=vectors, means=complied_means(tiny_run), layers=[1, 2], positions="all")
    base = perplexity(lm, texts)["perplexity"]
    assert perplexity(lm, texts, get_method("ace", vectors=vectors, means=complied_means(tiny_run), layers=[1, 2],
                                            positions="all", beta=0.0).factory(lm, 3.0))["perplexity"] == base
    assert perplexity(lm, texts, ace.factory(lm, 3.0))["perplexity"] != base
    last = get_method("ace", vectors=vectors, means=complied_means(tiny_run), layers=[1], positions="last")
    with pytest.raises(TorsionError, match="scores every position"):
        perplexity(lm, texts, last.factory(lm, 3.0))
    ablation = get_method("ablation", directions=vectors)
    assert first_token_kl(lm, texts, ablation.factory(lm, 0.0))["kl_base_to_steered"] == 0.0
    result = evaluate_behaviour(lm, texts, ace.factory(lm, 3.0), GenerationSettings(max_new_tokens=3), judge=RULES)
    assert result["steering"]["method"] == "ace" and all(n > 0 for n in result["steering"]["mean_delta_norm"])


def test_a_comparison_checkpoint_is_not_reused_over_refit_vectors(tiny_run, lm):
    """Vectors refit under the same judge (say, after review decisions) must not get the old rows back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    settings = CompareSettings(methods=("flat",), objectives=("comply",), sampler="grid", n_trials=1,
                               curve_points=2, top_k=2, n_prompts=3, n_kl_prompts=2, n_mcq=0, batch_size=3)
    first = run_methods(tiny_run, lm, settings, judge=RULES, log=lambda m: None)
    path = RunDir(tiny_run).vectors_path
    with safe_open(str(path), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) * 2 for k in handle.keys()}, handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    try:
        again = run_methods(tiny_run, lm, settings, judge=RULES, log=lambda m: None)
    except TorsionError:  # the strength search's study refuses the new vectors: loud, not stale
        return
    assert again["spec_key"] != first["spec_key"]
