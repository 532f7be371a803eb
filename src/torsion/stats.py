"""Small statistics shared by reports and evaluations.

Example::

    wilson_interval(5, 10)   # (0.2366, 0.7634)
    basic_interval(30.0, np.array([28.0, 68.0]), lower=0.0, upper=180.0)   # [0.0, 31.0]
"""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial rate ``k / n``; ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile_interval(replicates: np.ndarray) -> np.ndarray:
    """The percentile bootstrap 95% interval ``[q2.5, q97.5]`` of ``replicates`` ``[B, ...]``: ``[..., 2]``."""
    return np.moveaxis(np.percentile(np.asarray(replicates, dtype=np.float64), [2.5, 97.5], axis=0), 0, -1)


def basic_interval(estimate: np.ndarray | float, replicates: np.ndarray, *, lower: float | None = None,
                   upper: float | None = None) -> np.ndarray:
    """The basic bootstrap 95% interval ``[2θ̂ − q97.5, 2θ̂ − q2.5]`` (methods.md), clipped to ``[lower, upper]``.

    Args:
        estimate: ``[...]`` the full-data statistic θ̂.
        replicates: ``[B, ...]`` the bootstrap statistics.
        lower, upper: the statistic's range (an angle: 0 and 180); None leaves that side open.

    Returns:
        ``[..., 2]``, lower bound first.
    """
    q = percentile_interval(replicates)
    interval = 2 * np.asarray(estimate, dtype=np.float64)[..., None] - q[..., ::-1]
    return np.clip(interval, lower, upper) if lower is not None or upper is not None else interval
