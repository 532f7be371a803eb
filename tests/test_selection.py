import numpy as np
import pytest
import torch

from torsion.errors import TorsionError
from torsion.selection import layer_auc, roc_auc, top_layers


def test_roc_auc_hand_computation():
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4
    # pairs (pos > neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.5 -> 1.5
    # AUC = (3 + 1.5) / (2 * 3) = 0.75
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.4])
    positive = np.array([True, True, False, False, False])
    assert roc_auc(scores, positive) == pytest.approx(0.75)


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores, positive = rng.normal(size=60).round(1), rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(scores, positive) == pytest.approx(pairwise)


def test_layer_auc_finds_the_separating_layer():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 8, generator=generator)
    refused = torch.arange(80) % 2 == 0
    x[refused, 1, 0] += 4.0  # only layer 1 separates, along dimension 0
    axes = torch.zeros(3, 8)
    axes[:, 0] = 1.0
    auc = layer_auc(x, refused, axes)
    assert auc[1] > 0.95 and abs(auc[0] - 0.5) < 0.2 and abs(auc[2] - 0.5) < 0.2
    assert top_layers(auc, 1) == [1]


def test_errors():
    with pytest.raises(TorsionError, match="needs both classes"):
        roc_auc(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(TorsionError, match="k=5"):
        top_layers(np.ones(3), 5)


def test_a_category_scores_layers_on_its_own_train_rows(tiny_run):
    """select_layers for ``md/resid/<category>`` and the category geometry's default layers use only that
    category's train rows: checked against sklearn's AUC on those rows, computed here."""
    from sklearn.metrics import roc_auc_score

    from torsion.analysis.categories import run_categories
    from torsion.capture import load_activations
    from torsion.selection import category_layers, select_layers
    from torsion.store import RunDir, read_jsonl
    from torsion.vectors import load_vectors

    prompts = read_jsonl(tiny_run / "prompts.jsonl")
    responses = read_jsonl(tiny_run / "responses.jsonl")
    assert all(r["correction"] is None for r in responses)  # so the judge's scores are the fit scores
    scores = {r["id"]: r["score"] for r in responses}
    activations, _ = load_activations(tiny_run / "activations.safetensors")
    vectors = load_vectors(tiny_run / "vectors.safetensors")
    chosen = {}
    for category in ("a", "b"):
        rows = [i for i, p in enumerate(prompts) if p["split"] == "train" and p["category"] == category
                and scores[p["id"]] in (1.0, 0.5, -0.5, -1.0)]
        unit = vectors[f"md/resid/{category}"].directions.double()
        unit = unit / unit.norm(dim=-1, keepdim=True)
        projections = torch.einsum("nld,ld->nl", activations["resid"][rows].double(), unit).numpy()
        refused = [scores[prompts[i]["id"]] > 0 for i in rows]
        expected = [roc_auc_score(refused, projections[:, layer]) for layer in range(4)]
        selected = select_layers(tiny_run, key=f"md/resid/{category}", k=2, window=(0.0, 1.0))
        assert selected["auc"] == pytest.approx(expected)
        assert selected["prompt_ids"] == [prompts[i]["id"] for i in rows]
        chosen[category] = top_layers(np.array(expected)[1:3], 2)  # the default window: blocks 1..2
        chosen[category] = [1 + layer for layer in chosen[category]]
    assert category_layers(tiny_run, key="md/resid", categories=["a", "b"]) == chosen
    result = run_categories(RunDir(tiny_run).root)
    assert result["conventions"]["layers"] == sorted(set(chosen["a"]) | set(chosen["b"]))
    assert result["conventions"]["category_layers"] == chosen
