"""Category geometry (methods.md, "Category geometry").

Pairwise angles between per-category steering vectors, each category's angle to the global
vector, and the comply-activation geometry (angles between the complied mean activations of
categories with enough complied samples). Every angle is taken per layer from the signed
cosine and then averaged over the selected layers; a summary is the mean, σ (ddof=1), min and
max over pairs.

Example::

    result = category_geometry({"drugs": v_drugs, "fraud": v_fraud, "weapons": v_weapons},
                               global_vector, layers=[12, 15, 18, 21])
    result["vector_pairwise"]["mean_deg"], result["vector_pairwise"]["sd_deg"]
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.common import back_half_layers, run_vector
from torsion.capture import load_activations
from torsion.conventions import LAYER_INDEXING, check_blocks
from torsion.errors import TorsionError
from torsion.geometry import angle_deg
from torsion.runs import labelled_prompts, row_behaviour
from torsion.selection import category_layers
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1
MIN_COMPLIED = 3  # groups with fewer complied samples have no comply-activation mean


def mean_angle_matrix(directions: Mapping[str, Tensor], layers: Sequence[int]) -> np.ndarray:
    """Angles in degrees between every pair, per layer, averaged over ``layers``.

    Args:
        directions: name -> ``[n_layers, d_model]``.

    Returns:
        ``[n, n]`` float64, rows and columns in ``directions`` order; the diagonal is 0.
    """
    layers = check_blocks(layers, next(iter(directions.values())).shape[0])
    stack = torch.stack([d[layers].double() for d in directions.values()])  # [n, n_sel, d_model]
    angles = angle_deg(stack[:, None], stack[None, :])  # [n, n, n_sel]
    matrix = angles.mean(-1).numpy()
    np.fill_diagonal(matrix, 0.0)
    return matrix


def pairwise_summary(directions: Mapping[str, Tensor], layers: Sequence[int]) -> dict[str, Any]:
    """Mean, σ (ddof=1), min and max over pairs of the layer-averaged pairwise angle, and every pair.

    σ is None when there is a single pair. Needs at least two directions.
    """
    names = list(directions)
    if len(names) < 2:
        raise TorsionError(f"pairwise angles need at least 2 categories, got {len(names)} ({', '.join(names)}); "
                           "use prompts from more categories")
    matrix = mean_angle_matrix(directions, layers)
    pairs = [{"a": names[i], "b": names[j], "angle_deg": float(matrix[i, j])}
             for i, j in itertools.combinations(range(len(names)), 2)]
    values = np.array([p["angle_deg"] for p in pairs])
    return {"mean_deg": float(values.mean()), "sd_deg": float(values.std(ddof=1)) if len(values) > 1 else None,
            "min_deg": float(values.min()), "max_deg": float(values.max()), "n_pairs": len(pairs),
            "names": names, "matrix_deg": matrix.tolist(), "pairs": pairs}


def complied_means(activations: Tensor, groups: Sequence[str], complied: Sequence[bool], *,
                   min_complied: int = MIN_COMPLIED) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Mean complied activation of each group that has at least ``min_complied`` complied rows.

    Args:
        activations: ``[n_prompts, n_layers, d_model]``.
        groups: ``[n_prompts]`` group (category) names.
        complied: ``[n_prompts]`` whether each row is complied.

    Returns:
        group -> ``[n_layers, d_model]`` float64 for the groups kept, and every group's complied count.
    """
    if not len(activations) == len(groups) == len(complied):
        raise TorsionError(f"{len(activations)} activation rows, {len(groups)} groups and {len(complied)} labels; "
                           "pass one group and label per row")
    rows = {g: [i for i, (name, c) in enumerate(zip(groups, complied)) if c and name == g] for g in sorted(set(groups))}
    means = {g: activations[r].double().mean(0) for g, r in rows.items() if len(r) >= min_complied}
    return means, {g: len(r) for g, r in rows.items()}


