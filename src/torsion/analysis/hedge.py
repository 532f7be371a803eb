"""Hedge geometry: where the hedge sits on the refuse → comply segment (methods.md, "Hedge geometry").

Centroids of steered decoding-time states at one readout block, grouped by the judge's label of
the same response: ``a`` (refused), ``b`` (strong comply), ``h`` (hedge = weak comply).
``t = ((h−a)·(b−a)) / ‖b−a‖²`` places the hedge along the segment (0 refuse, 1 comply) and
``bow = ‖(h−a) − t(b−a)‖ / ‖b−a‖`` measures how far it leaves the line.

Resamples are counts matrices times the states: a group's ``B`` resampled centroids are one
product.

Example::

    result = hedge_geometry_test(states, groups, B=1000, P=1000, seed=0)
    result["bow"]["estimate"], result["bow_null"]["p_value"]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.rotation import _resample_counts
from torsion.geometry import angle_deg
from torsion.stats import basic_interval, percentile_interval

MIN_GROUP = 5  # m: a group smaller than this gets counts and no geometry
GROUPS = ("refused", "strong_comply", "hedge")  # a, b, h


def position_and_bow(a: Tensor, b: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` and ``bow`` of hedge centroids ``h`` against the segment ``a → b``; ``[..., d]`` → ``[...]`` each."""
    a, b, h = a.double(), b.double(), h.double()
    segment, offset = b - a, h - a
    length_sq = (segment**2).sum(-1).clamp_min(1e-300)
    t = (offset * segment).sum(-1) / length_sq
    bow = torch.linalg.vector_norm(offset - t[..., None] * segment, dim=-1) / length_sq.sqrt()
    return t, bow


def _group_rows(groups: Sequence[str]) -> dict[str, Tensor]:
    return {g: torch.tensor([i for i, name in enumerate(groups) if name == g], dtype=torch.long) for g in GROUPS}


def prompts_needed(counts: dict[str, int], n_prompts: int, m: int) -> int:
    """Prompts at which the rarest group would reach ``m`` at the observed rates.

    A group seen ``c > 0`` times in ``n`` prompts needs ``⌈m n / c⌉``; an unseen one is given
    the rule-of-three upper rate ``3 / n`` (so ``⌈m n / 3⌉``): a lower bound.
    """
    return max(math.ceil(m * n_prompts / (c if c > 0 else 3)) for c in counts.values())


def hedge_geometry_test(states: Tensor, groups: Sequence[str], *, B: int = 1000, P: int = 1000, m: int = MIN_GROUP,
                        seed: int) -> dict[str, Any]:
    """``t`` and ``bow`` with bootstrap basic intervals, centroid wobble and the on-line null for ``bow``.

    - Bootstrap: each group resampled with replacement at its size, ``B`` times (draws
      ``torch.randint`` from ``torch.Generator().manual_seed(seed)``, groups in ``GROUPS`` order).
    - Wobble: mean angle of a group's resampled centroids to its full centroid, both about the
      mean of all grouped states.
    - Null for ``bow`` (``P`` draws, ``Generator().manual_seed(seed + 1)``): the ``a → b`` line is
      fixed from the full data; ``a`` and ``b`` are resampled; the pseudo-hedge is ``n_h`` rows
      resampled from ``a ∪ b``, each minus its own group's centroid, placed on the line at the
      observed ``t`` (so it has the rows' scatter but a centroid on the line in expectation).
      ``p = (1 + #{null bow ≥ observed}) / (P + 1)``, one-sided.

    Args:
        states: ``[n_prompts, d_model]`` steered decoding-time states at one readout block.
        groups: ``[n_prompts]`` ``refused``, ``strong_comply``, ``hedge``, or anything else (ignored).

    Returns:
        A JSON-ready dict. With a group below ``m``: its counts, ``geometry: None`` and
        ``prompts_needed`` (:func:`prompts_needed`).
    """
    rows = _group_rows(groups)
    counts = {g: len(r) for g, r in rows.items()}
    result: dict[str, Any] = {"counts": counts, "m": m}
    if min(counts.values()) < m:
        short = [g for g, c in counts.items() if c < m]
        needed = prompts_needed(counts, len(groups), m)
        estimate = (f"at least {needed} prompts (a group was never seen: rule-of-three upper rate)"
                    if 0 in counts.values() else f"about {needed} prompts at these rates")
        result.update(geometry=None, prompts_needed=needed,
                      note=f"group(s) {', '.join(short)} below m = {m}: no geometry; {estimate} would reach m")
        return result
    x = states.double()
    origin = x[torch.cat(list(rows.values()))].mean(0)
    centroids = {g: x[r].mean(0) for g, r in rows.items()}
    a, b, h = (centroids[g] for g in GROUPS)
    t, bow = position_and_bow(a, b, h)
    generator = torch.Generator().manual_seed(seed)
    boot = {g: (_resample_counts(r, len(x), B, generator).double() @ x) / len(r) for g, r in rows.items()}  # [B, d]
    t_boot, bow_boot = position_and_bow(*(boot[g] for g in GROUPS))
    wobble = {g: float(angle_deg(boot[g] - origin, centroids[g] - origin).mean()) for g in GROUPS}
    null_bows = _null_bows(x, rows, centroids, float(t), P=P, seed=seed + 1)
    result.update(
        geometry="ok", B=B,
        t={"estimate": float(t), "ci95_basic": basic_interval(float(t), t_boot.numpy()).tolist(),
           "ci95_percentile": percentile_interval(t_boot.numpy()).tolist()},
        bow={"estimate": float(bow), "ci95_basic": basic_interval(float(bow), bow_boot.numpy(), lower=0.0).tolist(),
             "ci95_percentile": percentile_interval(bow_boot.numpy()).tolist()},
        segment_length=float(torch.linalg.vector_norm(b - a)),
        centroid_wobble_deg=wobble,
        bow_null={"P": P, "mean": float(null_bows.mean()), "p95": float(np.percentile(null_bows, 95)),
                  "p_value": float((1 + (null_bows >= float(bow)).sum()) / (P + 1)), "alternative": "greater"},
    )
    return result


def _null_bows(x: Tensor, rows: dict[str, Tensor], centroids: dict[str, Tensor], t: float, *, P: int,
               seed: int) -> np.ndarray:
    """``[P]`` bows of on-line pseudo-hedges against resampled ``a``, ``b`` (see :func:`hedge_geometry_test`)."""
    generator = torch.Generator().manual_seed(seed)
    a_rows, b_rows, n_h = rows["refused"], rows["strong_comply"], len(rows["hedge"])
    a, b = centroids["refused"], centroids["strong_comply"]
    a_boot = _resample_counts(a_rows, len(x), P, generator).double() @ x / len(a_rows)  # [P, d]
    b_boot = _resample_counts(b_rows, len(x), P, generator).double() @ x / len(b_rows)
    residuals = x.clone()
    residuals[a_rows] -= a
    residuals[b_rows] -= b
    pool = torch.cat([a_rows, b_rows])
    picks = pool[torch.randint(0, len(pool), (P, n_h), generator=generator)]
    ones = torch.ones(P, n_h, dtype=torch.float64)
    pick_counts = torch.zeros(P, len(x), dtype=torch.float64).scatter_add_(1, picks, ones)  # [P, n_prompts]
    pseudo_hedge = a + t * (b - a) + pick_counts @ residuals / n_h  # [P, d]
    return position_and_bow(a_boot, b_boot, pseudo_hedge)[1].numpy()
