"""The learning curve of an estimated direction (methods.md, "Learning-curve floor").

For a direction estimated from a pool of ``N`` rows (a two-class MD vector, or a behaviour
bin's centroid about the train mean): at sizes ``n`` geometric from ``m``, draw ``B``
subsamples without replacement; ``instability(n)`` is the mean angle between a subsample's
estimate and a reference. The curve is fitted by ``k / n^a + floor`` with ``k, a, floor ≥ 0``;
the floor is structural instability, ``k / n^a`` volume instability. Two references:

- ``pool`` (methods.md's definition): the full pool's estimate, sizes up to ``N``. A subsample
  without replacement has error variance ``S²(1/n − 1/N)`` about the pool's estimate, so the
  curve is forced to 0 at ``n = N`` whatever the structure and a fitted floor is pulled to 0.
- ``split``: a second subsample of the same size, disjoint from the first (both keep a two-class
  pool's class proportions), sizes up to ``N/2``. Two disjoint subsample means differ with
  variance exactly ``2S²/n`` (the finite-population terms cancel: each has ``S²(1/n − 1/N)``,
  their covariance is ``−S²/N``), so the curve is ``k / n^a`` with nothing pinning it to 0, and
  a curve that stops falling shows as a floor. In the small-angle regime it is about ``√2``
  times an estimate's angle to the population direction.

A subsample is a weight row over the prompts (an indicator scaled by ``1/n``), so the ``B``
estimates of a size are weights times the activations; their norms and their angles to the
full estimate are forms in the rows' Gram matrix, computed once per component, never a
Python loop over draws.

Example::

    sizes = pool_sizes(120, m=5)                            # 8 sizes, 5 … 120 (split: pool_sizes(60, m=5))
    gram = centred_gram(x)                                  # [n_layers, n_prompts, n_prompts]
    angles = subsample_angles(gram, refused_rows, complied_rows, sizes, B=200, seed=0)  # [8, 200, n_layers]
    fit = fit_learning_curve(sizes[:-1], angles.mean(1)[:-1, 12].numpy())  # pool: n = N is 0, left out
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from torsion.errors import TorsionError
from torsion.geometry import angle_from_cosine

REFERENCES = ("pool", "split")
A_MAX = 4.0  # upper bound of the exponent a (a >= 0; the bound keeps the fit finite and is recorded)
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


def split_counts(n: int, n_first: int, n_second: int) -> tuple[int, int]:
    """Rows of each class in each of two disjoint subsamples of size ``n`` (the ``split`` reference).

    :func:`proportional_split`, then capped at half of each class so that the two subsamples fit
    in the pool side by side.
    """
    first, second = proportional_split(n, n_first, n_second)
    return min(first, n_first // 2), min(second, n_second // 2)


def reference_sizes(n_pool: int, reference: str, *, m: int, n_sizes: int) -> list[int]:
    """The sizes of a curve: ``pool`` geometric from ``m`` to ``N``; ``split`` from ``m`` to ``N // 2``.

    Raises:
        TorsionError: an unknown reference, or a pool too small for it (``split`` needs ``2m`` rows).
    """
    if reference not in REFERENCES:
        raise TorsionError(f"unknown reference {reference!r}; choose {' or '.join(REFERENCES)}")
    return pool_sizes(n_pool if reference == "pool" else n_pool // 2, m=m, n_sizes=n_sizes)


def centred_gram(x: Tensor) -> Tensor:
    """Inner products of the rows about their mean, per layer: ``[n, n_layers, d_model]`` → ``[n_layers, n, n]``.

    float64. Every estimate of this module is a weighted sum of these centred rows (a
    two-class vector's weights sum to zero, so the origin cancels; a knot is taken about the
    train mean, which is this mean), so its norm and its dot product with another estimate are
    forms in this matrix: no ``d_model``-sized vector is formed per draw.
    """
    rows = x.double() - x.double().mean(0)
    by_layer = rows.transpose(0, 1)  # [n_layers, n, d_model]
    return by_layer @ by_layer.transpose(-1, -2)


def subsample_angles(gram: Tensor, first_rows: Sequence[int], second_rows: Sequence[int], sizes: Sequence[int], *,
                     B: int, seed: int, resample_second: bool = True, reference: str = "pool") -> Tensor:
    """Angles between subsample estimates and their reference, per size, draw and layer.

    - two-class vector (``resample_second=True``): ``mean(x[first]) − mean(x[second])``, first =
      refused, second = complied; a size ``n`` counts both classes, split by
      :func:`proportional_split` (``split``: :func:`split_counts`);
    - knot (``resample_second=False``): ``mean(x[first]) − mean(x)``, the bin's centroid about
      the mean of the rows ``gram`` was built from (the train mean); ``second_rows`` is unused
      and only the bin is subsampled, at ``n`` rows.

    ``reference="pool"``: the angle to the full pool's estimate; a size equal to the pool is the
    full pool, its angles are 0 by construction and are not drawn. ``reference="split"``: the
    angle to a second subsample of the same size, disjoint from the first (a size must leave
    room for both: at most half of each class).

    A draw is a weight row (an indicator over the pool scaled by ``1/n`` per class), so the
    ``B`` estimates' squared norms are ``w G w`` and their dots with the reference ``w G w_ref``,
    batched over draws and layers. Draws: ``torch.Generator().manual_seed(seed)``, size by size,
    ``argsort(torch.rand([B, n_class], dtype=float64))`` for the first class, then the second;
    a subsample takes the first ``n_class_size`` rows of each order, and ``split``'s second
    subsample the next ``n_class_size``.

    Args:
        gram: ``[n_layers, n_prompts, n_prompts]`` from :func:`centred_gram`.

    Returns:
        ``[n_sizes, B, n_layers]`` float64 angles in degrees.
    """
    if reference not in REFERENCES:
        raise TorsionError(f"unknown reference {reference!r}; choose {' or '.join(REFERENCES)}")
    first = torch.as_tensor(list(first_rows), dtype=torch.long)
    second = torch.as_tensor(list(second_rows) if resample_second else [], dtype=torch.long)
    pool = torch.cat([first, second])
    pool_gram = gram[:, pool][:, :, pool]  # [n_layers, n_pool, n_pool]
    n_first, n_pool = len(first), len(pool)
    n_second = n_pool - n_first
    generator = torch.Generator().manual_seed(seed)
    angles = torch.zeros(len(sizes), B, gram.shape[0], dtype=torch.float64)
    if reference == "pool":
        full = torch.cat([torch.full((n_first,), 1.0 / n_first, dtype=torch.float64),
                          torch.full((n_second,), -1.0 / max(n_second, 1), dtype=torch.float64)])
        projections = pool_gram @ full  # [n_layers, n_pool]: each row's dot with the full estimate
        full_norm = (projections @ full).clamp_min(0).sqrt()  # [n_layers]
    for index, size in enumerate(sizes):
        if reference == "pool":
            if size >= n_pool:
                continue  # the full pool: every draw is the full estimate
            counts = proportional_split(size, n_first, n_second) if resample_second else (size, 0)
            weights = torch.cat([_draw_weights(n_first, counts[0], B, generator),
                                 -_draw_weights(n_second, counts[1], B, generator)], dim=1)  # [B, n_pool]
            dots = weights @ projections.T  # [B, n_layers]
            norms = _quadratic(pool_gram, weights, weights).T.clamp_min(0).sqrt()  # [B, n_layers]
            angles[index] = angle_from_cosine(dots / (norms * full_norm).clamp_min(1e-300))
            continue
        counts = split_counts(size, n_first, n_second) if resample_second else (size, 0)
        if size > n_pool // 2 or counts[0] < 1 or (resample_second and counts[1] < 1):
            raise TorsionError(f"size {size} leaves no room for two disjoint subsamples of a pool of {n_first} + "
                               f"{n_second} rows; use sizes up to half of each class (reference_sizes)")
        first_a, first_b = _draw_halves(n_first, counts[0], B, generator)
        second_a, second_b = _draw_halves(n_second, counts[1], B, generator)
        a = torch.cat([first_a, -second_a], dim=1)  # [B, n_pool]
        b = torch.cat([first_b, -second_b], dim=1)
        both = torch.cat([a, b])  # [2B, n_pool]: one product with the Gram matrix for both subsamples
        products = both[None] @ pool_gram  # [n_layers, 2B, n_pool]
        norms = (products * both[None]).sum(-1).clamp_min(0).sqrt()  # [n_layers, 2B]
        dots = (products[:, :B] * b[None]).sum(-1)  # [n_layers, B]
        angles[index] = angle_from_cosine(dots / (norms[:, :B] * norms[:, B:]).clamp_min(1e-300)).T
    return angles


def _quadratic(gram: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``left_b G right_b`` per layer and draw: ``[n_layers, B]`` from ``[n_layers, n, n]`` and ``[B, n]`` twice."""
    return ((left[None] @ gram) * right[None]).sum(-1)


