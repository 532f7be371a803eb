"""Endpoint coherence (methods.md, "Manifold (spline) steering"): how far past the outer knots ``t`` may go.

Sweep ``t`` (e.g. −0.5 … 1.5); at each, the first-token KL (:func:`torsion.metrics.first_token_kl`),
the perplexity ratio (steered / unsteered, :func:`torsion.metrics.perplexity`) and the
degenerate share of steered generations (:func:`torsion.behaviour.evaluate_behaviour`, the
judge's ``degenerate`` class). A ``t`` is coherent when degenerate ≤ 10% and the perplexity
ratio ≤ 1.5. The last coherent ``t`` on a side is the farthest ``t`` reached from the outer
knot by coherent steps only. Steered values are clamped there unless the user overrides it.

Example::

    sweep = coherence_sweep(lm, method, ts, kl_prompts=probe, texts=texts, prompts=harmful, settings=settings)
    last_coherent_t(sweep["rows"], knots_range=(0.0, 1.0))     # {"low": -0.25, "high": 1.25}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torsion.behaviour import evaluate_behaviour
from torsion.generate import GenerationSettings
from torsion.judge.base import Judge
from torsion.metrics import first_token_kl, perplexity
from torsion.models import LoadedModel

MAX_DEGENERATE = 0.10
MAX_PERPLEXITY_RATIO = 1.5


def is_coherent(row: dict[str, Any], *, max_degenerate: float = MAX_DEGENERATE,
                max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO) -> bool:
    """Degenerate share ≤ ``max_degenerate`` and perplexity ratio ≤ ``max_perplexity_ratio``."""
    return row["degenerate_share"] <= max_degenerate and row["perplexity_ratio"] <= max_perplexity_ratio


def last_coherent_t(rows: Sequence[dict[str, Any]], knots_range: tuple[float, float], **limits: float) -> dict[str, Any]:
    """Per side, the farthest ``t`` reached from the outer knot through coherent sweep points only.

    ``rows`` have ``t``, ``degenerate_share`` and ``perplexity_ratio``. A side whose first
    point past the knot is incoherent stays at the knot. Returns ``low``, ``high`` and the limits.
    """
    low, high = knots_range
    coherent = {row["t"]: is_coherent(row, **limits) for row in rows}
    result = {"low": low, "high": high}
    for t in sorted((t for t in coherent if t > high)):
        if not coherent[t]:
            break
        result["high"] = t
    for t in sorted((t for t in coherent if t < low), reverse=True):
        if not coherent[t]:
            break
        result["low"] = t
    result.update(max_degenerate=limits.get("max_degenerate", MAX_DEGENERATE),
                  max_perplexity_ratio=limits.get("max_perplexity_ratio", MAX_PERPLEXITY_RATIO))
    return result


def coherence_sweep(lm: LoadedModel, method: Any, ts: Sequence[float], *, kl_prompts: Sequence[str],
                    texts: Sequence[str], prompts: Sequence[str], settings: GenerationSettings,
                    judge: Judge) -> dict[str, Any]:
    """Measure every ``t`` in ``ts`` with a spline ``method`` (extrapolation allowed during the sweep).

    KL and perplexity steer every position (the metrics need it); generation steers as
    ``method.positions`` says. Returns ``rows`` (one per ``t``) and the unsteered perplexity.
    """
    open_method = dataclasses.replace(method, allow_extrapolation=True)
    every_position = dataclasses.replace(open_method, positions="all")
    base_perplexity = perplexity(lm, texts)["perplexity"]
    rows = []
    for t in ts:
        kl = first_token_kl(lm, kl_prompts, every_position.factory(lm, t))
        steered = perplexity(lm, texts, every_position.factory(lm, t))["perplexity"]
        behaviour = evaluate_behaviour(lm, prompts, open_method.factory(lm, t), settings, judge=judge,
                                       desc=f"coherence t={t:g}")
        rows.append({"t": float(t), "kl_base_to_steered": kl["kl_base_to_steered"],
                     "kl_steered_to_base": kl["kl_steered_to_base"], "perplexity": steered,
                     "perplexity_ratio": steered / base_perplexity,
                     "degenerate_share": behaviour["rates"]["degenerate"]["rate"] or 0.0,
                     "n_prompts": len(prompts)})
    return {"rows": rows, "base_perplexity": base_perplexity, "kl": "first token, kl_base_to_steered and reverse",
            "method": method.name}
