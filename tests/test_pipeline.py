"""The main job end to end on a tiny random model saved as a Hugging Face directory."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from torsion.pipeline import STAGES, run_pipeline
from torsion.store import read_jsonl

from tiny_run import OracleJudge, run_config as _config

def test_pipeline_files_and_vectors_equal_recomputation(tmp_path, tiny_model_dir, prompt_file):
    out = tmp_path / "run"
    run_pipeline(_config(tiny_model_dir, prompt_file), out, judge=OracleJudge(), log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["done"] for s in STAGES)
    for name in ("rotation", "propagation", "random_control", "categories"):
        assert json.loads((out / "analysis" / f"{name}.json").read_text())["analysis"] == name
    assert manifest["model"]["n_layers"] == 4 and manifest["model"]["d_model"] == 32
    prompts = read_jsonl(out / "prompts.jsonl")
    responses = {r["id"]: r for r in read_jsonl(out / "responses.jsonl")}
    assert len(prompts) == 40 and set(responses) == {p["id"] for p in prompts}
    assert set(prompts[0]) == {"id", "prompt", "category", "source", "split", "prompt_hash"}
    assert sum(p["split"] == "holdout" for p in prompts) == 8

    rotation = json.loads((out / "analysis" / "rotation.json").read_text())
    assert set(rotation["components"]) == {"resid", "attn", "mlp"}
    acts = load_file(out / "activations.safetensors")
    vectors = load_file(out / "vectors.safetensors")
    scores = np.array([responses[p["id"]]["score"] for p in prompts])
    train = np.array([p["split"] == "train" for p in prompts])
    for component in ("resid", "attn", "mlp"):
        x = acts[component].astype(np.float64)
        assert x.shape == (40, 4, 32)
        refused = x[train & np.isin(scores, [0.5, 1.0])]
        complied = x[train & np.isin(scores, [-0.5, -1.0])]
        expected = refused.mean(0) - complied.mean(0)
        np.testing.assert_allclose(vectors[f"md/{component}"], expected, rtol=1e-5, atol=1e-5)
        categories = np.array([p["category"] for p in prompts])
        for category in ("a", "b"):  # refused-in-category minus its own complied mean (>= 3) or the global one
            own = train & (categories == category)
            own_complied = x[own & np.isin(scores, [-0.5, -1.0])]
            anchor = own_complied.mean(0) if len(own_complied) >= 3 else complied.mean(0)
            np.testing.assert_allclose(vectors[f"md/{component}/{category}"],
                                       x[own & np.isin(scores, [0.5, 1.0])].mean(0) - anchor, rtol=1e-5, atol=1e-5)
        v = vectors[f"md/{component}"].astype(np.float64)  # adjacent-pair angles, from the saved vectors
        cos = (v[:-1] * v[1:]).sum(1) / np.linalg.norm(v[:-1], axis=1) / np.linalg.norm(v[1:], axis=1)
        angles = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        np.testing.assert_allclose(rotation["components"][component]["pair_angles_deg"], angles, atol=1e-3)
    report = (out / "report.html").read_text()
    assert "<img" in report
    sections = ["Axis rotation", "Causal propagation", "Random-direction control", "Category geometry"]
    positions = [report.index(f"<h2>{name}") for name in sections]
    assert positions == sorted(positions)  # the write-up's order


def test_pipeline_resumes_without_redoing_work(tmp_path, tiny_model_dir, prompt_file):
    out = tmp_path / "run"
    config = _config(tiny_model_dir, prompt_file)
    run_pipeline(config, out, judge=OracleJudge(), log=lambda m: None)
    responses = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    # a kill during generation: the last batch never landed, later stages never ran
    (out / "responses.jsonl").write_text("".join(responses[:-3]))
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in STAGES[1:]:
        manifest["stages"].pop(stage)
    (out / "manifest.json").write_text(json.dumps(manifest))
    first_rows = responses[:-3]
    run_pipeline(config, out, judge=OracleJudge(), log=lambda m: None)
    again = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    assert again[:-3] == first_rows and len(again) == 40  # finished rows kept, only 3 regenerated
    before = (out / "vectors.safetensors").stat().st_mtime_ns
    run_pipeline(config, out, judge=OracleJudge(), log=lambda m: None)  # finished: does nothing
    assert (out / "vectors.safetensors").stat().st_mtime_ns == before


def test_changed_settings_are_refused(tmp_path, tiny_model_dir, prompt_file):
    from torsion.errors import TorsionError

    out = tmp_path / "run"
    (out).mkdir()
    (out / "manifest.json").write_text(json.dumps({"config": {"seed": 123}}))
    with pytest.raises(TorsionError, match="different settings"):
        run_pipeline(_config(tiny_model_dir, prompt_file), out, judge=OracleJudge(), log=lambda m: None)


def test_a_resume_may_change_only_the_batch_sizes(tmp_path, tiny_model_dir, prompt_file):
    from torsion.pipeline import _check_config
    from torsion.errors import TorsionError
    from torsion.store import RunDir

    config = _config(tiny_model_dir, prompt_file)
    run = RunDir(tmp_path / "run")
    run.update_manifest(config={**config.to_dict(), "generation_batch_size": 8, "capture_batch_size": 4})
    _check_config(run, config)  # batch sizes change speed, not results: accepted
    run.update_manifest(config={**config.to_dict(), "generation_batch_size": 8, "max_new_tokens": 99})
    with pytest.raises(TorsionError, match=r"different settings \(max_new_tokens\)"):
        _check_config(run, config)


def test_arditi_check_selects_on_train_and_tests_on_holdout(tmp_path, tiny_model_dir, prompt_file, monkeypatch):
    import torsion.analysis.arditi as arditi
    import torsion.behaviour as behaviour
    from torsion.capture import encode
    from torsion.models import load_model
    from torsion.optimize import neutral_halves
    from torsion.orthogonalize import orthogonalize_weights
    from torsion.store import RunDir
    from torsion.vectors import load_vectors

    out = tmp_path / "run"
    run_pipeline(_config(tiny_model_dir, prompt_file), out, judge=OracleJudge(), log=lambda m: None)
    seen = []
    original = behaviour.iter_generate
    monkeypatch.setattr(behaviour, "iter_generate", lambda lm, batch, s: seen.extend(batch) or original(lm, batch, s))
    from torsion.judge import RuleJudge

    result = arditi.run_arditi(out, load_model(str(tiny_model_dir)), alphas=(0.0, 2.0), n_neutral=6, max_new_tokens=3,
                               judge=RuleJudge())  # the run's own judge is a test oracle
    assert result["conventions"]["judge"] == RuleJudge().name
    prompts = read_jsonl(out / "prompts.jsonl")
    train = {p["prompt"] for p in prompts if p["split"] == "train"}
    holdout = [p["prompt"] for p in prompts if p["split"] == "holdout"]
    assert result["n_holdout_harmful"] == len(holdout) == 8
    assert not train & set(seen)  # no prompt used to choose the direction is evaluated
    assert 1 <= result["layer"] <= 2 and len(result["layer_auc"]) == 4  # eligible: blocks int(L/4) .. int(0.8 L) - 1
    ablated = result["holdout_harmful"]["ablated"]
    assert ablated["n"] == 8 and ablated["k"] == ablated["classes"]["refused"]["k"]  # the rule judge never errors
    zero, two = result["neutral"]["added"]
    assert zero["k"] == result["neutral"]["baseline"]["k"]
    axis = load_vectors(out / "vectors.safetensors")["md/resid"].directions[result["layer"]]
    assert two["applied_norm"] == pytest.approx(2 * float(axis.double().norm()), rel=1e-6)
    neutral_seen = set(seen) - {p["prompt"] for p in prompts}
    assert neutral_seen <= {p.prompt for p in neutral_halves(RunDir(out))[1]}  # only the half no search saw
    assert len(neutral_seen) == result["n_neutral"] == 6
    # the KLs by an independent route: one unpadded prompt at a time; ablation as orthogonalised
    # weights (no hook), addition as a hand-written hook adding 2 v to the chosen block's output
    lm = load_model(str(tiny_model_dir))
    edited = orthogonalize_weights(lm, axis)

    def add_two_v(_module, _inputs, output):
        return (output[0] + 2 * axis,) + tuple(output[1:]) if isinstance(output, tuple) else output + 2 * axis

    kl_ablation, kl_added = [], []
    with torch.no_grad():
        for prompt in sorted(neutral_seen):
            ids = encode(lm, [prompt])
            base = lm.model(**ids).logits[0, -1].double().log_softmax(-1)
            ablated = edited.model(**ids).logits[0, -1].double().log_softmax(-1)
            handle = lm.layout.blocks[result["layer"]].register_forward_hook(add_two_v)
            added = lm.model(**ids).logits[0, -1].double().log_softmax(-1)
            handle.remove()
            kl_ablation.append(float((base.exp() * (base - ablated)).sum()))
            kl_added.append(float((base.exp() * (base - added)).sum()))
    assert result["kl_neutral_ablation"]["kl_base_to_steered"] == pytest.approx(np.mean(kl_ablation), rel=1e-3)
    assert two["kl"]["kl_base_to_steered"] == pytest.approx(np.mean(kl_added), rel=1e-4)
    assert min(kl_ablation) > 0 and min(kl_added) > 0
    assert json.loads((out / "analysis" / "arditi.json").read_text())["layer"] == result["layer"]
    from torsion.report import build_report

    page = build_report(out).read_text()
    assert "Arditi et al. check" in page and page.count("added α = ") == 2
