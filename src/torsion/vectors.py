"""Steering vectors per layer: MD, RMD, WRMD, PCA, probe (methods.md, "Steering vectors").

Every method maps refused activations ``[n_refused, n_layers, d_model]`` and complied
activations ``[n_complied, n_layers, d_model]`` to directions ``[n_layers, d_model]`` in
float32, computed in float64 and batched over layers. :func:`fit_vectors` selects the classes
from judge scores and fits the global vector and one per category.

Example::

    vectors = fit_vectors(activations, scores, method="rmd", categories=categories)
    axis = vectors[""].normalized()
    save_vectors("vectors.safetensors", {"rmd/resid": axis}, run_meta={})
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import torsion
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.judge.base import is_complied, is_refused
from torsion.vector_file import SteeringVector, load_run_meta, load_vector, load_vectors, save_vectors

__all__ = [
    "METHODS", "SteeringVector", "clip_outliers", "fit_vectors", "harm_direction", "load_run_meta", "load_vector",
    "load_vectors", "mean_difference", "pca_direction", "probe_direction", "rmd", "save_vectors", "wrmd",
]

LAM_MODES = ("absolute", "relative")
WEIGHT_FLOOR = 0.01  # w_r = max(s, 0.01), w_c = max(-s, 0.01)


def mean_difference(refused: Tensor, complied: Tensor) -> Tensor:
    """MD: ``v_l = mean(X_r) - mean(X_c)``.

    Args:
        refused: ``[n_refused, n_layers, d_model]``.
        complied: ``[n_complied, n_layers, d_model]``.

    Returns:
        ``[n_layers, d_model]`` in float32 (means are accumulated in float64).
    """
    return (refused.double().mean(0) - complied.double().mean(0)).float()


def harm_direction(harmful: Tensor, harmless: Tensor, *, project: bool = True) -> Tensor:
    """Harmful minus harmless, the abliteration direction (heretic's, with ``project`` its default).

    ``d_l = normalize(mean(H_l) − mean(N_l))``; with ``project``, only the part orthogonal to the
    harmless mean's direction ``ĝ_l = normalize(mean(N_l))`` is kept and renormalised,
    ``normalize(d_l − (d_l·ĝ_l) ĝ_l)``, so ablating it leaves the harmless mean's own direction alone.
    Unlike :func:`mean_difference` it needs no judge: harmful and harmless are prompt sets, not labels.

    Args:
        harmful: ``[n_harmful, n_layers, d_model]``.
        harmless: ``[n_harmless, n_layers, d_model]``.

    Returns:
        Unit rows ``[n_layers, d_model]`` in float32 (computed in float64).
    """
    if harmful.shape[0] == 0 or harmless.shape[0] == 0:
        raise TorsionError("the harm direction needs at least one harmful and one harmless activation")
    direction = torch.nn.functional.normalize(mean_difference(harmful, harmless).double(), dim=-1)
    if project:
        anchor = torch.nn.functional.normalize(harmless.double().mean(0), dim=-1)
        direction = direction - (direction * anchor).sum(-1, keepdim=True) * anchor
        direction = torch.nn.functional.normalize(direction, dim=-1)
    return direction.float()


def rmd(refused: Tensor, complied: Tensor, *, neutral: Tensor | None = None, lam: float = 1e-2,
        lam_mode: str = "relative") -> Tensor:
    """RMD: ``v_l = (C_l + λ_l I)⁻¹ (r̄_l − c̄_l)``, solved per layer by float64 Cholesky.

    ``μ_n`` is the mean of ``neutral`` ``[n_neutral, n_layers, d_model]`` (default: the complied
    set), ``r̄ = mean(X_r − μ_n)``, ``c̄ = mean(X_c − μ_n)``. ``μ_n`` cancels in ``r̄ − c̄`` in
    exact arithmetic; it is kept because methods.md defines RMD this way. ``C`` is the unbiased
    (ddof=1) covariance of the complied set. ``lam_mode="absolute"`` uses ``λ = lam``;
    ``"relative"`` uses ``λ_l = lam · trace(C_l) / d_model``. RMD is :func:`wrmd` with unit
    weights, so the two agree exactly when the weights are equal.

    Returns:
        ``[n_layers, d_model]`` float32.
    """
    ones_r = torch.ones(len(refused), dtype=torch.float64)
    ones_c = torch.ones(len(complied), dtype=torch.float64)
    return _weighted_ridge_difference(refused, complied, ones_r, ones_c, neutral, lam, lam_mode)


def wrmd(refused: Tensor, complied: Tensor, refused_scores: Sequence[float] | Tensor,
         complied_scores: Sequence[float] | Tensor, *, neutral: Tensor | None = None, lam: float = 1e-2,
         lam_mode: str = "relative") -> Tensor:
    """WRMD: RMD with weights ``w_r = max(s, 0.01)``, ``w_c = max(−s, 0.01)`` in means and covariance.

    Means are ``Σ w x / Σ w``. The complied covariance uses reliability weights,
    ``C = Σ w (x − μ_w)(x − μ_w)ᵀ / (Σ w − Σ w² / Σ w)`` (numpy's ``cov(aweights=w, ddof=1)``),
    which is the unbiased covariance of :func:`rmd` when all weights are equal. ``neutral``, when
    given, enters unweighted; by default ``μ_n`` is the weighted complied mean.

    Args:
        refused_scores: ``[n_refused]`` judge scores of the refused rows.
        complied_scores: ``[n_complied]`` judge scores of the complied rows.

    Returns:
        ``[n_layers, d_model]`` float32.
    """
    s_r = torch.as_tensor(refused_scores, dtype=torch.float64)
    s_c = torch.as_tensor(complied_scores, dtype=torch.float64)
    if s_r.shape != (len(refused),) or s_c.shape != (len(complied),):
        raise TorsionError(f"wrmd needs one score per row: got {tuple(s_r.shape)} scores for "
                           f"{len(refused)} refused and {tuple(s_c.shape)} for {len(complied)} complied rows")
    weights_r = s_r.clamp(min=WEIGHT_FLOOR)
    weights_c = (-s_c).clamp(min=WEIGHT_FLOOR)
    return _weighted_ridge_difference(refused, complied, weights_r, weights_c, neutral, lam, lam_mode)


def _weighted_ridge_difference(refused: Tensor, complied: Tensor, weights_r: Tensor, weights_c: Tensor,
                               neutral: Tensor | None, lam: float, lam_mode: str) -> Tensor:
    """The one definition behind RMD and WRMD; weights are ``[n_refused]`` and ``[n_complied]``."""
    if lam_mode not in LAM_MODES:
        raise TorsionError(f"unknown lam_mode {lam_mode!r}; choose one of {', '.join(LAM_MODES)}")
    if lam < 0:
        raise TorsionError(f"lam={lam} is negative; use lam >= 0 (a small positive value keeps C + λI invertible)")
    if len(complied) < 2:
        raise TorsionError(f"rmd/wrmd need at least 2 complied samples to estimate their covariance "
                           f"(got {len(complied)}); use more prompts or method 'md'")
    x_r, x_c = refused.double(), complied.double()
    mu_n = neutral.double().mean(0) if neutral is not None else _weighted_mean(x_c, weights_c)
    r_bar = _weighted_mean(x_r - mu_n, weights_r)  # [n_layers, d_model]
    c_bar = _weighted_mean(x_c - mu_n, weights_c)
    deviations = x_c - _weighted_mean(x_c, weights_c)  # [n_complied, n_layers, d_model]
    total = weights_c.sum()
    scale = (weights_c / (total - (weights_c**2).sum() / total)).sqrt()
    factor_rows = (scale[:, None, None] * deviations).transpose(0, 1)  # A: [n_layers, n_complied, d_model], C = AᵀA
    n_complied, d_model = factor_rows.shape[1:]
    if lam_mode == "relative":
        ridge = lam * (factor_rows**2).sum((-2, -1)) / d_model  # trace(C) / d, [n_layers]
    else:
        ridge = torch.full((factor_rows.shape[0],), float(lam), dtype=torch.float64)
    target = (r_bar - c_bar).unsqueeze(-1)  # [n_layers, d_model, 1]
    if n_complied < d_model and bool((ridge > 0).all()):
        # Push-through identity: (AᵀA + λI)⁻¹ b = (b − Aᵀ (AAᵀ + λI)⁻¹ A b) / λ. The Cholesky
        # factorisation is of the n×n system instead of the d×d one; no inverse is formed.
        system = factor_rows @ factor_rows.transpose(-1, -2)
        system += ridge[:, None, None] * torch.eye(n_complied, dtype=torch.float64)
        inner = torch.cholesky_solve(factor_rows @ target, _cholesky(system, lam, lam_mode))
        solution = (target - factor_rows.transpose(-1, -2) @ inner) / ridge[:, None, None]
    else:
        system = factor_rows.transpose(-1, -2) @ factor_rows
        system += ridge[:, None, None] * torch.eye(d_model, dtype=torch.float64)
        solution = torch.cholesky_solve(target, _cholesky(system, lam, lam_mode))
    return solution.squeeze(-1).float()


def _cholesky(system: Tensor, lam: float, lam_mode: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):
        bad = torch.nonzero(info).flatten().tolist()
        raise TorsionError(f"C + λI is not positive definite at layer(s) {bad} (lam={lam}, {lam_mode}); "
                           "use a larger lam")
    return factor


def _weighted_mean(x: Tensor, weights: Tensor) -> Tensor:
    """``Σ w x / Σ w`` over rows: ``[n, n_layers, d_model]`` -> ``[n_layers, d_model]``."""
    return torch.einsum("n,nld->ld", weights, x) / weights.sum()


def pca_direction(refused: Tensor, complied: Tensor) -> Tensor:
    """PCA: first principal component of the pooled, class-centred activations, per layer.

    Each class minus its own mean, pooled; the top right singular vector of that
    ``[n_refused + n_complied, d_model]`` matrix at each layer, read off the top eigenvector of
    the ``n × n`` Gram matrix (the same vector, far cheaper when ``n < d_model``). Unit norm,
    sign aligned with MD.

    Returns:
        ``[n_layers, d_model]`` float32.
    """
    x_r, x_c = refused.double(), complied.double()
    pooled = torch.cat([x_r - x_r.mean(0), x_c - x_c.mean(0)]).transpose(0, 1)  # [n_layers, n, d_model]
    _, eigenvectors = torch.linalg.eigh(pooled @ pooled.transpose(-1, -2))  # ascending eigenvalues
    top = (pooled.transpose(-1, -2) @ eigenvectors[..., -1:]).squeeze(-1)  # [n_layers, d_model]
    return _align_with_md(top / top.norm(dim=-1, keepdim=True), x_r, x_c).float()


def probe_direction(refused: Tensor, complied: Tensor, *, l2: float = 1.0, max_iter: int = 100) -> Tensor:
    """probe: L2-regularised logistic-regression weights per layer (refused = 1), sign aligned with MD.

    Minimises ``Σ_i log(1 + exp(−y_i (w·x_i + b))) + (l2 / 2) ‖w‖²`` (scikit-learn's
    ``C = 1 / l2``) on raw activations, so ``w`` lives in activation coordinates; the intercept
    ``b`` is not penalised. Features are centred on the pooled mean, which moves only ``b``.
    Because the penalty is L2, ``w`` lies in the span of the centred rows, so the fit runs on
    their ``min(n, d_model)`` SVD coordinates: exact, and cheap when ``n < d_model``. The solver
    is damped Newton (Cholesky steps, backtracking), batched over layers and deterministic.

    Returns:
        ``[n_layers, d_model]`` float32, the weights ``w`` (not normalised).
    """
    if l2 <= 0:
        raise TorsionError(f"probe needs l2 > 0 (got {l2}); the unregularised fit diverges on separable data")
    x_r, x_c = refused.double(), complied.double()
    x = torch.cat([x_r, x_c])
    centred = (x - x.mean(0)).transpose(0, 1)  # [n_layers, n, d_model]
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    features = u * s[:, None, :]  # [n_layers, n, k], k = min(n, d_model)
    design = torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)  # intercept column
    labels = torch.cat([torch.ones(len(x_r)), torch.zeros(len(x_c))]).double()
    penalty = torch.full((design.shape[-1],), float(l2), dtype=torch.float64)
    penalty[-1] = 0.0
    theta = _newton_logistic(design, labels, penalty, max_iter)  # [n_layers, k + 1]
    weights = torch.einsum("lk,lkd->ld", theta[:, :-1], vh)
    return _align_with_md(weights, x_r, x_c).float()


def _newton_logistic(design: Tensor, labels: Tensor, penalty: Tensor, max_iter: int) -> Tensor:
    """Minimise ``Σ softplus(a·θ) − y a·θ + ½ θᵀ diag(penalty) θ`` per layer; design ``[L, n, p]``."""

    def loss(theta: Tensor) -> Tensor:  # [L, p] -> [L]
        logits = torch.einsum("lnp,lp->ln", design, theta)
        return (torch.nn.functional.softplus(logits) - labels * logits).sum(-1) + 0.5 * (penalty * theta**2).sum(-1)

    theta = torch.zeros(design.shape[0], design.shape[-1], dtype=torch.float64)
    for _ in range(max_iter):
        probability = torch.sigmoid(torch.einsum("lnp,lp->ln", design, theta))
        gradient = torch.einsum("lnp,ln->lp", design, probability - labels) + penalty * theta
        curvature = probability * (1 - probability)
        hessian = torch.einsum("lnp,ln,lnq->lpq", design, curvature, design) + torch.diag(penalty)
        step = torch.cholesky_solve(gradient.unsqueeze(-1), torch.linalg.cholesky(hessian)).squeeze(-1)
        decrement = (gradient * step).sum(-1)  # Newton decrement squared, [L]
        if bool((decrement <= 1e-12).all()):
            return theta
        current, scale = loss(theta), torch.ones(len(theta), dtype=torch.float64)
        for _ in range(50):  # backtracking (Armijo), per layer
            failing = loss(theta - scale[:, None] * step) > current - 1e-4 * scale * decrement
            if not bool(failing.any()):
                break
            scale = torch.where(failing, scale / 2, scale)
        theta = theta - scale[:, None] * step
    raise TorsionError(f"the probe did not converge in {max_iter} Newton steps; raise max_iter or l2")


def _align_with_md(directions: Tensor, refused: Tensor, complied: Tensor) -> Tensor:
    """Flip each layer of ``[n_layers, d_model]`` whose dot product with MD is negative."""
    md = refused.mean(0) - complied.mean(0)
    sign = torch.where((directions * md).sum(-1) < 0, -1.0, 1.0).to(directions.dtype)
    return directions * sign[:, None]


def clip_outliers(x: Tensor, lo: float = 1.0, hi: float = 99.0) -> Tensor:
    """Clamp each dimension of each layer to its [lo, hi] percentiles over prompts.

    Args:
        x: one class, ``[n_prompts, n_layers, d_model]``.

    Returns:
        The clamped tensor, same shape and dtype. Percentiles interpolate linearly (numpy's default).
    """
    if not 0 <= lo < hi <= 100:
        raise TorsionError(f"clip percentiles must satisfy 0 <= lo < hi <= 100 (got lo={lo}, hi={hi})")
    bounds = np.percentile(x.detach().cpu().double().numpy(), [lo, hi], axis=0)  # [2, n_layers, d_model]
    low, high = (torch.from_numpy(b).to(device=x.device, dtype=x.dtype) for b in bounds)
    return torch.clamp(x, low, high)


Method = Callable[..., Tensor]
METHODS: dict[str, Method] = {
    "md": mean_difference,
    "rmd": rmd,
    "wrmd": wrmd,
    "pca": pca_direction,
    "probe": probe_direction,
}
CLIP_PERCENTILES = (1.0, 99.0)


def fit_vectors(activations: Tensor, scores: Sequence[float | None], *, method: str,
                categories: Sequence[str] | None = None, neutral: Tensor | None = None, lam: float = 1e-2,
                lam_mode: str = "relative", clip: bool = False, min_category: int = 3,
                **options: Any) -> dict[str, SteeringVector]:
    """Fit the global vector (key ``""``) and, given ``categories``, one vector per category.

    Rows are refused when their score is in {+0.5, +1} and complied when in {−0.5, −1};
    degenerate (+2) and judge errors (None) never enter a fit. A category's vector is its
    refused rows against a complied anchor: the category's own complied rows when there are at
    least ``min_category``, else all complied rows; ``meta["anchor"]`` says which. A category
    with no refused rows is skipped, not an error, and listed in the global vector's
    ``meta["skipped_categories"]``. ``neutral``, ``lam`` and ``lam_mode`` go to the methods that
    take them (rmd, wrmd); ``options`` are method-specific keywords (probe: ``l2``,
    ``max_iter``) and an unknown one is an error. With ``clip``, each class is clipped to its
    1st/99th percentiles (:func:`clip_outliers`) before every fit.

    Args:
        activations: ``[n_prompts, n_layers, d_model]``.
        scores: ``[n_prompts]`` judge scores, None for a judge error.
        categories: ``[n_prompts]`` category names, or None for the global vector only.

    Returns:
        key -> :class:`SteeringVector` with ``[n_layers, d_model]`` directions.
    """
    fit, kwargs = _method_call(method, neutral=neutral, lam=lam, lam_mode=lam_mode, options=options)
    if activations.ndim != 3:
        raise TorsionError(f"activations must be [n_prompts, n_layers, d_model], got shape {list(activations.shape)}")
    n = len(activations)
    if len(scores) != n or (categories is not None and len(categories) != n):
        raise TorsionError(f"{n} activation rows but {len(scores)} scores"
                           + ("" if categories is None else f" and {len(categories)} categories")
                           + "; pass one score and category per prompt")
    refused = [i for i, s in enumerate(scores) if is_refused(s)]
    complied = [i for i, s in enumerate(scores) if is_complied(s)]
    for rows, name, label, hint in ((refused, "refused", "refuse", "refuses"),
                                    (complied, "complied", "comply", "complies")):
        if not rows:
            raise TorsionError(f"no {name} samples (0 of {n} responses were labelled {label}); "
                               f"use more prompts or a model that {hint} sometimes")
    fits: dict[str, tuple[list[int], list[int], str]] = {"": (refused, complied, "global")}
    skipped: list[str] = []
    for category in sorted(set(categories or ())):
        if not category:
            raise TorsionError('a prompt has an empty category name ("" is the global key); name every category')
        own_refused = [i for i in refused if categories[i] == category]
        own_complied = [i for i in complied if categories[i] == category]
        if not own_refused:
            skipped.append(category)
        elif len(own_complied) >= min_category:
            fits[category] = (own_refused, own_complied, "category")
        else:
            fits[category] = (own_refused, complied, "global")

    params = {k: v for k, v in kwargs.items() if k != "neutral"}
    if "neutral" in kwargs:
        params["neutral"] = "complied" if neutral is None else f"{len(neutral)} prompts"
    takes_scores = "refused_scores" in inspect.signature(fit).parameters
    vectors = {}
    for key, (refused_rows, complied_rows, anchor) in fits.items():
        x_r, x_c = activations[refused_rows], activations[complied_rows]
        if clip:
            x_r, x_c = clip_outliers(x_r, *CLIP_PERCENTILES), clip_outliers(x_c, *CLIP_PERCENTILES)
        scores_kwargs = {"refused_scores": [scores[i] for i in refused_rows],
                         "complied_scores": [scores[i] for i in complied_rows]} if takes_scores else {}
        meta = {"method": method, "params": params, "category": key or None, "anchor": anchor,
                "n_refused": len(refused_rows), "n_complied": len(complied_rows),
                "clip_percentiles": list(CLIP_PERCENTILES) if clip else None,
                "layer_indexing": LAYER_INDEXING, "torsion_version": torsion.__version__}
        if not key and categories is not None:
            meta["skipped_categories"] = skipped
        vectors[key] = SteeringVector(fit(x_r, x_c, **scores_kwargs, **kwargs), meta)
    return vectors


def _method_call(method: str, *, neutral: Tensor | None, lam: float, lam_mode: str,
                 options: dict[str, Any]) -> tuple[Method, dict[str, Any]]:
    """The method function and the keywords it takes; unknown keywords fail loudly."""
    if method not in METHODS:
        raise TorsionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fit = METHODS[method]
    keyword_only = [p.name for p in inspect.signature(fit).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(keyword_only))
    if unknown:
        raise TorsionError(f"method {method!r} takes no option(s) {', '.join(unknown)}; "
                           f"its options: {', '.join(keyword_only) or 'none'}")
    if neutral is not None and "neutral" not in keyword_only:
        raise TorsionError(f"method {method!r} does not use a neutral set; drop neutral= or use rmd or wrmd")
    shared = {"neutral": neutral, "lam": lam, "lam_mode": lam_mode}
    kwargs = {k: v for k, v in shared.items() if k in keyword_only}
    return fit, {**kwargs, **options}