def _draw_halves(n_rows: int, size: int, draws: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two ``[draws, n_rows]`` float64 weight rows per draw: ``1/size`` on two disjoint sets of ``size`` rows."""
    if size == 0:
        empty = torch.zeros(draws, n_rows, dtype=torch.float64)
        return empty, empty.clone()
    order = torch.argsort(torch.rand(draws, n_rows, generator=generator, dtype=torch.float64), dim=1)
    halves = []
    for start in (0, size):
        weights = torch.zeros(draws, n_rows, dtype=torch.float64)
        halves.append(weights.scatter_(1, order[:, start:start + size], 1.0 / size))
    return halves[0], halves[1]


def _draw_weights(n_rows: int, size: int, draws: int, generator: torch.Generator) -> Tensor:
    """``[draws, n_rows]`` float64: ``1/size`` on ``size`` rows drawn without replacement, else 0."""
    if size == 0:
        return torch.zeros(draws, n_rows, dtype=torch.float64)
    order = torch.argsort(torch.rand(draws, n_rows, generator=generator, dtype=torch.float64), dim=1)
    weights = torch.zeros(draws, n_rows, dtype=torch.float64)
    return weights.scatter_(1, order[:, :size], 1.0 / size)


def profile_fit(sizes: Sequence[int], instability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounded least squares of ``y = k / n^a + floor`` (``k, floor ≥ 0``, ``0 ≤ a ≤ A_MAX``), vectorised.

    For fixed ``a`` the model is linear in ``(k, floor)``, and the non-negative least-squares
    solution is the unconstrained one when feasible, else the better of the two edges
    (``k = 0`` or ``floor = 0``). ``a`` is searched on a grid of step ``A_MAX / 80``, then
    refined on a grid of step ``A_MAX / 1600`` around the best point. Used for bootstrap
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
    _, a, _ = _best_on_grid(n, y, np.linspace(0.0, A_MAX, 81))
    fine = np.clip(a[:, None] + np.linspace(-A_MAX / 80, A_MAX / 80, 41)[None], 0.0, A_MAX)
    k, a, floor = _best_on_grid(n, y, fine)
    return k.reshape(batch_shape), a.reshape(batch_shape), floor.reshape(batch_shape)


def _best_on_grid(n: np.ndarray, y: np.ndarray, a_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``(k, a, floor)`` per curve of ``y`` ``[M, S]`` over a grid of ``a``: ``[G]`` shared, or ``[M, G]``."""
    size = len(n)
    x = n ** -a_grid[..., None]  # [G, S] or [M, G, S]
    xy = y @ x.T if a_grid.ndim == 1 else np.einsum("mgs,ms->mg", x, y)  # [M, G]
    x_sum, xx = x.sum(-1), (x**2).sum(-1)  # [G] or [M, G]
    y_sum, yy = y.sum(-1)[:, None], (y**2).sum(-1)[:, None]  # [M, 1]
    x_var = xx / size - (x_sum / size) ** 2
    cov = xy / size - x_sum * y_sum / size**2  # [M, G]
    varies = np.broadcast_to(x_var > 1e-12, cov.shape)
    k_free = np.where(varies, cov / np.where(varies, x_var, 1.0), 0.0)
    floor_free = (y_sum - k_free * x_sum) / size
    sse_free = yy - y_sum**2 / size - k_free * cov * size  # S·(var_y − cov²/var_x)
    sse_free = np.where(varies & (k_free >= 0) & (floor_free >= 0), sse_free, np.inf)
    floor_only = np.maximum(y_sum / size, 0.0)  # the k = 0 edge, [M, 1]
    sse_floor_only = yy - 2 * floor_only * y_sum + size * floor_only**2
    k_only = np.maximum(xy / xx, 0.0)  # the floor = 0 edge
    sse_k_only = yy - 2 * k_only * xy + k_only**2 * xx
    use_free = sse_free <= np.minimum(sse_floor_only, sse_k_only)
    use_k_only = ~use_free & (sse_k_only < sse_floor_only)
    k = np.where(use_free, k_free, np.where(use_k_only, k_only, 0.0))
    floor = np.where(use_free, floor_free, np.where(use_k_only, 0.0, floor_only))
    best = np.minimum(sse_free, np.minimum(sse_floor_only, sse_k_only)).argmin(1)
    rows = np.arange(len(y))
    a_best = a_grid[best] if a_grid.ndim == 1 else a_grid[rows, best]
    return k[rows, best], a_best, floor[rows, best]


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
                         threshold_deg: float, reference: str = "pool") -> list[dict[str, Any]]:
    """Per trailing index (layer) of ``angles`` ``[n_sizes, B, n_layers]``: the curve, its fit and its flag.

    ``reference="pool"``: the full-pool size (always the last; its angles are 0 by construction)
    is reported and left out of the fit. ``reference="split"``: every size is fitted.
    ``floor_ci`` is the 2.5/97.5 percentile interval of the replicate floors; ``structural`` is
    ``floor_ci[0] > threshold_deg``. With fewer than ``MIN_FIT_SIZES`` fitted sizes, the fit
    fields are None.
    """
    if reference not in REFERENCES:
        raise TorsionError(f"unknown reference {reference!r}; choose {' or '.join(REFERENCES)}")
    n_fit = len(sizes) - 1 if reference == "pool" else len(sizes)
    fit_sizes = list(sizes[:n_fit])
    curve, spread = angles.mean(1), angles.std(1, ddof=1)  # [n_sizes, n_layers]
    can_fit = len(fit_sizes) >= MIN_FIT_SIZES
    floors = replicate_floors(fit_sizes, angles[:n_fit], n_replicates=n_replicates, seed=seed) if can_fit else None
    entries = []
    for layer in range(angles.shape[2]):
        entry: dict[str, Any] = {"sizes": [int(s) for s in sizes], "instability_deg": curve[:, layer].tolist(),
                                 "instability_sd_deg": spread[:, layer].tolist()}
        if can_fit:
            fit = fit_learning_curve(fit_sizes, curve[:n_fit, layer])
            lo, hi = np.percentile(floors[:, layer], [2.5, 97.5])
            entry.update(fit, floor_ci=[float(lo), float(hi)], structural=bool(lo > threshold_deg))
        else:
            entry.update(k=None, a=None, floor_deg=None, floor_ci=None, structural=None)
        entries.append(entry)
    return entries
