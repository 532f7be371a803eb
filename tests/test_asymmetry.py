"""The asymmetry analysis on a tiny run: KL matching, dense vs flat, over-refusal, push past α."""

import json

import pytest

from torsion.analysis.asymmetry import compare_arms, match_kl, run_asymmetry
from torsion.cli import main
from torsion.judge import RuleJudge
from torsion.judge.base import LABEL_SCORES
from torsion.models import load_model
from torsion.optimize import SearchSettings, run_optimize
from torsion.report import build_report


def test_match_kl_finds_the_alpha_of_a_known_curve():
    calls = []

    def kl(alpha):
        calls.append(alpha)
        return alpha ** 2

    alpha, value = match_kl(kl, 4.0, sign=-1.0, start=0.3)
    assert alpha == pytest.approx(-2.0, rel=0.03) and value == pytest.approx(4.0, rel=0.05)
    assert all(a <= 0 for a in calls)
    assert match_kl(kl, 0.0, sign=1.0) == (0.0, 0.0)
    alpha, value = match_kl(lambda a: min(a * a, 1.0), 4.0, sign=1.0, max_steps=6)  # unreachable: a plateau
    assert value == 1.0 and abs(value - 4.0) > 0.05 * 4.0


def test_compare_arms_speaks_only_with_matched_kl_and_disjoint_intervals():
    def rate(k, n):
        from torsion.behaviour import class_rates

        return class_rates(["p"] * n, ["r"] * n, ["strong_comply"] * k + ["strong_refuse"] * (n - k))["complied"]

    assert compare_arms(rate(5, 50), rate(45, 50), True, "held-out").startswith("dense lifts compliance more")
    assert compare_arms(rate(45, 50), rate(5, 50), True, "held-out").startswith("flat lifts compliance more")
    assert compare_arms(rate(20, 50), rate(25, 50), True, "held-out").startswith("no clear difference")
    assert compare_arms(rate(5, 50), rate(45, 50), False, "held-out").startswith("not compared")


def test_asymmetry_on_a_tiny_run(tiny_run, tiny_model_dir, capsys):
    lm = load_model(str(tiny_model_dir))
    common = dict(n_trials=2, sampler="grid", n_prompts=8, n_kl_prompts=4, top_k=2, layer_window=(0.0, 1.0),
                  prune=False, batch_size=4)
    assert main(["analyze", "asymmetry", str(tiny_run), "--model", str(tiny_model_dir)]) == 2
    assert "torsion optimize" in capsys.readouterr().err
    comply = run_optimize(tiny_run, lm, SearchSettings(objective="comply", alpha_range=(-8.0, -4.0), **common),
                          judge=RuleJudge(), log=lambda m: None)
    refuse = run_optimize(tiny_run, lm, SearchSettings(objective="refuse", **common), judge=RuleJudge(),
                          log=lambda m: None)
    assert not list((tiny_run / "analysis").glob("optimize_*.png"))  # the searches write data; the report draws
    result = run_asymmetry(tiny_run, lm, push_factors=(2.0,), n_neutral=6, log=lambda m: None)
    assert result["judge"] == comply["judge"] == RuleJudge().name  # the searches' judge, not the run's oracle

    dense = result["dense_vs_flat"]
    assert dense["arms"]["dense"]["layers"] == [0, 1, 2, 3]
    assert dense["arms"]["flat"]["alpha"] == comply["alpha"] < 0 and dense["arms"]["dense"]["alpha"] < 0
    assert dense["arms"]["dense"]["kl_probe"] == pytest.approx(comply["in_sample"]["kl_base_to_steered"], rel=0.05)
    lifts = dense["complied_uplift"]
    baseline = comply["baseline_held_out"]["rates"]["complied"]["rate"]
    assert lifts["flat"] == pytest.approx(comply["held_out"]["rates"]["complied"]["rate"] - baseline)
    assert lifts["dense"] == pytest.approx(dense["arms"]["dense"]["held_out"]["complied"]["rate"] - baseline)
    assert dense["kl_matched"] and dense["verdict"] == compare_arms(
        dense["arms"]["flat"]["held_out"]["complied"], dense["arms"]["dense"]["held_out"]["complied"], True, "held-out")
    neutral = result["over_refusal"]
    assert neutral["over_refusal_pp"] == pytest.approx(
        100 * (neutral["steered"]["rates"]["refused"]["rate"] - neutral["baseline"]["rates"]["refused"]["rate"]))
    assert [row["factor"] for row in result["push_past"]] == [1.0, 2.0]
    pushed = result["push_past"][1]
    assert pushed["alpha"] == pytest.approx(2 * refuse["alpha"])
    rates = pushed["rates"]
    assert rates["fp_refuse"]["k"] == 0  # so the corrected mean is the judge's
    assert pushed["mean_score"] == pytest.approx(sum(
        score * rates[name]["k"] for name, score in LABEL_SCORES.items()) / rates["refused"]["n"])
    assert f"2× α ({pushed['alpha']:+.2f}): refused" in result["table"][3]["value"]
    properties = [row["property"] for row in result["table"]]
    assert properties[0].startswith("Genuine harmful compliance") and any("random-direction" in p for p in properties)
    assert json.loads((tiny_run / "analysis" / "asymmetry.json").read_text())["scope"] == "global"
    page = build_report(tiny_run).read_text()
    headings = ["Strength search: comply-global", "Strength search: refuse-global", "The refuse/comply asymmetry",
                "Dense vs flat steering at matched KL"]
    positions = [page.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert page.count("data:image/png;base64") >= 2  # the two strength figures
    assert {p.name for p in (tiny_run / "analysis").glob("optimize_*.png")} == {
        "optimize_comply-global.png", "optimize_refuse-global.png"}  # drawn by the report builder
