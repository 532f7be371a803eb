"""Spline A (one curve per block) and spline B (one thin-plate surface over (t, layer)).

methods.md, "Manifold (spline) steering". Both live in PCA coordinates ``z = U(h − μ_l)``
(``U`` ``[k, d]`` with orthonormal rows, ``μ_l`` the train mean at block ``l``):

- **A**: at each block its own basis ``U_l``, and a scipy spline ``s_l(t)`` through that
  block's knot coordinates (``make_interp_spline`` of degree ``min(3, n_knots − 1)``; with
  ``smoothing > 0``, ``make_splrep`` per coordinate with ``s = smoothing``).
- **B**: one basis ``U`` for every eligible block (PCA of the pooled, per-block-centred rows:
  the residual stream is one space), and ``S(t, u)`` =
  ``RBFInterpolator(kernel="thin_plate_spline", smoothing=...)`` over the knots of every
  eligible block, with depth ``u = l / (n_layers − 1)`` so both axes span [0, 1].

Example::

    fits = fit_a(knots, layers=[10, 12], k=8)
    fits[10].curve()(0.8)            # [k] target coordinates at t = 0.8
    surface = fit_b(knots, layers=range(6, 19), k=8, n_layers=24)
    surface.evaluate(0.8, 12)        # [k]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.interpolate import RBFInterpolator, make_interp_spline, make_splrep
from torch import Tensor

from torsion.errors import TorsionError
from torsion.manifold.knots import Knots

Curve = Callable[[float], np.ndarray]  # t -> [k]


def pca_basis(centred: Tensor, k: int) -> Tensor:
    """Top-``k`` principal directions ``[k, d]`` (orthonormal rows, float32) of centred rows ``[n, d]``.

    Computed in float64 from the smaller of the Gram matrix ``X Xᵀ`` (``n ≤ d``) and the
    scatter matrix ``Xᵀ X`` with a symmetric eigensolver (several times cheaper than an SVD
    here). Signs are fixed so each direction's largest-magnitude entry is positive.
    """
    n, d = centred.shape
    if not 1 <= k <= min(n, d):
        raise TorsionError(f"k={k} PCA dims but the rows span at most {min(n, d)}; pass a smaller --k")
    x = centred.double()
    if n <= d:
        values, vectors = torch.linalg.eigh(x @ x.T)  # ascending
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        if not values[-1] > 1e-12 * values[0]:
            raise TorsionError(f"the rows span fewer than k={k} dimensions; pass a smaller --k")
        basis = (vectors.T @ x) / values.sqrt()[:, None]
    else:
        values, vectors = torch.linalg.eigh(x.T @ x)
        basis = vectors.flip(1)[:, :k].T
    signs = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    return (basis * signs).float()


def make_curve(knots_t: np.ndarray, coords: np.ndarray, smoothing: float = 0.0,
               weights: Sequence[float] | None = None) -> Curve:
    """A library spline through ``coords`` ``[n_knots, k]`` at ``knots_t`` ``[n_knots]``; extrapolates linearly-or-cubically.

    ``weights`` ``[n_knots]`` weigh each knot's residual in the smoothing spline (``smoothing > 0``;
    a soft knot has weight < 1); an interpolating spline (``smoothing = 0``) passes through every knot.
    """
    degree = min(3, len(knots_t) - 1)
    if smoothing == 0:
        spline = make_interp_spline(knots_t, coords, k=degree)
        return lambda t: np.asarray(spline(t))
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    splines = [make_splrep(knots_t, coords[:, j], w=w, k=degree, s=smoothing) for j in range(coords.shape[1])]
    return lambda t: np.array([float(s(t)) for s in splines])


@dataclass(frozen=True, eq=False)
class BlockCurve:
    """Spline A at one block: ``basis`` ``[k, d]``, ``mean`` ``[d]``, ``knots`` ``[n_knots, k]``, ``knots_t`` ``[n_knots]``."""

    layer: int
    basis: Tensor
    mean: Tensor
    knots: Tensor
    knots_t: Tensor
    smoothing: float = 0.0
    knot_weights: tuple[float, ...] | None = None

    def curve(self) -> Curve:
        return make_curve(self.knots_t.double().numpy(), self.knots.double().numpy(), self.smoothing,
                          self.knot_weights)


def _check_layers(knots: Knots, layers: Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(int(layer) for layer in layers)
    n_layers = knots.centroids.shape[1]
    if not chosen or any(not 0 <= layer < n_layers for layer in chosen) or len(set(chosen)) != len(chosen):
        raise TorsionError(f"layers {list(chosen)} must be distinct blocks in 0..{n_layers - 1}; fix --layers")
    return chosen


def fit_a(knots: Knots, layers: Sequence[int], *, k: int = 8, smoothing: float = 0.0,
          knot_weights: Sequence[float] | None = None) -> dict[int, BlockCurve]:
    """Spline A at each block of ``layers``: its own PCA basis and curve through its knots."""
    fits = {}
    mean = knots.mean
    for layer in _check_layers(knots, layers):
        basis = pca_basis(knots.rows[:, layer] - mean[layer], k)
        coords = (knots.centroids[:, layer] - mean[layer]) @ basis.T  # [n_knots, k]
        fits[layer] = BlockCurve(layer, basis, mean[layer].clone(), coords, knots.t.float(), smoothing,
                                 None if knot_weights is None else tuple(map(float, knot_weights)))
    return fits


@dataclass(frozen=True, eq=False)
class Surface:
    """Spline B: shared ``basis`` ``[k, d]``; per block of ``layers`` a ``mean`` and ``knots``.

    ``means`` ``[n_blocks, d]``, ``knots`` ``[n_blocks, n_knots, k]``, ``knots_t`` ``[n_knots]``;
    ``n_layers`` is the model's depth (for ``u = l / (n_layers − 1)``).
    """

    layers: tuple[int, ...]
    basis: Tensor
    means: Tensor
    knots: Tensor
    knots_t: Tensor
    n_layers: int
    smoothing: float = 0.0
    knot_weights: tuple[float, ...] | None = None  # [n_knots]: a soft knot's smoothing is smoothing / w**2

    def depth(self, layer: float) -> float:
        return float(layer) / max(self.n_layers - 1, 1)

    def interpolator(self, exclude: int | None = None) -> RBFInterpolator:
        """The thin-plate surface over every block's knots, or all but block ``exclude``."""
        points, values, smoothing = [], [], []
        weights = self.knot_weights or (1.0,) * self.knots_t.numel()
        for index, layer in enumerate(self.layers):
            if layer == exclude:
                continue
            for j, t in enumerate(self.knots_t.tolist()):
                points.append((t, self.depth(layer)))
                values.append(self.knots[index, j].double().numpy())
                smoothing.append(self.smoothing / weights[j] ** 2)
        if len(points) < 3:
            raise TorsionError(f"spline B needs at least 3 (t, layer) knots, got {len(points)}; "
                               "fit it on more blocks")
        return RBFInterpolator(np.array(points), np.array(values), kernel="thin_plate_spline",
                               smoothing=np.array(smoothing) if self.knot_weights else self.smoothing)

    def evaluate(self, t: float, layer: int, interpolator: RBFInterpolator | None = None) -> np.ndarray:
        """``S(t, l)``, ``[k]``."""
        interpolator = interpolator or self.interpolator()
        return interpolator(np.array([[float(t), self.depth(layer)]]))[0]

    def mean_of(self, layer: int) -> Tensor:
        if layer not in self.layers:
            raise TorsionError(f"spline B was fitted on blocks {list(self.layers)}, not block {layer}; "
                               "steer blocks it was fitted on or refit with --layers")
        return self.means[self.layers.index(layer)]


