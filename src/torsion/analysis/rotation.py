"""Axis rotation with its controls (methods.md, "Axis rotation (cross-layer geometry)").

The axis at layer ``l`` is the MD vector ``mean(X_r) - mean(X_c)``. The statistic is the
adjacent-pair angle ``θ_l = angle(v_l, v_{l+1})`` and its mean over pairs. Every number comes
with its controls: a prompt bootstrap (B resamples of refused and complied prompts), a
shuffled-label null (P permutations keeping class sizes), split-half reliability and the
reliability-corrected cosine, and the random-direction reference for the model's width.

Resampled and permuted class means are a weights matrix times the activations, so B or P
vectors cost one matrix product each, not a Python loop.

Example::

    result = analyze_rotation({"resid": x_resid, "mlp": x_mlp}, refused, B=1000, P=200, seed=0)
    result["components"]["resid"]["verdict"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from torsion.capture import load_activations
from torsion.geometry import adjacent_angles, angle_from_cosine, cosine, random_angle_reference
from torsion.judge.base import is_refused
from torsion.runs import fit_rows, labelled_prompts
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import mean_difference

SCHEMA_VERSION = 1
RELIABLE_MEDIAN_ANGLE = 45.0  # split-half same-layer angle below which vectors count as reliable
ALPHA = 0.05
_CHUNK = 200  # resamples per matrix product; bounds memory at _CHUNK × n_layers × d_model floats


def rotation_summary(vectors: Tensor) -> dict[str, Any]:
    """Pair angles of ``vectors`` ``[n_layers, d_model]``, their mean and depth σ (ddof=1)."""
    angles = adjacent_angles(vectors)
    return {"pair_angles_deg": angles.tolist(), "mean_deg": float(angles.mean()),
            "depth_sigma_deg": float(angles.std(unbiased=True)) if len(angles) > 1 else None}


def _split(x: Tensor, refused: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(len(x), -1).float()
    return flat[refused], flat[~refused]


def _mean_angles(differences: Tensor, n_layers: int) -> Tensor:
    """Adjacent angles of a batch of flattened MD vectors ``[b, n_layers*d]`` → ``[b, n_layers-1]``."""
    return adjacent_angles(differences.reshape(len(differences), n_layers, -1))


def _counts(n: int, draws: int, generator: torch.Generator) -> Tensor:
    """``[draws, n]`` counts of ``n`` indices drawn with replacement ``n`` times per row."""
    index = torch.randint(0, n, (draws, n), generator=generator)
    return torch.zeros(draws, n).scatter_add_(1, index, torch.ones(draws, n))


def prompt_bootstrap(x: Tensor, refused: Tensor, *, B: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Resample refused and complied prompts separately, with replacement, at full size.

    Args:
        x: ``[n_prompts, n_layers, d_model]``.
        refused: ``[n_prompts]`` booleans (False = complied).

    Returns:
        95% percentile CIs of the mean angle and of each pair (methods.md), the ``B``
        bootstrap means, and the "basic" intervals ``[2θ̂ − q97.5, 2θ̂ − q2.5]``. Noise inflates
        angles between estimated directions, so a resample's angle is biased upward twice over
        (once in θ̂, again in the resample) and the percentile interval sits above the true
        angle; the basic interval reflects that bias back. ``bias_deg`` is the bootstrap
        estimate of the bias of the mean angle.
    """
    generator = torch.Generator().manual_seed(seed)
    x_r, x_c = _split(x, refused)
    n_layers = x.shape[1]
    angles = []
    for start in range(0, B, _CHUNK):
        draws = min(_CHUNK, B - start)
        mean_r = _counts(len(x_r), draws, generator) @ x_r / len(x_r)
        mean_c = _counts(len(x_c), draws, generator) @ x_c / len(x_c)
        angles.append(_mean_angles(mean_r - mean_c, n_layers))
    angles = torch.cat(angles).numpy()  # [B, n_layers - 1]
    means = angles.mean(1)
    observed = adjacent_angles(mean_difference(x[refused], x[~refused])).numpy()
    mean_ci = np.percentile(means, [2.5, 97.5])
    pair_ci = np.percentile(angles, [2.5, 97.5], axis=0).T  # [n_layers - 1, 2]
    return {
        "B": B,
        "mean_ci95": mean_ci.tolist(),
        "pair_ci95": pair_ci.tolist(),
        "mean_ci95_basic": (2 * observed.mean() - mean_ci[::-1]).tolist(),
        "pair_ci95_basic": (2 * observed[:, None] - pair_ci[:, ::-1]).tolist(),
        "bias_deg": float(means.mean() - observed.mean()),
        "means": means.tolist(),
    }


