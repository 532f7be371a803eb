"""Which vectors and knots a spline may trust (methods.md, "Learning-curve floor").

Every direction a spline could lean on gets a learning curve (:mod:`torsion.analysis.learning_curve`):

- ``global``: the MD vector ``mean(X_r) − mean(X_c)``, per block and component;
- ``category``: each category's MD vector, its refused rows against its complied anchor (its
  own complied rows when it has ``min_category`` of them, else all complied rows; as
  :func:`torsion.vectors.fit_vectors`);
- ``bin``: the centroid of each behaviour bin (strong_refuse, weak_refuse, weak_comply,
  strong_comply) with at least ``m`` rows, taken about the train mean.

The curve's reference is ``split`` by default (two disjoint subsamples of the same size), not
methods.md's full pool, whose curve is 0 at ``n = N`` by construction and so cannot show a floor
(:data:`REFERENCE_NOTES`; ``reference="pool"`` keeps methods.md's definition, and
``parameters.reference`` records which). A direction whose floor's lower CI exceeds
``threshold_deg`` is ``structural``: more prompts of
the same kind will not steady it. Bins also get the contamination diagnostic: the within-bin
angular spread against that of random rows, and η² of the bin's first PC against prompt
category (a high η² bin encodes topic, not behaviour).

Example::

    result = analyze_stability({"resid": x}, scores, labels, categories, B=200, seed=0)  # reference="split"
    [e for e in result["entries"] if e["kind"] == "bin" and e["structural"]]
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.learning_curve import (A_MAX, MIN_FIT_SIZES, REFERENCES, centred_gram, learning_curve_entry,
                                             reference_sizes, subsample_angles)
from torsion.capture import load_activations
from torsion.conventions import COMPONENTS, LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.geometry import angle_from_cosine, random_angle_reference
from torsion.judge.base import is_complied, is_refused
from torsion.manifold.knots import behaviour_labels
from torsion.runs import fit_rows, labelled_prompts
from torsion.store import RunDir, atomic_write_json

SCHEMA_VERSION = 1
KNOT_BINS: tuple[str, ...] = ("strong_refuse", "weak_refuse", "weak_comply", "strong_comply")
MIN_POOL = 5  # m: the smallest pool size, and the fewest rows a bin needs to be a knot
THRESHOLD_DEG = 15.0  # a floor whose lower CI exceeds this is structural
N_SIZES = 8
MIN_CATEGORY = 3  # complied rows a category needs to be its own anchor (as fit_vectors)
SPREAD_DRAWS = 50  # random same-size row sets for the spread reference
DEFAULT_REFERENCE = "split"
REFERENCE_NOTES = {
    "pool": "methods.md's definition: the angle between a subsample of n rows and the full pool's estimate, n from m "
            "to N. A subsample without replacement errs about the pool's estimate with variance S^2 (1/n - 1/N), so "
            "instability is 0 at n = N whatever the structure and the largest sizes pull the fitted floor to 0: a "
            "floor here is a lower bound, and a structural flag almost never fires",
    "split": "deviates from methods.md (which compares with the full pool): the angle between two disjoint subsamples "
             "of n rows each (two-class pools keep their class proportions in both), n from m to N/2. Two disjoint "
             "subsample means differ with variance exactly 2 S^2 / n (no finite-population term), so nothing forces "
             "the curve to 0 and a curve that stops falling within the pool shows as a floor. Chosen as the default "
             "because the pool reference cannot show a floor; for small angles a split angle is about sqrt(2) times "
             "one estimate's angle to the population direction, and the threshold applies to it as it is",
}


def eta_squared(values: Tensor, groups: Sequence[str]) -> Tensor:
    """η² of ``values`` ``[n, ...]`` against ``groups`` ``[n]``: between-group over total sum of squares.

    Returns ``[...]`` float64; 0 where the values do not vary.
    """
    names = sorted(set(groups))
    onehot = torch.tensor([[g == name for name in names] for g in groups], dtype=torch.float64)  # [n, G]
    v = values.double().reshape(len(groups), -1)
    centred = v - v.mean(0)
    group_means = (onehot.T @ centred) / onehot.sum(0)[:, None]  # [G, rest]
    between = (onehot.sum(0)[:, None] * group_means**2).sum(0)
    total = (centred**2).sum(0)
    return torch.where(total > 0, between / total.clamp_min(1e-300), 0.0).reshape(values.shape[1:])


def first_pc_scores(gram: Tensor) -> Tensor:
    """Scores on the first principal component of rows, per layer, from their Gram matrix.

    Args:
        gram: ``[n_layers, n, n]`` inner products of the rows (any origin: they are centred here).

    Returns:
        ``[n, n_layers]``: the top eigenvector of the centred Gram matrix per layer (the PC
        scores up to a scale, which η² ignores). numpy's ``eigh`` on one BLAS thread, scoped
        to the call: these matrices are small, and threads only stall on a shared CPU.
    """
    from threadpoolctl import threadpool_limits

    n = gram.shape[-1]
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    centred = centring @ gram.double() @ centring
    with threadpool_limits(1):
        _, eigenvectors = np.linalg.eigh(centred.numpy())
    return torch.from_numpy(eigenvectors[..., -1].T.copy())


def bin_contamination(gram: Tensor, bin_rows: Sequence[int], categories: Sequence[str], *, seed: int,
                      draws: int = SPREAD_DRAWS) -> dict[str, list[float | None]]:
    """The bin-contamination diagnostic, per layer.

    - ``spread_deg``: mean angle of the bin's rows to the bin's centroid, both about the mean of
      all rows (the train mean);
    - ``spread_random_deg``: the same for ``draws`` random row sets of the bin's size drawn from
      all rows (``argsort(torch.rand(..., dtype=float64))`` from ``Generator().manual_seed(seed)``);
      a bin no tighter than random rows does not cluster;
    - ``eta2_category``: η² of the bin's first PC against the rows' categories (None when the
      bin holds one category).

    Args:
        gram: ``[n_layers, n_prompts, n_prompts]`` from :func:`~torsion.analysis.learning_curve.centred_gram`
            over every train row.
        categories: ``[n_prompts]``.
    """
    rows = torch.as_tensor(list(bin_rows), dtype=torch.long)
    n_prompts = gram.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(draws, n_prompts, generator=generator, dtype=torch.float64), dim=1)
    members = torch.zeros(draws + 1, n_prompts, dtype=torch.float64)
    members[0, rows] = 1.0
    members[1:].scatter_(1, order[:, : len(rows)], 1.0)  # [1 + draws, n]
    dots = members[None] @ gram  # [n_layers, 1 + draws, n]: each row's dot with each set's (summed) centroid
    centroid_norms = (dots * members[None]).sum(-1).clamp_min(0).sqrt()  # [n_layers, 1 + draws]
    row_norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [n_layers, n]
    cosines = dots / (centroid_norms[..., None] * row_norms[:, None, :]).clamp_min(1e-300)
    spread = (angle_from_cosine(cosines) * members[None]).sum(-1) / len(rows)  # [n_layers, 1 + draws]
    bin_categories = [categories[i] for i in bin_rows]
    eta2: list[float | None] = [None] * gram.shape[0]
    if len(set(bin_categories)) > 1:
        eta2 = eta_squared(first_pc_scores(gram[:, rows][:, :, rows]), bin_categories).tolist()
    return {"spread_deg": spread[:, 0].tolist(), "spread_random_deg": spread[:, 1:].mean(1).tolist(),
            "eta2_category": eta2}


def _entry_seed(seed: int, *parts: str) -> int:
    """A per-entry seed: ``seed + crc32("kind/name/component") mod 2^31`` (adding a category moves no other draw)."""
    return (seed + zlib.crc32("/".join(parts).encode())) % 2**31


def _pools(scores: Sequence[float | None], labels: Sequence[str], categories: Sequence[str], *, m: int,
           min_category: int) -> tuple[list[tuple[str, str, list[int], list[int] | None, str | None]], list[str]]:
    """``(kind, name, first rows, second rows or None for a knot, anchor)`` per entry, and what was skipped."""
    refused = [i for i, s in enumerate(scores) if is_refused(s)]
    complied = [i for i, s in enumerate(scores) if is_complied(s)]
    pools: list[tuple[str, str, list[int], list[int] | None, str | None]] = []
    skipped: list[str] = []
    if refused and complied and len(refused) + len(complied) >= m:
        pools.append(("global", "md", refused, complied, None))
    else:
        skipped.append(f"global md: {len(refused)} refused, {len(complied)} complied (needs both, >= {m} rows)")
    for category in sorted(set(categories)):
        own_refused = [i for i in refused if categories[i] == category]
        own_complied = [i for i in complied if categories[i] == category]
        anchor = "category" if len(own_complied) >= min_category else "global"
        second = own_complied if anchor == "category" else complied
        if own_refused and second and len(own_refused) + len(second) >= m:
            pools.append(("category", category, own_refused, second, anchor))
        else:
            skipped.append(f"category {category}: {len(own_refused)} refused, {len(second)} in its anchor")
    for name in KNOT_BINS:
        rows = [i for i, label in enumerate(labels) if label == name]
        if len(rows) >= m:
            pools.append(("bin", name, rows, None, None))
        else:
            skipped.append(f"bin {name}: {len(rows)} rows (a knot needs >= {m})")
    return pools, skipped


def analyze_stability(activations: Mapping[str, Tensor], scores: Sequence[float | None], labels: Sequence[str],
                      categories: Sequence[str], *, B: int = 200, m: int = MIN_POOL, n_sizes: int = N_SIZES,
                      threshold_deg: float = THRESHOLD_DEG, n_replicates: int = 200,
                      min_category: int = MIN_CATEGORY, reference: str = DEFAULT_REFERENCE,
                      seed: int = 0) -> dict[str, Any]:
    """The learning curve of every global vector, category vector and knot, per block and component.

    ``reference``: what a subsample is compared with (:data:`REFERENCE_NOTES`): ``split``
    (default) a disjoint subsample of the same size, ``pool`` the full pool (methods.md). A pool
    too small for ``split`` (fewer than ``2m`` rows, or a class of one row) is skipped, and
    ``skipped`` says so.

    Args:
        activations: component -> ``[n_prompts, n_layers, d_model]``, the train rows (their mean
            is the knots' origin).
        scores: ``[n_prompts]`` judge scores (refused: +0.5/+1, complied: −0.5/−1).
        labels: ``[n_prompts]`` judge labels (the bins).
        categories: ``[n_prompts]`` prompt categories.

    Returns:
        A JSON-ready dict (``analysis/stability.json``, schema 1); ``entries`` holds one dict per
        (kind, name, component, block).
    """
    unknown = sorted(set(activations) - set(COMPONENTS))
    if not activations or unknown:
        raise TorsionError(f"analyze_stability takes components {', '.join(COMPONENTS)} (got "
                           f"{sorted(activations) or 'none'}); pass at least one of them")
    n_prompts = len(next(iter(activations.values())))
    if not len(scores) == len(labels) == len(categories) == n_prompts:
        raise TorsionError(f"{n_prompts} activation rows but {len(scores)} scores, {len(labels)} labels and "
                           f"{len(categories)} categories; pass one of each per row")
    if B < 2 or n_replicates < 2 or m < 2:
        raise TorsionError(f"B={B}, n_replicates={n_replicates}, m={m}: each must be at least 2")
    if reference not in REFERENCES:
        raise TorsionError(f"unknown reference {reference!r}; choose {' or '.join(REFERENCES)}")
    pools, skipped = _pools(scores, labels, categories, m=m, min_category=min_category)
    if reference == "split":
        too_small = [p for p in pools if len(p[2]) + len(p[3] or []) < 2 * m or len(p[2]) < 2
                     or (p[3] is not None and len(p[3]) < 2)]
        skipped += [f"{kind} {name}: {len(first)} + {len(second or [])} rows, too few for two disjoint subsamples "
                    f"of at least m = {m} (reference split)" for kind, name, first, second, _ in too_small]
        pools = [p for p in pools if p not in too_small]
    entries: list[dict[str, Any]] = []
    for component in (c for c in COMPONENTS if c in activations):
        x = activations[component]
        gram = centred_gram(x)  # [n_layers, n_prompts, n_prompts]
        for kind, name, first, second, anchor in pools:
            is_knot = second is None
            n_pool = len(first) + (0 if is_knot else len(second))
            sizes = reference_sizes(n_pool, reference, m=m, n_sizes=n_sizes)
            entry_seed = _entry_seed(seed, kind, name, component)
            angles = subsample_angles(gram, first, second or [], sizes, B=B, seed=entry_seed,
                                      resample_second=not is_knot, reference=reference)
            per_block = learning_curve_entry(sizes, angles.numpy(), n_replicates=n_replicates, seed=entry_seed,
                                             threshold_deg=threshold_deg, reference=reference)
            extra = bin_contamination(gram, first, categories, seed=entry_seed) if is_knot else {}
            for block, curve in enumerate(per_block):
                entry = {"kind": kind, "name": name, "block": block, "component": component, "n_pool": n_pool,
                         **curve}
                if anchor is not None:
                    entry["anchor"] = anchor
                entry.update({key: values[block] for key, values in extra.items()})
                entries.append(entry)
    d_model = next(iter(activations.values())).shape[-1]
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "stability",
        "conventions": {
            "layer_indexing": LAYER_INDEXING, "angle": "degrees of signed cosine", "vector_method": "md",
            "knot": "bin centroid minus the train mean",
            "sizes": (f"geometric from m to N, {n_sizes} sizes, rounded" if reference == "pool" else
                      f"geometric from m to N // 2 (rows in each of the two subsamples), {n_sizes} sizes, rounded"),
            "subsampling": "without replacement; two-class pools keep their class proportions",
            "reference": REFERENCE_NOTES[reference],
            "caveat": "k / n^a with a near 0 is itself nearly flat, so a curve that is still flat at its largest size "
                      "(not yet falling as a power law, e.g. angles near the random reference) can be fitted with "
                      "floor 0 and a near 0 as well as with a floor: the floor is then not identified, and floor_ci "
                      "says so by spanning from 0 up",
            "model": "instability(n) = k / n^a + floor, k, floor >= 0, 0 <= a <= a_max",
            "fit": "scipy.optimize.least_squares (trf, bounds) from the profile (grid over a) solution; " +
                   ("the full-pool size (instability 0 by construction) is left out of the fit" if reference == "pool"
                    else "every size is fitted"),
            "floor_ci": "2.5/97.5 percentiles of floors refitted on replicate curves (the B draws resampled "
                        "with replacement at every size): subsampling noise, not pool sampling",
            "structural": "floor_ci[0] > threshold_deg",
            "spread": "mean angle of a bin's rows to its centroid, about the train mean; "
                      f"spread_random_deg: the same for {SPREAD_DRAWS} random row sets of the bin's size",
            "eta2_category": "eta squared of the bin's first PC scores against prompt category",
            "seed": "per entry: seed + crc32('kind/name/component') mod 2^31",
        },
        "parameters": {"reference": reference, "methods_md_definition": reference == "pool"},
        "seed": seed, "B": B, "m": m, "n_sizes": n_sizes, "n_replicates": n_replicates, "a_max": A_MAX,
        "min_fit_sizes": MIN_FIT_SIZES, "threshold_deg": threshold_deg, "min_category": min_category,
        "n_prompts": n_prompts, "d_model": d_model,
        "random_reference_deg": list(random_angle_reference(d_model)),
        "skipped": skipped, "summary": _summary(entries), "entries": entries,
    }


def _summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, name, component): the blocks flagged structural, and the median floor over blocks."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault((entry["kind"], entry["name"], entry["component"]), []).append(entry)
    rows = []
    for (kind, name, component), group in groups.items():
        floors = [e["floor_deg"] for e in group if e["floor_deg"] is not None]
        rows.append({"kind": kind, "name": name, "component": component, "n_pool": group[0]["n_pool"],
                     "structural_blocks": [e["block"] for e in group if e["structural"]],
                     "median_floor_deg": float(np.median(floors)) if floors else None})
    return rows


def run_stability(run_dir: Path, *, B: int = 200, m: int = MIN_POOL, threshold_deg: float = THRESHOLD_DEG,
                  n_replicates: int = 200, reference: str = DEFAULT_REFERENCE, seed: int = 0) -> dict[str, Any]:
    """Stability on a run directory's train-split activations (primary position): ``analysis/stability.json``."""
    run = RunDir(run_dir)
    if not run.activations_path.is_file():
        raise TorsionError(f"{run.activations_path} does not exist; finish the run's capture stage "
                           "(`torsion run` on the same directory) before `torsion analyze stability`")
    prompts, responses = labelled_prompts(run)
    rows = fit_rows(prompts, responses)  # train split, refused or complied after correction and review
    labels, scores = behaviour_labels([prompts[i] for i in rows], [responses[i] for i in rows])
    activations, meta = load_activations(run.activations_path)
    result = analyze_stability({c: activations[c][rows] for c in COMPONENTS if c in activations}, scores, labels,
                               [prompts[i].category for i in rows], B=B, m=m, threshold_deg=threshold_deg,
                               n_replicates=n_replicates, reference=reference, seed=seed)
    result["conventions"].update(position=meta.get("primary_position", "last"), split="train",
                                 labels="corrected (fp_refuse joins weak_refuse; review wins), as the knots read them")
    atomic_write_json(run.analysis_path("stability"), result)
    return result
