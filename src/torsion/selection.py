"""Layer selection (methods.md, "Layer selection and strength"): ROC-AUC of ``x·v̂_l``.

Example::

    scores = layer_auc(train_acts, refused, md_vectors)   # [n_layers]
    best = top_layers(scores, k=4)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from torsion.errors import TorsionError


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC by the Mann-Whitney rank formula; ties count one half.

    Args:
        scores: ``[n]`` projections.
        positive: ``[n]`` booleans (refused).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise TorsionError(f"AUC needs both classes (got {n_pos} refused, {n_neg} complied); use more prompts")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def layer_auc(activations: Tensor, refused: Tensor, vectors: Tensor) -> np.ndarray:
    """AUC of the projection on each layer's unit axis against the refused label.

    Args:
        activations: ``[n_prompts, n_layers, d_model]``, train split only.
        refused: ``[n_prompts]`` booleans.
        vectors: ``[n_layers, d_model]`` axes (fit on the same train split).

    Returns:
        ``[n_layers]`` AUCs; 0.5 is chance, 1.0 a perfect separation along ``+v``.
    """
    units = vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections = torch.einsum("nld,ld->nl", activations.double(), units).numpy()
    labels = refused.numpy().astype(bool)
    return np.array([roc_auc(projections[:, layer], labels) for layer in range(projections.shape[1])])


def top_layers(auc: np.ndarray, k: int) -> list[int]:
    """The ``k`` layers with the highest AUC, best first (ties broken by the earlier layer)."""
    if not 1 <= k <= len(auc):
        raise TorsionError(f"top-k needs 1 <= k <= {len(auc)} layers, got k={k}")
    order = sorted(range(len(auc)), key=lambda layer: (-auc[layer], layer))
    return order[:k]
