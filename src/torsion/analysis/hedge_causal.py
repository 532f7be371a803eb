"""The causal hedge test (methods.md, "Hedge geometry"): steer along ``(h − a)/‖h − a‖`` at the
refusal steering's applied norm, against ``N`` norm-matched random directions.

Each arm generates the same prompts with one direction added at the readout block the
centroids came from, and is judged. Per arm: each class's rate change against the unsteered
arm, and the consistency, the share of prompts whose score moves the way most of them move
(``max(#up, #down) / n``, scores as in methods.md's label table; judge errors left out).

Example::

    result = causal_hedge_test(lm, prompts, base_labels, hedge_direction, block=18, applied_norm=12.0,
                               n_random=20, settings=GenerationSettings(max_new_tokens=24), seed=0)
    result["hedge_direction"]["rate_change"]["weak_comply"], result["random"]["rate_change"]["weak_comply"]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.analysis.random_control import random_directions
from torsion.behaviour import CLASSES
from torsion.generate import GenerationSettings, generate_batch
from torsion.judge import get_judge
from torsion.judge.base import LABEL_SCORES
from torsion.models import LoadedModel
from torsion.steer import add_steering


def rate_changes(base_labels: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Each class's share among judged rows, steered minus unsteered."""
    def shares(rows: Sequence[str]) -> dict[str, float]:
        judged = [r for r in rows if r in LABEL_SCORES]
        return {c: sum(r == c for r in judged) / len(judged) if judged else float("nan") for c in CLASSES}

    before, after = shares(base_labels), shares(labels)
    return {c: after[c] - before[c] for c in CLASSES}


def consistency(base_labels: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """``max(#up, #down) / n`` over prompts judged in both arms, with the counts and the main direction."""
    pairs = [(LABEL_SCORES[b], LABEL_SCORES[s]) for b, s in zip(base_labels, labels)
             if b in LABEL_SCORES and s in LABEL_SCORES]
    up = sum(s > b for b, s in pairs)
    down = sum(s < b for b, s in pairs)
    return {"n": len(pairs), "up": up, "down": down, "same": len(pairs) - up - down,
            "share": max(up, down) / len(pairs) if pairs else None,
            "direction": "toward refusal" if up > down else "toward compliance" if down > up else "none"}


def _arm(lm: LoadedModel, prompts: Sequence[str], direction: Tensor, block: int, settings: GenerationSettings,
         positions: str) -> list[str]:
    """Labels of ``prompts`` generated with ``direction`` ``[d_model]`` added at ``block``."""
    vectors = torch.zeros(lm.n_layers, lm.d_model, dtype=torch.float64)
    vectors[block] = direction.double()
    judge = get_judge("rules")
    with add_steering(lm, vectors, layers=[block], alpha=1.0, positions=positions):
        responses = generate_batch(lm, list(prompts), settings)  # length buckets inside, prompt order out
    return [v.label for v in judge.judge(list(prompts), responses)]


def causal_hedge_test(lm: LoadedModel, prompts: Sequence[str], base_labels: Sequence[str], hedge_direction: Tensor,
                      *, block: int, applied_norm: float, n_random: int, settings: GenerationSettings,
                      positions: str = "all", seed: int) -> dict[str, Any]:
    """The hedge direction's arm and ``n_random`` random arms (:func:`random_directions`, ``seed``).

    Args:
        base_labels: ``[n_prompts]`` the unsteered arm's labels of ``prompts``.
        hedge_direction: ``[d_model]`` ``h − a`` (normalised here, then scaled to ``applied_norm``).
    """
    unit = hedge_direction.double() / hedge_direction.double().norm().clamp_min(1e-300)
    hedge_labels = _arm(lm, prompts, applied_norm * unit, block, settings, positions)
    random_arms = [_arm(lm, prompts, direction, block, settings, positions)
                   for direction in random_directions(lm.d_model, n_random, applied_norm, seed=seed)]
    random_changes = [rate_changes(base_labels, labels) for labels in random_arms]
    random_consistency = [consistency(base_labels, labels)["share"] for labels in random_arms]
    summary: dict[str, Any] = {}
    for name in CLASSES:
        values = np.array([change[name] for change in random_changes])
        summary[name] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    shares = np.array([s for s in random_consistency if s is not None], dtype=float)
    return {
        "block": block, "applied_norm": applied_norm, "positions": positions, "n_prompts": len(prompts),
        "hedge_direction": {"rate_change": rate_changes(base_labels, hedge_labels),
                            "consistency": consistency(base_labels, hedge_labels), "labels": hedge_labels},
        "random": {"n": n_random, "seed": seed, "rate_change": summary,
                   "consistency_share": {"mean": float(shares.mean()), "max": float(shares.max())}
                   if len(shares) else None},
    }
