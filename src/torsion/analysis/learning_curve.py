"""The learning curve of an estimated direction (methods.md, "Learning-curve floor").

For a direction estimated from a pool of ``N`` rows (a two-class MD vector, or a behaviour
bin's centroid about the train mean): at pool sizes ``n`` geometric from ``m`` to ``N``, draw
``B`` subsamples without replacement; ``instability(n)`` is the mean angle between the
subsample's estimate and the full pool's. The curve is fitted by ``k / n^a + floor`` with
``k, a, floor ≥ 0``; the floor is structural instability, ``k / n^a`` volume instability.

A subsample is a pair of 0/1 indicator rows over the prompts, so the ``B`` estimates of a size
are one matrix product (:func:`torsion.analysis.rotation.batched_mean_difference`'s machinery),
never a Python loop over draws.

Example::

    sizes = pool_sizes(120, m=5)                            # 8 sizes, 5 … 120
    angles = subsample_angles(x, refused_rows, complied_rows, sizes, B=200, seed=0)  # [8, 200, n_layers]
    fit = fit_learning_curve(sizes, angles.mean(1)[:, 12].numpy())
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from torsion.analysis.rotation import _map_mean_differences
from torsion.errors import TorsionError
from torsion.geometry import angle_deg

A_MAX = 4.0  # upper bound of the exponent a (a >= 0; the bound keeps the fit finite and is recorded)
A_GRID = np.linspace(0.0, A_MAX, 801)  # the profile fit's grid of a (step 0.005)
MIN_FIT_SIZES = 4  # distinct sizes below N needed to fit three parameters


def pool_sizes(n_pool: int, *, m: int = 5, n_sizes: int = 8) -> list[int]:
    """Pool sizes geometric from ``m`` to ``n_pool`` (both included), rounded, duplicates dropped."""
    if m < 2 or n_pool < m or n_sizes < 2:
        raise TorsionError(f"a learning curve needs 2 <= m <= N and at least 2 sizes (got m={m}, N={n_pool}, "
                           f"n_sizes={n_sizes}); lower m or use more prompts")
    return sorted({int(round(n)) for n in np.geomspace(m, n_pool, n_sizes)})


def proportional_split(n: int, n_first: int, n_second: int) -> tuple[int, int]:
    """Rows of each class in a subsample of size ``n`` that keeps the pool's class proportions.

    ``round(n · n_first / N)`` first-class rows, at least 1 of each class and no more than
    the class holds.
    """
    first = int(round(n * n_first / (n_first + n_second)))
    first = min(max(first, 1), n_first, n - 1)
    second = min(max(n - first, 1), n_second)
    return first, second


def subsample_indicators(rows: Tensor, n_prompts: int, size: int, draws: int,
                         generator: torch.Generator) -> Tensor:
    """``[draws, n_prompts]`` 0/1 rows: each picks ``size`` of ``rows`` (prompt indices) without replacement.

    Draw: ``argsort(torch.rand([draws, len(rows)], dtype=float64))[:, :size]`` from ``generator``.
    """
    order = torch.argsort(torch.rand(draws, len(rows), generator=generator, dtype=torch.float64), dim=1)
    return torch.zeros(draws, n_prompts).scatter_(1, rows[order[:, :size]], 1.0)


def subsample_angles(x: Tensor, first_rows: Sequence[int], second_rows: Sequence[int], sizes: Sequence[int], *,
                     B: int, seed: int, resample_second: bool = True) -> tuple[Tensor, Tensor]:
    """Angles between subsample estimates and the full-pool estimate, per size, draw and layer.

    The estimate is ``mean(x[first]) − mean(x[second])``:

    - two-class vector (``resample_second=True``): first = refused, second = complied; a size
      ``n`` counts both classes, split by :func:`proportional_split`;
    - knot (``resample_second=False``): first = the bin's rows, second = the train rows whose
      mean is the origin; only the bin is subsampled, at ``n`` rows.

    A size equal to the pool is the full pool: its angles are 0 by construction and are not
    drawn. Draws come from ``torch.Generator().manual_seed(seed)``, size by size, first class
    then second.

    Args:
        x: ``[n_prompts, n_layers, d_model]``.

    Returns:
        ``[n_sizes, B, n_layers]`` float64 angles in degrees, and the full-pool estimate
        ``[n_layers, d_model]``.
    """
    first = torch.as_tensor(list(first_rows), dtype=torch.long)
    second = torch.as_tensor(list(second_rows), dtype=torch.long)
    n_prompts, n_layers, _ = x.shape
    full_first = torch.zeros(1, n_prompts).index_fill_(1, first, 1.0)
    full_second = torch.zeros(1, n_prompts).index_fill_(1, second, 1.0)
    full = _map_mean_differences(x, full_first, full_second, lambda v: v)[0]  # [n_layers, d_model]
    n_pool = len(first) + (len(second) if resample_second else 0)
    generator = torch.Generator().manual_seed(seed)
    angles = torch.zeros(len(sizes), B, n_layers, dtype=torch.float64)
    for index, size in enumerate(sizes):
        if size >= n_pool:
            continue  # the full pool: every draw is the full estimate
        if resample_second:
            n_first, n_second = proportional_split(size, len(first), len(second))
            first_weights = subsample_indicators(first, n_prompts, n_first, B, generator)
            second_weights = subsample_indicators(second, n_prompts, n_second, B, generator)
        else:
            first_weights = subsample_indicators(first, n_prompts, size, B, generator)
            second_weights = full_second.expand(B, -1)
        angles[index] = _map_mean_differences(x, first_weights, second_weights, lambda v: angle_deg(v, full))
    return angles, full


def profile_fit(sizes: Sequence[int], instability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounded least squares of ``y = k / n^a + floor`` (``k, floor ≥ 0``, ``0 ≤ a ≤ A_MAX``), vectorised.

    For fixed ``a`` the model is linear in ``(k, floor)``, and the non-negative least-squares
    solution is the unconstrained one when feasible, else the better of the two edges
    (``k = 0`` or ``floor = 0``). ``a`` is the best point of ``A_GRID``. Used for bootstrap
    replicates (thousands of fits at once) and as the start of :func:`fit_learning_curve`.

    Args:
        sizes: ``[S]`` pool sizes.
        instability: ``[..., S]`` curves in degrees.

    Returns:
        ``k``, ``a``, ``floor``, each ``[...]``.
    """
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(instability, dtype=np.float64)
    batch_shape, y = y.shape[:-1], y.reshape(-1, len(n))  # [M, S]
    x = n[None, :] ** -A_GRID[:, None]  # [G, S]
    x_mean, y_mean = x.mean(1), y.mean(1)  # [G], [M]
    x_var = ((x - x_mean[:, None]) ** 2).mean(1)  # [G]
    y_var = ((y - y_mean[:, None]) ** 2).mean(1)  # [M]
    cov = (y - y_mean[:, None]) @ (x - x_mean[:, None]).T / len(n)  # [M, G]
    safe_var = np.where(x_var > 1e-15, x_var, np.inf)
    k_free = cov / safe_var
    floor_free = y_mean[:, None] - k_free * x_mean[None, :]
    sse_free = len(n) * (y_var[:, None] - cov * k_free)
    sse_free = np.where((k_free >= 0) & (floor_free >= 0) & (x_var > 1e-15), sse_free, np.inf)
    floor_only = np.maximum(y_mean, 0.0)[:, None] * np.ones_like(cov)  # k = 0
    sse_floor_only = ((y - floor_only[:, :1]) ** 2).sum(1)[:, None] * np.ones_like(cov)
    xy, xx, yy = y @ x.T, (x**2).sum(1), (y**2).sum(1)  # [M, G], [G], [M]
    k_only = np.maximum(xy / xx, 0.0)  # floor = 0
    sse_k_only = yy[:, None] - 2 * k_only * xy + k_only**2 * xx
    sse = np.stack([sse_free, sse_floor_only, sse_k_only])  # [3, M, G]
    choice = sse.argmin(0)  # [M, G]
    k = np.choose(choice, [k_free, np.zeros_like(cov), k_only])
    floor = np.choose(choice, [floor_free, floor_only, np.zeros_like(cov)])
    best = np.take_along_axis(sse, choice[None], 0)[0].argmin(1)  # [M]
    rows = np.arange(len(y))
    return (k[rows, best].reshape(batch_shape), A_GRID[best].reshape(batch_shape),
            floor[rows, best].reshape(batch_shape))


