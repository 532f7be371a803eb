"""Steering vectors per layer: MD, RMD, WRMD, PCA, probe (methods.md, "Steering vectors")."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_difference(refused: Tensor, complied: Tensor) -> Tensor:
    """MD: ``v_l = mean(X_r) - mean(X_c)``.

    Args:
        refused: ``[n_refused, n_layers, d_model]``.
        complied: ``[n_complied, n_layers, d_model]``.

    Returns:
        ``[n_layers, d_model]`` in float32 (means are accumulated in float64).
    """
    return (refused.double().mean(0) - complied.double().mean(0)).float()
