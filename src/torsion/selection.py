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
    projected. Rows: the train split's refused and complied prompts after correction and review
    (:func:`torsion.runs.fit_rows`); for a category vector (``method/component/category``), that
    category's rows only (methods.md: a per-category search scores layers on its own train rows).

    Returns ``layers`` (best first), ``auc`` (every block), ``eligible``, ``rows`` and the ``prompt_ids`` used.
    """
    return _Run(run_dir).select(key, k, window)


def category_layers(run_dir: str | Path, *, key: str, categories: list[str], k: int = 4,
                    window: tuple[float, float] = DEFAULT_WINDOW) -> dict[str, list[int] | None]:
    """Each category's top-``k`` blocks for its vector ``key/<category>``, scored on that category's
    own train rows (``k`` is capped at the eligible window's size); None for a category whose train
    rows lack refused or complied rows."""
    run = _Run(run_dir)
    chosen: dict[str, list[int] | None] = {}
    for category in categories:
        name = f"{key}/{category}"
        n_layers = run.vectors[name].directions.shape[0] if name in run.vectors else 1
        try:
            chosen[category] = run.select(name, min(k, len(eligible_layers(n_layers, window))), window)["layers"]
        except TorsionError as error:
            if "AUC needs both classes" not in str(error):
                raise
            chosen[category] = None
    return chosen


class _Run:
    """A run's labelled prompts, activations and vectors, loaded once for several selections."""

    def __init__(self, run_dir: str | Path) -> None:
        from torsion.capture import load_activations
        from torsion.runs import labelled_prompts
        from torsion.store import RunDir
        from torsion.vectors import load_vectors

        run = RunDir(Path(run_dir))
        self.vectors_path = run.vectors_path
        self.vectors = load_vectors(run.vectors_path)
        self.prompts, self.responses = labelled_prompts(run)
        self.activations, _ = load_activations(run.activations_path)

    def select(self, key: str, k: int, window: tuple[float, float]) -> dict[str, Any]:
        from torsion.judge.base import is_refused
        from torsion.runs import fit_rows, fit_scores

        if key not in self.vectors:
            raise TorsionError(f"{self.vectors_path} has no vector {key!r}; choose one of: "
                               f"{', '.join(sorted(self.vectors))}")
        parts = key.split("/")
        component = parts[1] if len(parts) >= 2 else "resid"
        category = parts[2] if len(parts) >= 3 else None
        rows = fit_rows(self.prompts, self.responses, category=category)
        refused = torch.tensor([is_refused(score) for score in fit_scores(self.responses, rows)])
        auc = layer_auc(self.activations[component][rows], refused, self.vectors[key].directions)
        eligible = eligible_layers(len(auc), window)
        if k > len(eligible):
            raise TorsionError(f"top-{k} needs {k} eligible blocks but the layer window {list(window)} leaves "
                               f"{len(eligible)} (blocks {eligible.start}..{eligible.stop - 1}); lower --top-k or "
                               "widen --layer-window")
        layers = [eligible[i] for i in top_layers(auc[eligible.start:eligible.stop], k)]
        return {"layers": layers, "auc": auc.tolist(), "eligible": [eligible.start, eligible.stop - 1],
                "window": list(window), "key": key,
                "rows": "train" + (f", category {category}" if category else ""),
                "prompt_ids": [self.prompts[i].id for i in rows]}
