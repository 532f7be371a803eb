"""Knots for manifold steering (methods.md, "Manifold (spline) steering"): behaviour-bin centroids.

Bins, ordered refuse → comply: ``strong_refuse``, ``weak_refuse``, optionally ``neutral``
(activations of the neutral set, passed in), ``weak_comply``, ``strong_comply``. A bin with
fewer than ``m`` train rows is dropped and recorded. A bin's position is
``t = (1 − mean score)/2`` (+1 → 0, −1 → 1, neutral → 0.5). Fewer than two kept bins is an error.

The rows are the run's fit rows (train split, refused or complied after correction:
:func:`torsion.runs.fit_rows`), binned by :func:`behaviour_labels`, the single place that reads
labels for knots.

Example::

    knots = knots_from_run(RunDir("runs/quick"), m=5)
    knots.t, knots.bins, knots.dropped       # [n_knots], names, [{"bin", "n"}]
    knots.centroids.shape                    # [n_knots, n_layers, d_model]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES

BINS: tuple[str, ...] = ("strong_refuse", "weak_refuse", "neutral", "weak_comply", "strong_comply")
NEUTRAL_SCORE = 0.0


def bin_t(mean_score: float) -> float:
    """A bin's position ``t = (1 − mean score)/2``."""
    return (1.0 - mean_score) / 2.0


@dataclass(frozen=True, eq=False)
class Knots:
    """Kept bins in order and their centroids at every block.

    ``t`` ``[n_knots]`` float64; ``centroids`` ``[n_knots, n_layers, d_model]`` float32;
    ``rows`` ``[n_rows, n_layers, d_model]`` the activations of every row in a kept bin (PCA
    input); ``mean`` ``[n_layers, d_model]`` their mean (the PCA centre ``μ``).
    """

    bins: tuple[str, ...]
    t: Tensor
    centroids: Tensor
    rows: Tensor
    counts: tuple[int, ...]
    dropped: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def mean(self) -> Tensor:
        return self.rows.double().mean(0).float()

    def summary(self) -> dict[str, Any]:
        """JSON record: kept bins with ``t`` and ``n``, and the dropped bins."""
        return {"bins": [{"bin": b, "t": float(t), "n": n} for b, t, n in zip(self.bins, self.t.tolist(), self.counts)],
                "dropped": list(self.dropped)}


def fit_knots(acts: Tensor, labels: Sequence[str], scores: Sequence[float], *, m: int = 5,
              neutral: Tensor | None = None, exclude: Mapping[str, str] | None = None) -> Knots:
    """Bin centroids from ``acts`` ``[n_rows, n_layers, d_model]`` with one label and score per row.

    ``labels`` name each row's bin (``strong_refuse`` … ``strong_comply``; other labels are
    ignored); ``scores`` are the scores that enter the bin's mean (corrected scores where the
    correction changed them). ``neutral`` ``[n, n_layers, d_model]``, if given, is the neutral bin.
    ``exclude`` maps bins to leave out to the reason, recorded in ``dropped`` (:func:`structural_bins`).
    """
    if m < 1:
        raise TorsionError(f"m={m}: a bin needs at least 1 row; pass m >= 1")
    if len(labels) != acts.shape[0] or len(scores) != acts.shape[0]:
        raise TorsionError(f"{acts.shape[0]} activation rows but {len(labels)} labels and {len(scores)} scores; "
                           "pass one label and score per row")
    kept, t, centroids, members, counts, dropped = [], [], [], [], [], []
    for name in BINS:
        if name == "neutral":
            if neutral is None:
                continue
            rows, mean_score = neutral.float(), NEUTRAL_SCORE
        else:
            index = [i for i, label in enumerate(labels) if label == name]
            rows = acts[index].float()
            mean_score = sum(scores[i] for i in index) / len(index) if index else LABEL_SCORES[name]
        if exclude and name in exclude:
            dropped.append({"bin": name, "n": int(rows.shape[0]), "reason": exclude[name]})
            continue
        if rows.shape[0] < m:
            dropped.append({"bin": name, "n": int(rows.shape[0]), "reason": f"fewer than m={m} rows"})
            continue
        kept.append(name)
        t.append(bin_t(mean_score))
        centroids.append(rows.double().mean(0).float())
        members.append(rows)
        counts.append(int(rows.shape[0]))
    if len(kept) < 2:
        found = ", ".join(f"{d['bin']}={d['n']}" for d in dropped) or "none"
        raise TorsionError(f"only {len(kept)} behaviour bin(s) have at least m={m} rows ({found} dropped); "
                           "a spline needs two knots: lower --m or use a run with more labelled rows")
    order = sorted(range(len(kept)), key=lambda i: t[i])
    if len({round(t[i], 12) for i in order}) != len(order):
        raise TorsionError(f"two bins share the same t ({[round(v, 3) for v in t]}); knots need distinct positions")
    return Knots(tuple(kept[i] for i in order), torch.tensor([t[i] for i in order], dtype=torch.float64),
                 torch.stack([centroids[i] for i in order]), torch.cat(members), tuple(counts[i] for i in order),
                 tuple(dropped))


def behaviour_labels(prompts: Sequence[Any], responses: Sequence[dict]) -> tuple[list[str], list[float]]:
    """Each fit row's bin and score for knots, after false-positive correction and human review.

    The single place manifold steering reads labels. The score is the corrected one
    (:func:`torsion.runs.row_behaviour`: an ``fp_refuse`` counts +0.5, a review decision wins);
    the bin is the class with that score, so an ``fp_refuse`` joins ``weak_refuse``. ``responses``
    are rows of :func:`torsion.runs.labelled_prompts`.
    """
    from torsion.runs import row_behaviour

    del prompts  # the correction is already on each row
    by_score = {score: label for label, score in LABEL_SCORES.items()}
    scores = [row_behaviour(r).score for r in responses]
    return [by_score.get(score, "") for score in scores], scores


def structural_bins(entries: Sequence[Mapping[str, Any]], *, component: str,
                    layers: Sequence[int] | None = None) -> dict[str, str]:
    """Bins that ``analysis/stability.json`` flags ``structural`` for ``component`` (at any of ``layers``,
    default any block), each with the reason a manifold file records."""
    blocks: dict[str, list[int]] = {}
    for entry in entries:
        if (entry.get("kind") == "bin" and entry.get("component") == component and entry.get("structural") is True
                and (layers is None or entry.get("block") in layers)):
            blocks.setdefault(str(entry.get("name")), []).append(int(entry.get("block", -1)))
    return {name: f"structural in analysis/stability.json at blocks {sorted(b)} (learning-curve floor's lower CI "
                  "above the threshold: more prompts will not steady it)" for name, b in blocks.items()}


def knots_from_run(run: Any, *, m: int = 5, component: str = "resid", neutral: Tensor | None = None,
                   exclude: Mapping[str, str] | None = None) -> Knots:
    """Knots from a run directory's fit rows (train split) and ``activations.safetensors``, less ``exclude``."""
    from torsion.runs import fit_rows, labelled_prompts, run_activations

    prompts, responses = labelled_prompts(run)
    acts, _ = run_activations(run, component)
    rows = fit_rows(prompts, responses)
    labels, scores = behaviour_labels([prompts[i] for i in rows], [responses[i] for i in rows])
    return fit_knots(acts[rows], labels, scores, m=m, neutral=neutral, exclude=exclude)
