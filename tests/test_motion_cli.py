"""`torsion analyze motion | hedge | stability` end to end on a tiny run, and their bad input."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from torsion.analysis.motion import orthogonal_fraction
from torsion.cli import main


def test_motion_and_hedge_run_end_to_end_and_the_fraction_recomputes_from_the_file(tiny_run, capsys):
    common = ["--layers", "1", "--readout-blocks", "1", "3", "--k", "2", "--n-prompts", "6", "--bootstrap", "50"]
    assert main(["analyze", "motion", str(tiny_run), "--alpha", "-2", "-4", *common]) == 0
    motion = json.loads((tiny_run / "analysis" / "motion.json").read_text())
    tensors = load_file(str(tiny_run / "analysis" / "motion.safetensors"))
    assert motion["steered_blocks"] == [1] and motion["readout_blocks"] == [1, 3]
    stats = motion["alphas"]["-2"]["blocks"]["3"]["generated"]
    recomputed = orthogonal_fraction(tensors["u/-2/3"], tensors["axis/1"])
    assert float(recomputed) == pytest.approx(stats["orthogonal_fraction_steered_axis"]["estimate"], abs=1e-5)
    assert stats["u_norm"]["estimate"] == pytest.approx(float(tensors["u/-2/3"].norm()), rel=1e-5)
    assert motion["alphas"]["-4"]["steering"]["alpha"] == [-4.0]
    before = sorted(p.stat().st_mtime_ns for p in (tiny_run / "motion").glob("*.safetensors"))

    assert main(["analyze", "hedge", str(tiny_run), "--alpha", "-2", "-4", *common, "--permutations", "50"]) == 0
    hedge = json.loads((tiny_run / "analysis" / "hedge.json").read_text())
    after = sorted(p.stat().st_mtime_ns for p in (tiny_run / "motion").glob("*.safetensors"))
    assert before == after
    block = hedge["blocks"]["3"]
    assert sum(block["counts"].values()) <= 12 and hedge["causal_test"]["run"] is False
    assert block["geometry"] is None or "bow" in block


def test_stability_command_writes_its_file(tiny_run):
    assert main(["analyze", "stability", str(tiny_run), "--subsamples", "20"]) == 0
    result = json.loads((tiny_run / "analysis" / "stability.json").read_text())
    entry = result["entries"][0]
    for field in ("kind", "name", "block", "component", "n_pool", "sizes", "instability_deg", "k", "a",
                  "floor_deg", "floor_ci", "structural"):
        assert field in entry
    assert result["parameters"]["reference"] == "split" and "global" in {e["kind"] for e in result["entries"]}
    assert any("reference split" in s for s in result["skipped"])  # the tiny run's bins hold fewer than 2m rows
    assert main(["analyze", "stability", str(tiny_run), "--subsamples", "20", "--reference", "pool"]) == 0
    pool = json.loads((tiny_run / "analysis" / "stability.json").read_text())
    assert pool["parameters"] == {"reference": "pool", "methods_md_definition": True}
    assert {e["kind"] for e in pool["entries"]} >= {"global", "bin"}
    assert all("eta2_category" in e for e in pool["entries"] if e["kind"] == "bin")
    assert all(e["instability_deg"][-1] == 0 for e in pool["entries"])  # n = N is the pool itself


@pytest.mark.parametrize("args, message", [
    (["analyze", "motion", "{run}", "--k", "0"], "--k: '0' is not a whole number >= 1"),
    (["analyze", "hedge", "{run}", "--layers", "2", "--readout-blocks", "1"], "before the first steered block"),
])
def test_bad_motion_input_is_one_line(tiny_run, capsys, args, message):
    code = main([a.replace("{run}", str(tiny_run)) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_run_without_capture_is_one_line(tmp_path, tiny_run, capsys):
    (tiny_run / "activations.safetensors").unlink()
    assert main(["analyze", "stability", str(tiny_run)]) == 2
    assert "no activations.safetensors" in capsys.readouterr().err
    (tiny_run / "vectors.safetensors").unlink()
    assert main(["analyze", "motion", str(tiny_run), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "no vectors.safetensors" in err and err.count("\n") == 1


def test_report_has_the_three_sections(tiny_run):
    common = ["--layers", "1", "--readout-blocks", "2", "3", "--k", "2", "--n-prompts", "6", "--bootstrap", "30"]
    assert main(["analyze", "motion", str(tiny_run), "--alpha", "-2", *common]) == 0
    assert main(["analyze", "hedge", str(tiny_run), "--alpha", "-2", *common, "--permutations", "30"]) == 0
    assert main(["analyze", "stability", str(tiny_run), "--subsamples", "10"]) == 0
    page = (tiny_run / "report.html").read_text()
    assert page.index("<h2>Orthogonal motion") < page.index("<h2>Hedge geometry") < page.index("<h2>Learning-curve")
    for name in ("motion", "hedge", "stability"):
        assert (tiny_run / "analysis" / f"{name}.png").is_file()


def test_causal_hedge_bookkeeping_by_hand():
    from torsion.analysis.hedge_causal import consistency, rate_changes
    from torsion.judge.correction import corrected

    base = [corrected("strong_refuse"), corrected("strong_comply"), corrected("judge_error")]
    steered = [corrected("strong_comply"), corrected("strong_comply"), corrected("weak_comply")]
    changes = rate_changes(base, steered)
    # judged rows: 2 before (1 refuse, 1 comply), 3 after (2 strong, 1 weak comply)
    assert changes["strong_comply"] == pytest.approx(2 / 3 - 1 / 2) and changes["strong_refuse"] == pytest.approx(-0.5)
    assert changes["weak_comply"] == pytest.approx(1 / 3)
    assert consistency(base, steered) == {"n": 2, "up": 0, "down": 1, "same": 1, "share": 0.5,
                                          "direction": "toward compliance"}


def test_causal_hedge_counts_corrected_behaviour():
    """An fp_refuse comply is refused (+0.5) and never genuine compliance, in rates and consistency alike."""
    from torsion.analysis.hedge_causal import consistency, rate_changes
    from torsion.judge.correction import corrected

    base = [corrected("strong_comply"), corrected("strong_comply")]
    steered = [corrected("strong_comply", "fp_refuse"), corrected("strong_comply")]
    changes = rate_changes(base, steered)
    assert changes["refused"] == pytest.approx(0.5) and changes["genuine_strong_comply"] == pytest.approx(-0.5)
    assert consistency(base, steered)["up"] == 1


def test_hedge_runs_the_causal_test_when_there_is_geometry(tiny_run, monkeypatch):
    from tiny_run import OracleJudge

    from torsion.analysis import motion_run
    from torsion.models import load_model

    monkeypatch.setattr(motion_run, "get_judge", lambda name: OracleJudge())
    lm = load_model(str(json.loads((tiny_run / "manifest.json").read_text())["model"]["spec"]))
    result = motion_run.run_hedge(tiny_run, lm, B=20, P=20, m=2, n_random=2, alphas=[-2, -4], layers=[1],
                                  readout_blocks=[3], k=2, n_prompts=8)
    assert result["blocks"]["3"]["geometry"] == "ok"
    causal = result["causal_test"]
    assert causal["run"] is True and causal["block"] == 3 and causal["random"]["n"] == 2
    assert len(causal["hedge_direction"]["labels"]) == 8
    assert causal["judge"] == OracleJudge().name  # the steered arms use the run's judge, not the rule judge


def test_stability_figure_without_a_curve(tmp_path):
    from torsion.report.motion_figures import stability_figure

    entry = {"kind": "global", "name": "md", "block": 0, "component": "resid", "sizes": [5], "instability_deg": [0.0],
             "k": None, "a": None, "floor_deg": None}
    path = stability_figure({"entries": [entry], "threshold_deg": 15.0}, tmp_path / "s.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_motion_grid_comes_from_the_method_search_range():
    import torch

    from torsion.analysis.motion_run import strength_grid
    from torsion.steering import get_method

    flat = get_method("flat", vectors=torch.ones(4, 8), layers=[1])
    assert strength_grid(flat) == [-1.0, -2.0, -3.0, -4.0]
    assert strength_grid(get_method("ablation", directions=torch.ones(8))) == [0.25, 0.5, 0.75, 1.0]


def test_motion_sweeps_any_steering_method_and_records_it(tiny_run):
    common = ["--layers", "1", "--readout-blocks", "3", "--k", "2", "--n-prompts", "4", "--bootstrap", "20"]
    assert main(["analyze", "motion", str(tiny_run), "--method", "ablation", *common]) == 0
    motion = json.loads((tiny_run / "analysis" / "motion.json").read_text())
    assert motion["method"]["name"] == "ablation" and motion["conventions"]["strength_name"] == "beta"
    assert sorted(motion["alphas"]) == ["0.25", "0.5", "0.75", "1"]
    steering = motion["alphas"]["1"]["steering"]
    assert steering["method"] == "ablation" and steering["strength"] == 1.0
    assert all(norm > 0 for norm in steering["mean_delta_norm"])  # measured while generating
    assert (tiny_run / "motion" / "ablation_0.25.safetensors").is_file()
    assert not (tiny_run / "motion" / "alpha_0.25.safetensors").exists()
