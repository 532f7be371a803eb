"""The causal hedge test (methods.md, "Hedge geometry"): steer along ``(h − a)/‖h − a‖`` at the
refusal steering's applied norm, against ``N`` norm-matched random directions.

Each arm generates the same prompts with one direction added at the readout block the
centroids came from, and is judged by the same judge as the unsteered arm, with the false-positive
correction (:func:`torsion.behaviour.correct_rows`). Per arm: each class's rate change against the
unsteered arm (plus ``refused`` and ``genuine_strong_comply``, :func:`torsion.behaviour.class_rates`),
and the consistency, the share of prompts whose corrected score moves the way most of them move
(``max(#up, #down) / n``; judge errors left out).

Example::

    result = causal_hedge_test(lm, prompts, base_rows, hedge_direction, judge=get_judge("rules"), block=18,
                               applied_norm=12.0, n_random=20, settings=GenerationSettings(max_new_tokens=24), seed=0)
    result["hedge_direction"]["rate_change"]["weak_comply"], result["random"]["rate_change"]["weak_comply"]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.random_control import random_directions
from torsion.behaviour import CLASSES, class_rates, correct_rows
from torsion.generate import GenerationSettings, generate_batch
from torsion.judge.base import Judge
from torsion.judge.correction import Corrected
from torsion.models import LoadedModel
from torsion.steer import add_steering

RATES: tuple[str, ...] = (*CLASSES, "refused", "genuine_strong_comply")


def rate_changes(base: Sequence[Corrected], rows: Sequence[Corrected]) -> dict[str, float]:
    """Each class's share among judged rows (:func:`torsion.behaviour.class_rates`), steered minus unsteered."""
    def shares(arm: Sequence[Corrected]) -> dict[str, float]:
        rates = class_rates([], [], [], rows=arm)
        return {c: float("nan") if rates[c]["rate"] is None else rates[c]["rate"] for c in RATES}

    before, after = shares(base), shares(rows)
    return {c: after[c] - before[c] for c in RATES}


def consistency(base: Sequence[Corrected], rows: Sequence[Corrected]) -> dict[str, Any]:
    """``max(#up, #down) / n`` of the corrected scores over prompts judged in both arms, with the
    counts and the main direction."""
    pairs = [(b.score, s.score) for b, s in zip(base, rows, strict=True) if b.judged and s.judged]
    up = sum(s > b for b, s in pairs)
    down = sum(s < b for b, s in pairs)
    return {"n": len(pairs), "up": up, "down": down, "same": len(pairs) - up - down,
            "share": max(up, down) / len(pairs) if pairs else None,
            "direction": "toward refusal" if up > down else "toward compliance" if down > up else "none"}


def _arm(lm: LoadedModel, prompts: Sequence[str], direction: Tensor, block: int, settings: GenerationSettings,
         positions: str, judge: Judge) -> list[Corrected]:
    """Corrected behaviour of ``prompts`` generated with ``direction`` ``[d_model]`` added at ``block``."""
    vectors = torch.zeros(lm.n_layers, lm.d_model, dtype=torch.float64)
    vectors[block] = direction.double()
    with add_steering(lm, vectors, layers=[block], alpha=1.0, positions=positions):
        responses = generate_batch(lm, list(prompts), settings)  # length buckets inside, prompt order out
    labels = [v.label for v in judge.judge(list(prompts), responses)]
    return correct_rows(prompts, responses, labels)


def causal_hedge_test(lm: LoadedModel, prompts: Sequence[str], base: Sequence[Corrected], hedge_direction: Tensor,
                      *, judge: Judge, block: int, applied_norm: float, n_random: int, settings: GenerationSettings,
                      positions: str = "all", seed: int) -> dict[str, Any]:
    """The hedge direction's arm and ``n_random`` random arms (:func:`random_directions`, ``seed``).

    Args:
        base: ``[n_prompts]`` the unsteered arm's corrected behaviour of ``prompts``.
        judge: the judge that labelled ``base``; it labels every steered arm too.
        hedge_direction: ``[d_model]`` ``h − a`` (normalised here, then scaled to ``applied_norm``).
    """
    unit = hedge_direction.double() / hedge_direction.double().norm().clamp_min(1e-300)
    hedge_rows = _arm(lm, prompts, applied_norm * unit, block, settings, positions, judge)
    random_arms = [_arm(lm, prompts, direction, block, settings, positions, judge)
                   for direction in random_directions(lm.d_model, n_random, applied_norm, seed=seed)]
    random_changes = [rate_changes(base, rows) for rows in random_arms]
    random_consistency = [consistency(base, rows)["share"] for rows in random_arms]
    summary: dict[str, Any] = {}
    for name in RATES:
        values = np.array([change[name] for change in random_changes])
        summary[name] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    shares = np.array([s for s in random_consistency if s is not None], dtype=float)
    return {
        "block": block, "applied_norm": applied_norm, "positions": positions, "n_prompts": len(prompts),
        "judge": judge.name,
        "hedge_direction": {"rate_change": rate_changes(base, hedge_rows),
                            "consistency": consistency(base, hedge_rows), "labels": [r.label for r in hedge_rows],
                            "corrections": [r.correction for r in hedge_rows]},
        "random": {"n": n_random, "seed": seed, "rate_change": summary,
                   "consistency_share": {"mean": float(shares.mean()), "max": float(shares.max())}
                   if len(shares) else None},
    }
