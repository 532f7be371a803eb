"""Angles between directions (methods.md, "Notation and conventions").

Angles come from the **signed** cosine: ``θ = degrees(arccos(clip(cos, -1, 1)))``. Everything
is computed and returned in float64.

Example::

    angle_deg(v[3], v[4])               # scalar: angle(v_3, v_4)
    adjacent_angles(vectors)            # [n_layers - 1]: angle(v_l, v_{l+1})
    random_angle_reference(896)         # (90.0, 1.914...): two unrelated directions
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torsion.errors import TorsionError


def cosine(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Signed cosine along ``dim`` in float64, broadcasting like ``a * b``; a zero vector gives 0."""
    a, b = a.double(), b.double()
    denominator = (torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)).clamp_min(1e-300)
    return (a * b).sum(dim) / denominator


def angle_from_cosine(cos: Tensor) -> Tensor:
    """``degrees(arccos(clip(cos, -1, 1)))``, elementwise, in float64."""
    return torch.rad2deg(torch.arccos(cos.double().clamp(-1.0, 1.0)))


def angle_deg(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Angle in degrees from the signed cosine along ``dim``, float64, broadcasting like ``a * b``."""
    return angle_from_cosine(cosine(a, b, dim))


def adjacent_angles(vectors: Tensor) -> Tensor:
    """``θ_l = angle(v_l, v_{l+1})``: ``[..., n_layers, d_model]`` → ``[..., n_layers - 1]``.

    The same numbers as ``angle_deg(vectors[..., :-1, :], vectors[..., 1:, :])``, with each
    layer's norm computed once: batches of bootstrap vectors spend their time here.
    """
    v = vectors.double()
    norms = torch.linalg.vector_norm(v, dim=-1)  # [..., n_layers]
    dots = (v[..., :-1, :] * v[..., 1:, :]).sum(-1)  # [..., n_layers - 1]
    return angle_from_cosine(dots / (norms[..., :-1] * norms[..., 1:]).clamp_min(1e-300))


def random_angle_reference(d: int) -> tuple[float, float]:
    """Mean and sd (degrees) of the angle between two independent random directions in ``d`` dims.

    Their cosine has mean 0 and variance ``1/d``, and near 90° the angle is ``90° − degrees(cos)``,
    so it sits at ``90° ± degrees(1/√d) = 90° ± (57.2958/√d)°``.
    """
    if d < 1:
        raise TorsionError(f"random_angle_reference needs d >= 1 dimensions (got {d}); pass d_model")
    return 90.0, math.degrees(1.0 / math.sqrt(d))
