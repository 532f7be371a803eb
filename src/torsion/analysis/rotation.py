"""Axis rotation with its controls (methods.md, "Axis rotation (cross-layer geometry)").

The axis at layer ``l`` is the MD vector ``v_l = mean(X_r) − mean(X_c)``
(:func:`torsion.vectors.mean_difference`). The statistic is the adjacent-pair angle
``θ_l = angle(v_l, v_{l+1})`` and its mean over pairs. Every number comes with its controls:
a prompt bootstrap, a shuffled-label null, split-half reliability with the
reliability-corrected cosine, the random-direction reference for the model's width, and the
write-up's dispersion bootstrap, labelled as ignoring prompt sampling.

A bootstrap resample, a label permutation and a split half are each a pair of weight rows over
the prompts, so their MD vectors are one matrix product (:func:`batched_mean_difference`), done
in chunks that bound memory, never a Python loop over resamples.

Example::

    result = analyze_rotation({"resid": x_resid, "mlp": x_mlp}, labels, B=1000, P=200, seed=0)
    result["components"]["resid"]["verdict"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.capture import load_activations
from torsion.conventions import COMPONENTS, LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.geometry import adjacent_angles, angle_from_cosine, cosine, random_angle_reference
from torsion.judge.base import is_refused
from torsion.runs import fit_rows, fit_scores, labelled_prompts
from torsion.stats import basic_interval, percentile_interval
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import mean_difference

SCHEMA_VERSION = 1
ALPHA = 0.05  # the null test's level
RELIABLE_MEDIAN_ANGLE_DEG = 45.0  # median split-half same-layer angle below which vectors count as reliable
CHUNK_FLOATS = 1 << 22  # float32 elements of batched MD vectors held at once (16 MiB)
DISPERSION_NOTE = "resamples per-pair angles; ignores prompt sampling"
NULL_STATISTIC = "mean adjacent angle (deg)"
ANGLE_RANGE = {"lower": 0.0, "upper": 180.0}  # where an angle's basic interval is clipped (methods.md)

Labels = Tensor | np.ndarray | Sequence[int]


def rotation_summary(vectors: Tensor) -> dict[str, Any]:
    """Pair angles of ``vectors`` ``[n_layers, d_model]``, their mean and depth σ (std over pairs, ddof=1).

    ``depth_sigma_deg`` is None when there is a single pair.
    """
    angles = adjacent_angles(vectors)  # [n_layers - 1]
    return {"pair_angles_deg": angles.tolist(), "mean_deg": float(angles.mean()),
            "depth_sigma_deg": float(angles.std(correction=1)) if len(angles) > 1 else None}


def batched_mean_difference(x: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """MD vectors of many weighted pairs of prompt groups at once.

    Row ``b`` is ``Σ_i first[b, i] x_i / Σ_i first[b, i] − Σ_i second[b, i] x_i / Σ_i second[b, i]``:
    with bootstrap counts it is a resample's MD, with 0/1 indicators a permutation's or a
    half's. Equal to :func:`~torsion.vectors.mean_difference` for the all-ones weights of
    the two classes.

    Args:
        x: ``[n_prompts, n_layers, d_model]``.
        first: ``[k, ..., n_prompts]`` non-negative weights of the first (refused) group.
        second: the same shape, weights of the second (complied) group.

    Returns:
        ``[k, ..., n_layers, d_model]`` float32.
    """
    return _map_mean_differences(x, first, second, lambda vectors: vectors)


def prompt_bootstrap(x: Tensor, labels: Labels, *, B: int = 1000, seed: int) -> dict[str, Any]:
    """Resample refused and complied prompts separately, with replacement, at full size; ``B`` times.

    The draws come from ``torch.Generator().manual_seed(seed)``: first ``torch.randint`` of
    shape ``[B, n_refused]`` (positions among the refused rows, in prompt order), then
    ``[B, n_complied]`` for the complied rows. Each resample's MD vectors give its pair angles.

    Args:
        x: ``[n_prompts, n_layers, d_model]``.
        labels: ``[n_prompts]``, refused = 1, complied = 0.

    Returns:
        ``B``, the 95% percentile CIs of the mean angle (``mean_ci95``) and of each pair
        (``pair_ci95``, ``[n_layers - 1][2]``), the ``B`` bootstrap mean angles (``means_deg``),
        and the **basic** intervals ``[2θ̂ − q97.5, 2θ̂ − q2.5]`` clipped to ``[0°, 180°]``
        (``mean_ci95_basic``, ``pair_ci95_basic``), with the bootstrap bias of the mean
        (``bias_deg``). Noise inflates the angle between estimated directions once in θ̂ and
        again in every resample, so the percentile interval sits above the true angle when the
        vectors are noisy; the basic interval reflects the resamples about θ̂ (tests: coverage
        of a planted angle). Reflection can leave the range an angle lives in, hence the clip.
    """
    refused = _refused_mask(labels, len(x))
    _require_positive(B=B)
    generator = torch.Generator().manual_seed(seed)
    first = _resample_counts(torch.nonzero(refused).flatten(), len(x), B, generator)  # [B, n_prompts]
    second = _resample_counts(torch.nonzero(~refused).flatten(), len(x), B, generator)
    angles = _map_mean_differences(x, first, second, adjacent_angles).numpy()  # [B, n_layers - 1]
    means = angles.mean(1)
    observed = adjacent_angles(mean_difference(x[refused], x[~refused])).numpy()
    return {"B": B, "mean_ci95": percentile_interval(means).tolist(),
            "pair_ci95": percentile_interval(angles).tolist(),  # [n_layers - 1, 2]
            "mean_ci95_basic": basic_interval(observed.mean(), means, **ANGLE_RANGE).tolist(),
            "pair_ci95_basic": basic_interval(observed, angles, **ANGLE_RANGE).tolist(),
            "bias_deg": float(means.mean() - observed.mean()), "means_deg": means.tolist()}


def equal_tailed_p_value(null: np.ndarray, observed: float) -> float:
    """Two-sided permutation p of ``observed`` against ``null`` ``[P]``: ``min(1, 2·(1 + k) / (P + 1))``.

    ``k = min(#{null ≤ observed}, #{null ≥ observed})``, the smaller tail with the +1 correction
    (methods.md). The null of an angle is skewed, so distance from the null's mean is not used.
    """
    null = np.asarray(null, dtype=np.float64)
    tail = min(int((null <= observed).sum()), int((null >= observed).sum()))
    return min(1.0, 2 * (1 + tail) / (len(null) + 1))


def dispersion_bootstrap(pair_angles: Tensor | Sequence[float], *, B: int = 1000, seed: int) -> dict[str, Any]:
    """The write-up's interval: resample the ``[n_layers - 1]`` per-pair angles, ``B`` times.

    It reflects the spread of angles over depth, not the uncertainty from drawing other
    prompts (``note`` says so). Draws: ``torch.randint`` ``[B, n_pairs]`` from
    ``torch.Generator().manual_seed(seed)``.
    """
    _require_positive(B=B)
    angles = torch.as_tensor(pair_angles, dtype=torch.float64)
    draws = torch.randint(0, len(angles), (B, len(angles)), generator=torch.Generator().manual_seed(seed))
    means = angles[draws].mean(1).numpy()
    return {"B": B, "mean_ci95": percentile_interval(means).tolist(), "note": DISPERSION_NOTE}


def shuffled_label_null(x: Tensor, labels: Labels, *, P: int = 200, seed: int) -> dict[str, Any]:
    """Permute the labels ``P`` times keeping the class sizes; statistic = mean adjacent angle.

    Permutation ``p`` labels refused the first ``n_refused`` prompts of
    ``argsort(torch.rand([P, n_prompts], dtype=float64))[p]`` (``Generator().manual_seed(seed)``).
    The null of an angle is skewed (bounded by 0° and 180°, long-tailed), so the two-sided
    p-value is equal-tailed, with the +1 correction (:func:`equal_tailed_p_value`):
    ``p = min(1, 2 · (1 + min(#{null ≤ observed}, #{null ≥ observed})) / (P + 1))``.
    (Distance from the null's mean would call an observation below the null's 2.5th
    percentile unremarkable whenever the upper tail is long.)

    Args:
        x: ``[n_prompts, n_layers, d_model]``.
        labels: ``[n_prompts]``, refused = 1, complied = 0.

    Returns:
        ``P``, ``statistic``, the null's ``mean_deg``, ``p2_5`` and ``p97_5``, ``p_value``, the
        ``observed_deg`` statistic and the ``P`` null statistics (``null_deg``).
    """
    refused = _refused_mask(labels, len(x))
    _require_positive(P=P)
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(P, len(x), generator=generator, dtype=torch.float64), dim=1)
    shuffled_refused = torch.zeros(P, len(x)).scatter_(1, order[:, : int(refused.sum())], 1.0)  # [P, n_prompts]
    null = _map_mean_differences(x, shuffled_refused, 1.0 - shuffled_refused,
                                 lambda vectors: adjacent_angles(vectors).mean(-1)).numpy()  # [P]
    observed = float(adjacent_angles(mean_difference(x[refused], x[~refused])).mean())
    return {"P": P, "statistic": NULL_STATISTIC, "mean_deg": float(null.mean()),
            "p2_5": float(np.percentile(null, 2.5)), "p97_5": float(np.percentile(null, 97.5)),
            "p_value": equal_tailed_p_value(null, observed), "observed_deg": observed, "null_deg": null.tolist()}


def split_half_reliability(x: Tensor, labels: Labels, *, n_splits: int = 50, seed: int) -> dict[str, Any]:
    """Stratified random halves A and B of the prompts, ``n_splits`` times.

    Each class is shuffled separately (``argsort(torch.rand([n_splits, n_class], dtype=float64))``,
    refused first, from ``Generator().manual_seed(seed)``); A takes the first ``n_class // 2``.

    - Same-layer agreement: ``angle(v_l^A, v_l^B)`` and ``cos(v_l^A, v_l^B)`` per layer, each
      averaged over splits. The mean cosine is the reliability ``r_l``; a half has half the
      prompts, so this understates the full sample's reliability.
    - Reliability-corrected cosine per pair, a **ratio of averages** (methods.md):
      ``mean cos(v_l^A, v_{l+1}^B) / sqrt(mean cos(v_l^A, v_l^B) · mean cos(v_{l+1}^A, v_{l+1}^B))``.
      The numerator is the cross cosine averaged over both swaps (A↔B) and all splits; each
      reliability in the denominator is averaged over splits first, then the ratio is taken
      once (not a mean of per-split ratios, which one near-zero reliability would blow up). The
      halves are independent, so their noise does not correlate across the pair. Computed only
      where both averaged reliabilities are positive, else None (unreliable). The angle clips
      the corrected cosine to ``[-1, 1]``; ``corrected_cos`` is the raw ratio.

    Args:
        x: ``[n_prompts, n_layers, d_model]``.
        labels: ``[n_prompts]``, refused = 1, complied = 0; each class needs at least 2 prompts.
    """
    refused = _refused_mask(labels, len(x), min_per_class=2)
    _require_positive(n_splits=n_splits)
    n_layers = x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    halves = torch.zeros(n_splits, 2, len(x))  # [split, A/B, prompt] indicators
    for rows in (torch.nonzero(refused).flatten(), torch.nonzero(~refused).flatten()):
        order = rows[torch.argsort(torch.rand(n_splits, len(rows), generator=generator, dtype=torch.float64), dim=1)]
        halves[:, 0].scatter_(1, order[:, : len(rows) // 2], 1.0)
        halves[:, 1].scatter_(1, order[:, len(rows) // 2:], 1.0)
    cosines = _map_mean_differences(x, halves * refused, halves * ~refused, _split_cosines)  # [n_splits, 2L - 1]
    same_cos, cross_cos = cosines[:, :n_layers], cosines[:, n_layers:]
    reliability = same_cos.mean(0)  # [n_layers]
    cross = cross_cos.mean(0)  # [n_layers - 1]
    corrected: list[float | None] = []
    for pair, cross_pair in enumerate(cross.tolist()):
        r_first, r_second = float(reliability[pair]), float(reliability[pair + 1])
        corrected.append(cross_pair / (r_first * r_second) ** 0.5 if r_first > 0 and r_second > 0 else None)
    corrected_angles = [None if c is None else float(angle_from_cosine(torch.tensor(c))) for c in corrected]
    reliable = [a for a in corrected_angles if a is not None]
    return {
        "n_splits": n_splits,
        "same_layer_angle_deg": angle_from_cosine(same_cos).mean(0).tolist(),
        "same_layer_cos": reliability.tolist(),
        "corrected_cos": corrected,
        "corrected_angle_deg": corrected_angles,
        "mean_corrected_angle_deg": float(np.mean(reliable)) if reliable else None,
        "reliable_pairs": len(reliable),
    }


def analyze_rotation(activations: Mapping[str, Tensor], labels: Labels, *, B: int = 1000, P: int = 200,
                     n_splits: int = 50, seed: int = 0,
                     reliable_below_deg: float = RELIABLE_MEDIAN_ANGLE_DEG) -> dict[str, Any]:
    """Rotation with its controls for each component present (``analysis/rotation.json``, schema 1).

    Args:
        activations: component ("resid", "attn", "mlp") -> ``[n_prompts, n_layers, d_model]`` at
            the chosen position, rows restricted to refused and complied prompts.
        labels: ``[n_prompts]``, refused = 1, complied = 0.
        reliable_below_deg: a component's vectors count as reliable when the median over layers
            of the split-half same-layer angle is below this (torsion's choice, not methods.md's;
            recorded under ``parameters``).

    Returns:
        A JSON-ready dict (floats, lists, None); every random draw is seeded with ``seed``.
    """
    unknown = sorted(set(activations) - set(COMPONENTS))
    if not activations or unknown:
        raise TorsionError(f"analyze_rotation takes components {', '.join(COMPONENTS)} "
                           f"(got {sorted(activations) or 'none'}); pass at least one of them")
    shapes = {name: tuple(x.shape) for name, x in activations.items()}
    n_prompts, n_layers, d_model = next(iter(shapes.values()))
    if len(set(shapes.values())) > 1 or n_layers < 2:
        raise TorsionError(f"every component must be [n_prompts, n_layers >= 2, d_model] with one shape "
                           f"(got {shapes}); capture all components at the same position and layers")
    refused = _refused_mask(labels, n_prompts, min_per_class=2)
    n_refused, n_complied = int(refused.sum()), int((~refused).sum())
    reference_mean, reference_sd = random_angle_reference(d_model)
    components = {}
    for name in (c for c in COMPONENTS if c in activations):
        x = activations[name]
        summary = rotation_summary(mean_difference(x[refused], x[~refused]))
        bootstrap = prompt_bootstrap(x, refused, B=B, seed=seed)
        null = shuffled_label_null(x, refused, P=P, seed=seed)
        split = split_half_reliability(x, refused, n_splits=n_splits, seed=seed)
        differs, reliable, verdict = _verdict(name, summary, bootstrap, null, split, n_refused, n_complied,
                                              reliable_below_deg)
        components[name] = {
            **summary,
            "prompt_bootstrap": {key: value for key, value in bootstrap.items() if key != "means_deg"},
            "dispersion_bootstrap": dispersion_bootstrap(summary["pair_angles_deg"], B=B, seed=seed),
            "null": {key: null[key] for key in ("P", "statistic", "mean_deg", "p2_5", "p97_5", "p_value")},
            "split_half": split, "differs_from_null": differs, "reliable": reliable, "verdict": verdict,
        }
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "rotation",
        "conventions": {"layer_indexing": LAYER_INDEXING, "axis": "md", "angle": "degrees of signed cosine",
                        "pairs": "(l, l+1)"},
        "parameters": {"B": B, "P": P, "n_splits": n_splits, "null_test_level": ALPHA,
                       "reliable_median_split_half_angle_below_deg": reliable_below_deg,
                       "basic_interval": "[2θ̂ − q97.5, 2θ̂ − q2.5] clipped to [0°, 180°]"},
        "seed": seed, "n_refused": n_refused, "n_complied": n_complied, "d_model": d_model, "n_layers": n_layers,
        "random_reference": {"mean_deg": reference_mean, "sd_deg": reference_sd},
        "components": components,
    }


def run_rotation(run_dir: Path, *, B: int = 1000, P: int = 200, n_splits: int = 50, seed: int = 0) -> dict[str, Any]:
    """Rotation on a run directory's train-split activations (primary position): ``analysis/rotation.json``."""
    run = RunDir(run_dir)
    prompts, responses = labelled_prompts(run)
    rows = fit_rows(prompts, responses)
    activations, meta = load_activations(run.activations_path)
    labels = [int(is_refused(score)) for score in fit_scores(responses, rows)]
    result = analyze_rotation({c: activations[c][rows] for c in COMPONENTS if c in activations}, labels,
                              B=B, P=P, n_splits=n_splits, seed=seed)
    result["conventions"].update(position=meta.get("primary_position", "last"), split="train")
    atomic_write_json(run.analysis_path("rotation"), result)
    return result


def _refused_mask(labels: Labels, n_prompts: int, *, min_per_class: int = 1) -> Tensor:
    """``[n_prompts]`` bool from 0/1 (or bool) labels, with at least ``min_per_class`` in each class."""
    values = torch.as_tensor(np.asarray(labels))
    if values.shape != (n_prompts,) or not bool(((values == 0) | (values == 1)).all()):
        raise TorsionError(f"labels must be [{n_prompts}] values in {{0, 1}} (refused = 1, complied = 0), got shape "
                           f"{list(values.shape)} with values {sorted(set(values.flatten().tolist()))[:5]}; "
                           "drop rows in neither class before the rotation analysis")
    refused = values == 1
    n_refused = int(refused.sum())
    if min(n_refused, n_prompts - n_refused) < min_per_class:
        raise TorsionError(f"the rotation analysis needs at least {min_per_class} refused and {min_per_class} "
                           f"complied prompts (got {n_refused} and {n_prompts - n_refused}); use more prompts")
    return refused


def _require_positive(**counts: int) -> None:
    for name, count in counts.items():
        if count < 1:
            raise TorsionError(f"{name}={count}: the number of draws must be at least 1")


def _resample_counts(rows: Tensor, n_prompts: int, draws: int, generator: torch.Generator) -> Tensor:
    """``[draws, n_prompts]`` counts: each row resamples ``rows`` (prompt indices) with replacement, at full size."""
    picks = rows[torch.randint(0, len(rows), (draws, len(rows)), generator=generator)]
    return torch.zeros(draws, n_prompts).scatter_add_(1, picks, torch.ones(draws, len(rows)))


def _map_mean_differences(x: Tensor, first: Tensor, second: Tensor,
                          statistic: Callable[[Tensor], Tensor]) -> Tensor:
    """``statistic`` of :func:`batched_mean_difference`'s vectors, chunk by chunk over the leading axis.

    Each group's weights are normalised to sum to one, so subtracting the pooled mean from ``x``
    changes no MD vector; it keeps the float32 product from cancelling the large offset that
    every prompt shares (the residual stream's mean). A chunk holds at most about
    ``CHUNK_FLOATS`` float32 elements of MD vectors; the statistic maps a chunk
    ``[c, ..., n_layers, d_model]`` to ``[c, ...]`` and the chunks are concatenated.
    """
    n_prompts, n_layers, d_model = x.shape
    rows = x.reshape(n_prompts, -1).float()
    rows = rows - rows.mean(0, dtype=torch.float64).float()  # [n_prompts, n_layers * d_model]
    signed = (first / first.sum(-1, keepdim=True) - second / second.sum(-1, keepdim=True)).float()
    vectors_per_row = signed[0].numel() // n_prompts
    chunk = max(1, CHUNK_FLOATS // (vectors_per_row * n_layers * d_model))
    return torch.cat([statistic((block @ rows).reshape(*block.shape[:-1], n_layers, d_model))
                      for block in signed.split(chunk)])


def _split_cosines(vectors: Tensor) -> Tensor:
    """Halves' MD vectors ``[c, 2, n_layers, d_model]`` → ``[c, 2 n_layers − 1]`` cosines.

    The first ``n_layers`` columns are ``cos(v_l^A, v_l^B)``; the rest are the cross cosines
    ``(cos(v_l^A, v_{l+1}^B) + cos(v_l^B, v_{l+1}^A)) / 2``, averaged over the swap.
    """
    a, b = vectors[:, 0], vectors[:, 1]
    cross = (cosine(a[:, :-1], b[:, 1:]) + cosine(b[:, :-1], a[:, 1:])) / 2
    return torch.cat([cosine(a, b), cross], dim=1)


def _verdict(component: str, summary: dict[str, Any], bootstrap: dict[str, Any], null: dict[str, Any],
             split: dict[str, Any], n_refused: int, n_complied: int,
             reliable_below_deg: float) -> tuple[bool, bool, str]:
    """``differs_from_null`` (p < ALPHA), ``reliable`` (median same-layer angle below the threshold), a sentence."""
    differs = null["p_value"] < ALPHA
    median_same = float(np.median(split["same_layer_angle_deg"]))
    reliable = median_same < reliable_below_deg
    lo, hi = bootstrap["mean_ci95_basic"]
    sentence = (
        f"{component}: the mean adjacent angle {summary['mean_deg']:.1f}° (basic prompt-bootstrap 95% CI "
        f"{lo:.1f}–{hi:.1f}°) {'differs from' if differs else 'is indistinguishable from'} its shuffled-label "
        f"null (mean {null['mean_deg']:.1f}°, 95% {null['p2_5']:.1f}–{null['p97_5']:.1f}°; p = "
        f"{null['p_value']:.3g} {'<' if differs else '≥'} {ALPHA}), and the vectors are "
        f"{'reliable' if reliable else 'noise-dominated'} at {n_refused} refused / {n_complied} complied prompts "
        f"(median split-half same-layer angle {median_same:.1f}° {'<' if reliable else '≥'} "
        f"{reliable_below_deg:g}°)."
    )
    return differs, reliable, sentence
