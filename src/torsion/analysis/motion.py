"""Orthogonal motion: how much of the model's response to a push is perpendicular to it (methods.md,
"Orthogonal motion").

``u(α) = mean steered − mean unsteered`` over the same prompts, at a readout block;
``orthogonal_fraction(u, v̂) = ‖u − (u·v̂)v̂‖ / ‖u‖`` against the steered block's axis ``v̂_s``
(what was pushed) and the readout block's own axis ``v̂_r`` (where the model is). The prompt
bootstrap resamples prompts (the pair of states of a prompt stays together): a resample's
``u`` is a counts row times the per-prompt differences, ``B`` rows at once.

Example::

    stats = motion_stats(steered, unsteered, axis_steered, axis_readout, B=1000, seed=0)
    stats["orthogonal_fraction_steered_axis"]["estimate"], stats["orthogonal_fraction_steered_axis"]["ci95_basic"]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torsion.analysis.rotation import _resample_counts
from torsion.errors import TorsionError
from torsion.geometry import angle_deg
from torsion.stats import basic_interval, percentile_interval


def unit(v: Tensor) -> Tensor:
    """``v / ‖v‖`` along the last axis, float64 (a zero vector stays zero)."""
    v = v.double()
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)


def orthogonal_fraction(u: Tensor, axis: Tensor) -> Tensor:
    """``‖u − (u·v̂)v̂‖ / ‖u‖``, ``v̂ = axis / ‖axis‖``: ``[..., d]`` → ``[...]`` float64 (0 for ``u = 0``).

    1 when ``u`` is perpendicular to the axis, 0 when parallel (either sign).
    """
    u, direction = u.double(), unit(axis)
    along = (u * direction).sum(-1, keepdim=True) * direction
    return torch.linalg.vector_norm(u - along, dim=-1) / torch.linalg.vector_norm(u, dim=-1).clamp_min(1e-300)


def _statistics(u: Tensor, axis_steered: Tensor, axis_readout: Tensor) -> dict[str, Tensor]:
    """``‖u‖``, ``u·v̂`` and the orthogonal fraction against both axes, for ``u`` ``[..., d]``."""
    return {
        "u_norm": torch.linalg.vector_norm(u.double(), dim=-1),
        "u_dot_steered_axis": (u.double() * unit(axis_steered)).sum(-1),
        "u_dot_readout_axis": (u.double() * unit(axis_readout)).sum(-1),
        "orthogonal_fraction_steered_axis": orthogonal_fraction(u, axis_steered),
        "orthogonal_fraction_readout_axis": orthogonal_fraction(u, axis_readout),
    }


BOUNDS = {"u_norm": (0.0, None), "orthogonal_fraction_steered_axis": (0.0, 1.0),
          "orthogonal_fraction_readout_axis": (0.0, 1.0)}


def motion_stats(steered: Tensor, unsteered: Tensor, axis_steered: Tensor, axis_readout: Tensor, *,
                 B: int = 1000, seed: int) -> dict[str, Any]:
    """``u`` and its statistics at one readout block, with prompt-bootstrap basic intervals.

    Each statistic is ``{"estimate", "ci95_basic", "ci95_percentile"}``; the basic interval is
    clipped to the statistic's range (``‖u‖ ≥ 0``, fractions in ``[0, 1]``). Draws:
    ``torch.randint`` ``[B, n_prompts]`` from ``torch.Generator().manual_seed(seed)``.

    Args:
        steered: ``[n_prompts, d_model]`` steered states (row ``i`` is prompt ``i``).
        unsteered: ``[n_prompts, d_model]`` unsteered states of the same prompts.
        axis_steered: ``[d_model]`` the steered block's axis.
        axis_readout: ``[d_model]`` the readout block's axis.

    Returns:
        A JSON-ready dict, and ``u`` under the key ``"u"`` as a ``[d_model]`` tensor.
    """
    if steered.shape != unsteered.shape or steered.ndim != 2 or len(steered) < 2:
        raise TorsionError(f"motion needs paired [n_prompts >= 2, d_model] states (got {list(steered.shape)} steered "
                           f"and {list(unsteered.shape)} unsteered); steer and read the same prompts")
    differences = steered.double() - unsteered.double()  # [n, d]
    u = differences.mean(0)
    counts = _resample_counts(torch.arange(len(differences)), len(differences), B,
                              torch.Generator().manual_seed(seed))  # [B, n]
    resampled = counts.double() @ differences / len(differences)  # [B, d]
    observed, boot = _statistics(u, axis_steered, axis_readout), _statistics(resampled, axis_steered, axis_readout)
    result: dict[str, Any] = {"n_prompts": len(differences), "B": B}
    for name, value in observed.items():
        lower, upper = BOUNDS.get(name, (None, None))
        replicates = boot[name].numpy()
        result[name] = {"estimate": float(value),
                        "ci95_basic": basic_interval(float(value), replicates, lower=lower, upper=upper).tolist(),
                        "ci95_percentile": percentile_interval(replicates).tolist()}
    result["u"] = u.float()
    return result


def compliance_destination(complied_steered: Tensor, unsteered: Tensor, axis_readout: Tensor) -> float:
    """``angle(b − base, v̂_r)`` in degrees: ``b`` the centroid of complied steered states ``[n_c, d]``,
    ``base`` the unsteered centroid ``[n, d]``. 180° would be "compliance is negative refusal"."""
    if len(complied_steered) == 0 or len(unsteered) == 0:
        raise TorsionError("the compliance destination needs complied steered states and unsteered states; "
                           "use a strength that produces compliance")
    shift = complied_steered.double().mean(0) - unsteered.double().mean(0)
    return float(angle_deg(shift, axis_readout.double()))
