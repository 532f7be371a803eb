"""Layer selection (methods.md, "Layer selection and strength"): ROC-AUC of ``x·v̂_l``.

Example::

    scores = layer_auc(train_acts, refused, md_vectors)   # [n_layers]
    best = top_layers(scores, k=4)
    select_layers("runs/quick", key="md/resid", k=4)["layers"]   # the same, on a run directory
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


# Arditi et al. skip the first blocks (token-level features) and the last fifth (next-token
# features); torsion's default eligible window is the same, as fractions of the depth.
DEFAULT_WINDOW = (0.25, 0.8)


def eligible_layers(n_layers: int, window: tuple[float, float] = DEFAULT_WINDOW) -> range:
    """Blocks ``int(lo·L) … int(hi·L) − 1`` for ``window = (lo, hi)``; at least one block."""
    lo, hi = window
    if not 0 <= lo < hi <= 1:
        raise TorsionError(f"layer window {list(window)} must satisfy 0 <= lo < hi <= 1; e.g. 0.25 0.8")
    start = min(math.floor(lo * n_layers + 1e-9), n_layers - 1)  # 1e-9: 0.29 * 100 is 28.999…
    return range(start, max(start + 1, math.floor(hi * n_layers + 1e-9)))


def select_layers(run_dir: str | Path, *, key: str = "md/resid", k: int = 4,
                  window: tuple[float, float] = DEFAULT_WINDOW) -> dict[str, Any]:
    """The top-``k`` blocks of a run by train-split AUC of ``x·v̂_l`` within the eligible window.

    ``key`` names the vector (``method/component[/category]``); its component's activations are
    projected. Rows: the train split's refused and complied prompts (:func:`torsion.runs.fit_rows`).

    Returns ``layers`` (best first), ``auc`` (every block), ``eligible`` and the ``prompt_ids`` used.
    """
    from torsion.capture import load_activations
    from torsion.judge.base import is_refused
    from torsion.runs import fit_rows, labelled_prompts
    from torsion.store import RunDir
    from torsion.vectors import load_vectors

    run = RunDir(Path(run_dir))
    vectors = load_vectors(run.vectors_path)
    if key not in vectors:
        raise TorsionError(f"{run.vectors_path} has no vector {key!r}; choose one of: {', '.join(sorted(vectors))}")
    component = key.split("/")[1] if key.count("/") >= 1 else "resid"
    prompts, responses = labelled_prompts(run)
    rows = fit_rows(prompts, responses)
    activations, _ = load_activations(run.activations_path)
    refused = torch.tensor([is_refused(responses[i]["score"]) for i in rows])
    auc = layer_auc(activations[component][rows], refused, vectors[key].directions)
    eligible = eligible_layers(len(auc), window)
    if k > len(eligible):
        raise TorsionError(f"top-{k} needs {k} eligible blocks but the layer window {list(window)} leaves "
                           f"{len(eligible)} (blocks {eligible.start}..{eligible.stop - 1}); lower --top-k or "
                           "widen --layer-window")
    layers = [eligible[i] for i in top_layers(auc[eligible.start:eligible.stop], k)]
    return {"layers": layers, "auc": auc.tolist(), "eligible": [eligible.start, eligible.stop - 1],
            "window": list(window), "key": key, "prompt_ids": [prompts[i].id for i in rows]}