def dispersion_bootstrap(pair_angles: Tensor, *, B: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Resample the per-pair angles (the write-up's CI). It ignores prompt sampling."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.as_tensor(pair_angles, dtype=torch.float64)
    index = torch.randint(0, len(angles), (B, len(angles)), generator=generator)
    means = angles[index].mean(1).numpy()
    return {"B": B, "mean_ci95": np.percentile(means, [2.5, 97.5]).tolist(),
            "note": "resamples per-pair angles; ignores prompt sampling"}


def shuffled_label_null(x: Tensor, refused: Tensor, *, P: int = 200, seed: int = 0) -> dict[str, Any]:
    """Permute the labels ``P`` times keeping class sizes; statistic = mean adjacent angle.

    The null of an angle is skewed, so the two-sided p-value is equal-tailed:
    ``p = min(1, 2 · (1 + min(#{null ≤ obs}, #{null ≥ obs})) / (P + 1))``.
    """
    generator = torch.Generator().manual_seed(seed)
    flat = x.reshape(len(x), -1).float()
    n, n_r = len(flat), int(refused.sum())
    total = flat.sum(0)
    null = []
    for start in range(0, P, _CHUNK):
        draws = min(_CHUNK, P - start)
        order = torch.argsort(torch.rand(draws, n, generator=generator), dim=1)
        indicator = torch.zeros(draws, n).scatter_(1, order[:, :n_r], 1.0)
        sum_r = indicator @ flat
        differences = sum_r / n_r - (total - sum_r) / (n - n_r)
        null.append(_mean_angles(differences, x.shape[1]).mean(1))
    null = torch.cat(null).numpy()
    observed = float(adjacent_angles(mean_difference(x[refused], x[~refused])).mean())
    tail = min(int((null <= observed).sum()), int((null >= observed).sum()))
    return {"P": P, "statistic": "mean adjacent angle (deg)", "observed_deg": observed,
            "mean_deg": float(null.mean()), "p2_5": float(np.percentile(null, 2.5)),
            "p97_5": float(np.percentile(null, 97.5)), "p_value": min(1.0, 2 * (1 + tail) / (P + 1))}


def _halves(index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    shuffled = index[torch.randperm(len(index), generator=generator)]
    return shuffled[: len(index) // 2], shuffled[len(index) // 2:]


def split_half_reliability(x: Tensor, refused: Tensor, *, n_splits: int = 50, seed: int = 0) -> dict[str, Any]:
    """Stratified random halves A and B, ``n_splits`` times.

    Reports the same-layer angle ``angle(v_l^A, v_l^B)`` and the reliability-corrected cosine
    ``mean cos(v_l^A, v_{l+1}^B) / sqrt(rel_l · rel_{l+1})``: the cross cosine is averaged
    over both swaps (A↔B) and all splits, and ``rel_l`` is the same-layer cosine averaged over
    splits. Where a reliability is not positive the pair is flagged unreliable (None).
    """
    generator = torch.Generator().manual_seed(seed)
    refused_index, complied_index = torch.nonzero(refused).flatten(), torch.nonzero(~refused).flatten()
    same, cross = [], []
    for _ in range(n_splits):
        r_a, r_b = _halves(refused_index, generator)
        c_a, c_b = _halves(complied_index, generator)
        v_a, v_b = mean_difference(x[r_a], x[c_a]), mean_difference(x[r_b], x[c_b])
        same.append(cosine(v_a, v_b))
        cross.append((cosine(v_a[:-1], v_b[1:]) + cosine(v_b[:-1], v_a[1:])) / 2)
    reliability = torch.stack(same).mean(0)  # [n_layers]
    cross_mean = torch.stack(cross).mean(0)  # [n_layers - 1]
    corrected: list[float | None] = []
    for layer, value in enumerate(cross_mean.tolist()):
        both = reliability[layer] * reliability[layer + 1]
        ok = reliability[layer] > 0 and reliability[layer + 1] > 0
        corrected.append(value / float(both.sqrt()) if ok else None)
    corrected_angles = [float(angle_from_cosine(torch.tensor(c))) if c is not None else None for c in corrected]
    valid = [a for a in corrected_angles if a is not None]
    return {
        "n_splits": n_splits,
        "same_layer_angle_deg": torch.stack([angle_from_cosine(s) for s in same]).mean(0).tolist(),
        "same_layer_cos": reliability.tolist(),
        "corrected_cos": corrected,
        "corrected_angle_deg": corrected_angles,
        "mean_corrected_angle_deg": float(np.mean(valid)) if valid else None,
        "reliable_pairs": len(valid),
    }


def _verdict(component: str, summary: dict, bootstrap: dict, null: dict, split: dict,
             n_refused: int, n_complied: int) -> tuple[bool, bool, str]:
    differs = null["p_value"] < ALPHA
    median_same = float(np.median(split["same_layer_angle_deg"]))
    reliable = median_same < RELIABLE_MEDIAN_ANGLE
    lo, hi = bootstrap["mean_ci95_basic"]
    sentence = (
        f"{component}: mean adjacent angle {summary['mean_deg']:.1f}° (bias-corrected 95% CI {lo:.1f}–{hi:.1f}) "
        f"{'differs from' if differs else 'is indistinguishable from'} its shuffled-label null "
        f"({null['mean_deg']:.1f}°, 95% {null['p2_5']:.1f}–{null['p97_5']:.1f}, p = {null['p_value']:.3g}); "
        f"the median split-half same-layer angle is {median_same:.1f}°, so the vectors are "
        f"{'reliable' if reliable else 'noise-dominated'} at {n_refused} refused / {n_complied} complied."
    )
    return differs, reliable, sentence


def analyze_rotation(activations: Mapping[str, Tensor], refused: Tensor, *, B: int = 1000, P: int = 200,
                     n_splits: int = 50, seed: int = 0) -> dict[str, Any]:
    """Rotation with controls for each component (``analysis/rotation.json``).

    Args:
        activations: component -> ``[n_prompts, n_layers, d_model]`` at one position, rows
            already restricted to refused and complied prompts.
        refused: ``[n_prompts]`` booleans; the other rows are complied.
    """
    refused = torch.as_tensor(refused, dtype=torch.bool)
    first = next(iter(activations.values()))
    n_refused, n_complied = int(refused.sum()), int((~refused).sum())
    mean_ref, sd_ref = random_angle_reference(first.shape[2])
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "analysis": "rotation",
        "conventions": {"layer_indexing": "block", "axis": "md", "angle": "degrees of signed cosine",
                        "pairs": "(l, l+1)"},
        "seed": seed, "n_refused": n_refused, "n_complied": n_complied,
        "d_model": int(first.shape[2]), "n_layers": int(first.shape[1]),
        "random_reference": {"mean_deg": mean_ref, "sd_deg": sd_ref},
        "components": {},
    }
    for component, x in activations.items():
        summary = rotation_summary(mean_difference(x[refused], x[~refused]))
        bootstrap = prompt_bootstrap(x, refused, B=B, seed=seed)
        bootstrap.pop("means")
        null = shuffled_label_null(x, refused, P=P, seed=seed)
        split = split_half_reliability(x, refused, n_splits=n_splits, seed=seed)
        differs, reliable, verdict = _verdict(component, summary, bootstrap, null, split, n_refused, n_complied)
        result["components"][component] = {
            **summary, "prompt_bootstrap": bootstrap,
            "dispersion_bootstrap": dispersion_bootstrap(torch.tensor(summary["pair_angles_deg"]), B=B, seed=seed),
            "null": null, "split_half": split, "differs_from_null": differs, "reliable": reliable,
            "verdict": verdict,
        }
    return result


def run_rotation(run_dir: Path, *, B: int = 1000, P: int = 200, n_splits: int = 50, seed: int = 0) -> dict[str, Any]:
    """Rotation on a run directory's train-split activations (primary position): ``analysis/rotation.json``."""
    run = RunDir(run_dir)
    prompts, responses = labelled_prompts(run)
    rows = fit_rows(prompts, responses)
    activations, meta = load_activations(run.activations_path)
    components = [c for c in ("resid", "attn", "mlp") if c in activations]
    refused = torch.tensor([is_refused(responses[i]["score"]) for i in rows])
    result = analyze_rotation({c: activations[c][rows] for c in components}, refused, B=B, P=P,
                              n_splits=n_splits, seed=seed)
    result["conventions"].update(position=meta.get("primary_position", "last"), split="train")
    atomic_write_json(run.analysis_path("rotation"), result)
    return result
