"""Category geometry on planted vectors at known angles, and on a synthetic run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from torsion.analysis.categories import category_geometry, complied_means, pairwise_summary, run_categories
from torsion.data import Prompt, write_prompts_jsonl
from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES
from torsion.report.geometry_figures import categories_figure
from torsion.store import RunDir, append_jsonl
from torsion.vectors import SteeringVector, save_vectors

D_MODEL, N_LAYERS = 16, 3


def planted(angles_deg_per_layer: list[list[float]], scales: list[float] | None = None,
            seed: int = 0) -> list[torch.Tensor]:
    """One ``[n_layers, d_model]`` vector per angle: at layer ``l`` they lie in a random plane at the given angles."""
    generator = torch.Generator().manual_seed(seed)
    n = len(angles_deg_per_layer[0])
    vectors = torch.zeros(n, len(angles_deg_per_layer), D_MODEL, dtype=torch.float64)
    for layer, angles in enumerate(angles_deg_per_layer):
        basis, _ = torch.linalg.qr(torch.randn(D_MODEL, 2, generator=generator, dtype=torch.float64))
        for i, angle in enumerate(angles):
            theta = math.radians(angle)
            unit = math.cos(theta) * basis[:, 0] + math.sin(theta) * basis[:, 1]
            vectors[i, layer] = (scales or [1.0] * n)[i] * unit
    return list(vectors.float())


def test_planted_sixty_degree_categories_recover_the_summary():
    # three categories at 0°, 60°, 120° in every layer: pairs at 60, 60, 120
    a, b, c, glob = planted([[0, 60, 120, 60]] * N_LAYERS, scales=[1.0, 5.0, 0.3, 2.0])
    result = category_geometry({"b": b, "a": a, "c": c}, glob, layers=range(N_LAYERS),
                               anchors={"a": "category", "b": "global", "c": "category"})
    pairwise = result["vector_pairwise"]
    assert pairwise["names"] == ["a", "b", "c"] and pairwise["n_pairs"] == 3
    assert pairwise["mean_deg"] == pytest.approx(80.0, abs=1e-3)
    assert pairwise["sd_deg"] == pytest.approx(float(np.std([60, 60, 120], ddof=1)), abs=1e-3)  # 34.641
    assert pairwise["min_deg"] == pytest.approx(60.0, abs=1e-3)
    assert pairwise["max_deg"] == pytest.approx(120.0, abs=1e-3)
    assert {(p["a"], p["b"]): round(p["angle_deg"], 3) for p in pairwise["pairs"]} == {
        ("a", "b"): 60.0, ("a", "c"): 120.0, ("b", "c"): 60.0}
    assert result["angle_to_global_deg"] == pytest.approx({"a": 60.0, "b": 0.0, "c": 60.0}, abs=1e-3)
    assert result["anchors"] == {"a": "category", "b": "global", "c": "category"}
    assert result["categories"] == ["a", "b", "c"]
    assert result["comply_activation"]["mean_deg"] is None  # no activations given


def test_pair_angle_is_the_mean_over_layers_of_the_per_layer_angle():
    # layer 0: 40°, layer 1: 80°, layer 2: 150° apart; only layers 0 and 1 are selected
    x, y = planted([[0, 40], [10, 90], [0, 150]])
    summary = pairwise_summary({"x": x, "y": y}, layers=[0, 1])
    assert summary["mean_deg"] == pytest.approx(60.0, abs=1e-3)
    assert summary["sd_deg"] is None and summary["n_pairs"] == 1
    assert pairwise_summary({"x": x, "y": y}, layers=[2])["mean_deg"] == pytest.approx(150.0, abs=1e-3)


def test_signed_cosine_opposite_vectors_are_180_degrees_apart():
    x = torch.randn(N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(0))
    assert pairwise_summary({"x": x, "minus_x": -x}, layers=[0, 2])["mean_deg"] == pytest.approx(180.0, abs=1e-3)


def test_pairwise_needs_two_categories():
    with pytest.raises(TorsionError, match="at least 2 categories"):
        pairwise_summary({"only": torch.ones(N_LAYERS, D_MODEL)}, layers=[0])


def test_complied_means_keep_groups_with_three_complied_samples():
    activations = torch.arange(7 * N_LAYERS * D_MODEL, dtype=torch.float32).reshape(7, N_LAYERS, D_MODEL)
    groups = ["a", "a", "a", "a", "b", "b", "b"]
    complied = [True, True, False, True, True, True, False]
    means, counts = complied_means(activations, groups, complied)
    assert counts == {"a": 3, "b": 2}
    assert list(means) == ["a"]
    torch.testing.assert_close(means["a"], activations[[0, 1, 3]].double().mean(0))


def write_run(root, categories_vectors: dict[str, torch.Tensor], global_vector: torch.Tensor,
              activations: torch.Tensor, rows: list[dict]) -> RunDir:
    run = RunDir(root)
    vectors = {"md/resid": SteeringVector(global_vector, {"anchor": "global"})}
    for name, vector in categories_vectors.items():
        vectors[f"md/resid/{name}"] = SteeringVector(vector, {"anchor": "category" if name != "c" else "global"})
    vectors["md/attn/a"] = SteeringVector(-global_vector, {"anchor": "global"})  # another component: ignored
    save_vectors(run.vectors_path, vectors, run_meta={})
    save_file({"resid": activations}, str(run.activations_path), metadata={"primary_position": "last"})
    write_prompts_jsonl(run.prompts_path, [Prompt(id=r["id"], prompt=f"prompt {r['id']}", category=r["category"],
                                                  source="test", prompt_hash="-", split=r["split"]) for r in rows])
    append_jsonl(run.responses_path, [{"id": r["id"], "score": r["score"], "response": "",
                                       "label": {v: k for k, v in LABEL_SCORES.items()}[r["score"]],
                                       "correction": r.get("correction")} for r in rows])
    return run


def test_run_categories_reads_the_run_and_records_anchors(tmp_path):
    a, b, c, glob = planted([[0, 60, 120, 30]] * N_LAYERS)
    # complied means planted 90° apart for groups a and b; c has only 2 complied rows; holdout rows ignored
    m_a, m_b, m_c = planted([[0, 90, 45]] * N_LAYERS, seed=1)
    rows, acts = [], []
    for category, mean, scores in (("a", m_a, [-1, -0.5, -1, 1]), ("b", m_b, [-1, -1, -0.5, 0.5]),
                                   ("c", m_c, [-1, -1, 1, 2])):
        for k, score in enumerate(scores):
            rows.append({"id": f"{category}{k}", "category": category, "split": "train", "score": score})
            acts.append(mean if score in (-1, -0.5) else torch.randn(N_LAYERS, D_MODEL))
    rows.append({"id": "h0", "category": "c", "split": "holdout", "score": -1})
    acts.append(m_c)
    run = write_run(tmp_path / "run", {"a": a, "b": b, "c": c}, glob, torch.stack(acts), rows)
    result = run_categories(run.root, layers=[0, 2])
    saved = json.loads(run.analysis_path("categories").read_text())
    assert saved == json.loads(json.dumps(result))
    assert not run.analysis_path("categories").with_suffix(".png").exists()  # analyses return data; report/ draws
    assert categories_figure(saved, tmp_path / "categories.png").read_bytes().startswith(b"\x89PNG")
    assert saved["anchors"] == {"a": "category", "b": "category", "c": "global"}
    assert saved["vector_pairwise"]["mean_deg"] == pytest.approx(80.0, abs=1e-3)
    assert saved["angle_to_global_deg"] == pytest.approx({"a": 30.0, "b": 30.0, "c": 90.0}, abs=1e-3)
    comply = saved["comply_activation"]
    assert comply["complied_counts"] == {"a": 3, "b": 3, "c": 2}
    assert comply["names"] == ["a", "b"] and comply["mean_deg"] == pytest.approx(90.0, abs=1e-3)
    conventions = saved["conventions"]
    assert conventions["layers"] == [0, 2] and conventions["component"] == "resid"
    assert conventions["position"] == "last" and conventions["split"] == "train"
    assert saved["schema_version"] == 1 and saved["analysis"] == "categories"


@pytest.mark.parametrize("layers", [[-1], [0, 3], [99]])
def test_layers_outside_the_blocks_are_refused_not_wrapped(tmp_path, layers):
    a, b, glob = planted([[0, 60, 30]] * N_LAYERS)
    with pytest.raises(TorsionError, match=rf"layer {layers[-1]} is out of range; this model has blocks 0..2"):
        category_geometry({"a": a, "b": b}, glob, layers=layers, anchors={})
    with pytest.raises(TorsionError, match="out of range"):
        pairwise_summary({"a": a, "b": b}, layers=layers)


def test_comply_activation_uses_the_corrected_labels(tmp_path):
    """A strong comply corrected to fp_refuse counts as refused, and an fp_echo never fits: a's complied
    count drops from 3 to 1, below the 3 a mean needs."""
    a, b, _, glob = planted([[0, 60, 120, 30]] * N_LAYERS)
    rows, acts = [], []
    for category, corrections in (("a", ["fp_refuse", None, "fp_echo", None]), ("b", [None, None, None, None])):
        for k, correction in enumerate(corrections):
            score = -1 if k < 3 else 1
            rows.append({"id": f"{category}{k}", "category": category, "split": "train", "score": score,
                         "correction": correction if score == -1 else None})
            acts.append(torch.randn(N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(len(rows))))
    run = write_run(tmp_path / "run", {"a": a, "b": b}, glob, torch.stack(acts), rows)
    comply = run_categories(run.root, layers=[0])["comply_activation"]
    assert comply["complied_counts"] == {"a": 1, "b": 3}


def test_a_finished_run_missing_responses_names_the_real_fix(tmp_path):
    from torsion.runs import labelled_prompts

    a, b, _, glob = planted([[0, 60, 120, 30]] * N_LAYERS)
    rows = [{"id": f"a{k}", "category": "a", "split": "train", "score": -1} for k in range(2)]
    run = write_run(tmp_path / "run", {"a": a, "b": b}, glob, torch.randn(2, N_LAYERS, D_MODEL), rows)
    with open(run.prompts_path, "a") as handle:
        handle.write(json.dumps({"id": "new", "prompt": "added later", "category": "a", "source": "test",
                                 "prompt_hash": "-", "split": "train"}) + "\n")
    with pytest.raises(TorsionError, match="no response yet"):
        labelled_prompts(run)
    with run.stage("generate"):
        pass
    with pytest.raises(TorsionError, match="generate stage is done.*was changed; restore them"):
        labelled_prompts(run)