def category_geometry(category_vectors: Mapping[str, Tensor], global_vector: Tensor, *, layers: Sequence[int],
                      anchors: Mapping[str, str], complied_activation_means: Mapping[str, Tensor] | None = None,
                      complied_counts: Mapping[str, int] | None = None,
                      min_complied: int = MIN_COMPLIED) -> dict[str, Any]:
    """Category-vector pairwise angles, angles to the global vector, and comply-activation angles.

    Args:
        category_vectors: category -> ``[n_layers, d_model]``.
        global_vector: ``[n_layers, d_model]``.
        anchors: category -> the complied anchor its vector used (``category`` or ``global``).
        complied_activation_means: group -> ``[n_layers, d_model]`` (from :func:`complied_means`).
        complied_counts: group -> number of complied samples, recorded beside the geometry.
    """
    layers = sorted(set(check_blocks(layers, global_vector.shape[0])))
    names = sorted(category_vectors)
    ordered = {name: category_vectors[name] for name in names}
    to_global = {name: float(mean_angle_matrix({"c": ordered[name], "g": global_vector}, layers)[0, 1])
                 for name in names}
    means = dict(sorted((complied_activation_means or {}).items()))
    comply: dict[str, Any]
    if len(means) >= 2:
        comply = pairwise_summary(means, layers)
    else:
        comply = {"mean_deg": None, "note": f"{len(means)} group(s) with at least {min_complied} complied samples; "
                                            "need 2"}
    comply["complied_counts"] = dict(complied_counts or {})
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "categories",
        "conventions": {"layer_indexing": LAYER_INDEXING, "layers": layers, "cosine": "signed",
                        "angle": "degrees(arccos(clip(cos, -1, 1))) per layer, then mean over layers",
                        "summary": "mean, sd (ddof=1), min, max over pairs of categories",
                        "comply_activation": f"mean complied activation per category with >= {min_complied} "
                                             "complied samples"},
        "categories": names, "anchors": {name: anchors.get(name) for name in names},
        "vector_pairwise": pairwise_summary(ordered, layers), "angle_to_global_deg": to_global,
        "comply_activation": comply,
    }


def run_categories(run_dir: str | Path, *, method: str = "md", component: str = "resid",
                   layers: Sequence[int] | None = None, min_complied: int = MIN_COMPLIED) -> dict[str, Any]:
    """Category geometry on a run directory: writes ``analysis/categories.json`` (the report draws its figure).

    Category vectors are the run's ``<method>/<component>/<category>``; the comply-activation
    geometry uses the ``component`` activations of train-split rows labelled complied (score in
    {−0.5, −1}). ``layers`` defaults to the union of each category's top-4 blocks, scored on that
    category's own train rows (:func:`~torsion.selection.category_layers`); when no category has both
    classes among its train rows, to :func:`back_half_layers`.
    """
    run = RunDir(run_dir)
    vectors = load_vectors(run.vectors_path)
    global_key = f"{method}/{component}"
    prefix = f"{global_key}/"
    category_vectors = {key.removeprefix(prefix): v for key, v in vectors.items() if key.startswith(prefix)}
    if not category_vectors:
        raise TorsionError(f"the run has no category vectors {prefix}<category>; fit vectors with categories "
                           "(the pipeline's vectors stage does) or pick a method and component it fitted")
    global_vector = run_vector(vectors, global_key)
    n_layers = global_vector.shape[0]
    per_category = None
    if layers is None:
        per_category = category_layers(run.root, key=global_key, categories=sorted(category_vectors))
        scored = sorted({layer for chosen in per_category.values() if chosen for layer in chosen})
        layers = scored or back_half_layers(n_layers)
    else:
        layers = check_blocks(layers, n_layers)
    prompts, responses = labelled_prompts(run)
    activations, metadata = load_activations(run.activations_path)
    if component not in activations:
        raise TorsionError(f"{run.activations_path} has no {component!r} activations; capture that component")
    train = [i for i, p in enumerate(prompts) if p.split == "train"]
    means, counts = complied_means(activations[component][train], [prompts[i].category for i in train],
                                   [row_behaviour(responses[i]).complied and row_behaviour(responses[i]).fits
                                    for i in train],
                                   min_complied=min_complied)
    anchors = {name: v.meta.get("anchor") for name, v in category_vectors.items()}
    result = category_geometry({name: v.directions for name, v in category_vectors.items()}, global_vector,
                               layers=layers, anchors=anchors, complied_activation_means=means,
                               complied_counts=counts, min_complied=min_complied)
    result["conventions"].update(component=component, method=method, vectors=f"{prefix}<category>",
                                 position=metadata.get("primary_position", "last"), split="train",
                                 layer_selection="given" if per_category is None else
                                 "union of each category's top-4 train-split AUC blocks (own rows)"
                                 if any(per_category.values()) else "back half (no category has both classes)",
                                 category_layers=per_category)
    path = run.analysis_path("categories")
    atomic_write_json(path, result)
    return result