def fit_b(knots: Knots, layers: Sequence[int], *, k: int = 8, n_layers: int, smoothing: float = 0.0,
          knot_weights: Sequence[float] | None = None) -> Surface:
    """Spline B over ``layers``: one PCA basis of the pooled per-block-centred rows, knots in it."""
    chosen = _check_layers(knots, layers)
    if len(chosen) < 2:
        raise TorsionError("spline B needs at least two blocks; pass more --layers")
    mean = knots.mean
    pooled = torch.cat([knots.rows[:, layer] - mean[layer] for layer in chosen])
    basis = pca_basis(pooled, k)
    means = torch.stack([mean[layer] for layer in chosen])
    coords = torch.stack([(knots.centroids[:, layer] - mean[layer]) @ basis.T for layer in chosen])
    return Surface(chosen, basis, means, coords, knots.t.float(), n_layers, smoothing,
                   None if knot_weights is None else tuple(map(float, knot_weights)))


def leave_one_block_out(knots: Knots, fits_a: dict[int, BlockCurve], surface: Surface) -> dict:
    """Smoothness across depth: predict each block's knots without it (B) vs nearest-block copying and A.

    Per block of the surface, averaged over knots, in activation space (``‖pred − c_{l,j}‖``):
    ``b_loo`` (B refitted without the block, evaluated there), ``nearest_copy`` (the nearest
    other block's knot coordinates in B's basis, placed at this block's mean) and ``a_fit``
    (A's own in-sample fit at this block, the floor set by its k-dim subspace; None where A
    was not fitted). ``*_in_basis`` are the same B and nearest errors in B's k coordinates.
    ``knot_scale`` is the mean ``‖c_{l,j} − μ_l‖``, for relative errors. ``edge`` marks the
    outermost blocks, where B extrapolates in depth.
    """
    U = surface.basis.double()
    t_values = surface.knots_t.tolist()
    rows = []
    for index, layer in enumerate(surface.layers):
        others = [other for other in surface.layers if other != layer]
        nearest = min(others, key=lambda other: (abs(other - layer), other))
        interpolator = surface.interpolator(exclude=layer)
        mu = surface.means[index].double()
        truth = knots.centroids[:, layer].double()  # [n_knots, d]
        predicted = np.stack([surface.evaluate(t, layer, interpolator) for t in t_values])
        b_coords = torch.from_numpy(predicted)
        copy_coords = surface.knots[surface.layers.index(nearest)].double()
        own = surface.knots[index].double()
        row = {"layer": layer, "nearest": nearest, "edge": layer in (min(surface.layers), max(surface.layers)),
               "knot_scale": _mean_norm(truth - mu),
               "b_loo": _mean_norm(mu + b_coords @ U - truth),
               "nearest_copy": _mean_norm(mu + copy_coords @ U - truth),
               "b_loo_in_basis": _mean_norm(b_coords - own),
               "nearest_copy_in_basis": _mean_norm(copy_coords - own),
               "a_fit": None}
        if layer in fits_a:
            fit = fits_a[layer]
            curve = fit.curve()
            a_coords = torch.from_numpy(np.stack([curve(t) for t in t_values]))
            row["a_fit"] = _mean_norm(fit.mean.double() + a_coords @ fit.basis.double() - truth)
        rows.append(row)
    interior = [r for r in rows if not r["edge"]] or rows
    summary = {key: float(np.mean([r[key] for r in interior])) for key in ("b_loo", "nearest_copy", "knot_scale")}
    summary["blocks_where_b_beats_nearest"] = sum(r["b_loo"] < r["nearest_copy"] for r in interior)
    summary["n_interior_blocks"] = len(interior)
    if all(r["a_fit"] is not None for r in interior):
        summary["a_fit"] = float(np.mean([r["a_fit"] for r in interior]))
    return {"blocks": rows, "summary_interior": summary,
            "units": "mean over knots of ||prediction - knot centroid|| in activation space"}


def _mean_norm(diff: Tensor) -> float:
    return float(torch.linalg.vector_norm(diff, dim=-1).mean())
