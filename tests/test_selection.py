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