def fit_learning_curve(sizes: Sequence[int], instability: Sequence[float]) -> dict[str, float]:
    """``k``, ``a``, ``floor`` of ``instability(n) = k / n^a + floor`` by bounded least squares.

    scipy's ``least_squares`` (trust-region reflective, bounds ``k, floor ≥ 0``,
    ``0 ≤ a ≤ A_MAX``), started from :func:`profile_fit`'s solution; the profile solution is
    kept if the polish does not lower the squared error.
    """
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(instability, dtype=np.float64)
    if len(n) < MIN_FIT_SIZES:
        raise TorsionError(f"fitting k/n^a + floor needs at least {MIN_FIT_SIZES} pool sizes (got {len(n)}); "
                           "use a larger pool or lower m")
    k0, a0, floor0 = (float(v) for v in profile_fit(n, y))

    def residuals(params: np.ndarray) -> np.ndarray:
        k, a, floor = params
        return k * n**-a + floor - y

    start = np.clip([k0, a0, floor0], [0, 0, 0], [np.inf, A_MAX, np.inf])
    start[1] = min(max(start[1], 1e-6), A_MAX - 1e-6)  # strictly inside the bounds
    polished = least_squares(residuals, start, bounds=([0.0, 0.0, 0.0], [np.inf, A_MAX, np.inf]), method="trf")
    best = polished.x if (polished.fun**2).sum() <= (residuals(np.array([k0, a0, floor0]))**2).sum() \
        else np.array([k0, a0, floor0])
    return {"k": float(best[0]), "a": float(best[1]), "floor_deg": float(best[2])}


def replicate_floors(sizes: Sequence[int], angles: np.ndarray, *, n_replicates: int, seed: int) -> np.ndarray:
    """Floors refitted on bootstrap replicates of the curves: ``[n_replicates, ...]``.

    A replicate resamples, with replacement, the ``B`` draws' angles at every size (indices
    from ``np.random.default_rng(seed)``, shared by every trailing curve) and takes their
    mean; each replicate curve is fitted by :func:`profile_fit`. The interval therefore
    reflects the subsampling noise of the curve, not the sampling of the pool itself.

    Args:
        angles: ``[n_sizes, B, ...]`` angles in degrees.
    """
    rng = np.random.default_rng(seed)
    n_sizes, B = angles.shape[:2]
    picks = rng.integers(0, B, size=(n_replicates, n_sizes, B))
    curves = np.stack([angles[s][picks[:, s]].mean(1) for s in range(n_sizes)], axis=-1)  # [R, ..., n_sizes]
    return profile_fit(sizes, curves)[2]


def learning_curve_entry(sizes: Sequence[int], angles: np.ndarray, *, n_replicates: int, seed: int,
                         threshold_deg: float) -> list[dict[str, Any]]:
    """Per trailing index (layer) of ``angles`` ``[n_sizes, B, n_layers]``: the curve, its fit and its flag.

    The full-pool size (always the last; its angles are 0 by construction) is reported and left
    out of the fit. ``floor_ci`` is the 2.5/97.5 percentile interval of the replicate floors;
    ``structural`` is ``floor_ci[0] > threshold_deg``. With fewer than ``MIN_FIT_SIZES`` sizes
    below the pool, the fit fields are None.
    """
    fit_sizes = list(sizes[:-1])
    curve, spread = angles.mean(1), angles.std(1, ddof=1)  # [n_sizes, n_layers]
    can_fit = len(fit_sizes) >= MIN_FIT_SIZES
    floors = replicate_floors(fit_sizes, angles[:-1], n_replicates=n_replicates, seed=seed) if can_fit else None
    entries = []
    for layer in range(angles.shape[2]):
        entry: dict[str, Any] = {"sizes": [int(s) for s in sizes], "instability_deg": curve[:, layer].tolist(),
                                 "instability_sd_deg": spread[:, layer].tolist()}
        if can_fit:
            fit = fit_learning_curve(fit_sizes, curve[:-1, layer])
            lo, hi = np.percentile(floors[:, layer], [2.5, 97.5])
            entry.update(fit, floor_ci=[float(lo), float(hi)], structural=bool(lo > threshold_deg))
        else:
            entry.update(k=None, a=None, floor_deg=None, floor_ci=None, structural=None)
        entries.append(entry)
    return entries
