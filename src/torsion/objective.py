"""The strength search's objective (methods.md, "Layer selection and strength"): the behaviour term,
the KL term and the capability penalty that one trial of :mod:`torsion.optimize` minimises.

Example::

    strength_objective("comply", rows, kl=0.3, kl_weight=2.0, kl_cap=1.0)   # mean score + 2 * min(0.3, 1)
"""

from __future__ import annotations

import math
from typing import Sequence

from torsion.errors import TorsionError
from torsion.judge.correction import Corrected

DEGENERATE_PENALTY = 2.0  # methods.md: a degenerate response adds +2 to what either objective minimises


def objective_score(objective: str, rows: Sequence[Corrected]) -> float | None:
    """The behaviour term of an objective: the mean over judged rows of each row's minimised score.

    comply: the corrected score (degenerate +2); refuse: minus the corrected score, except that a
    degenerate row counts −2 as its score, i.e. +2 minimised (methods.md). None if nothing was judged.
    """
    sign = {"comply": 1.0, "refuse": -1.0}[objective]
    terms = [DEGENERATE_PENALTY if r.degenerate else sign * r.score for r in rows if r.judged]
    return sum(terms) / len(terms) if terms else None


def strength_objective(objective: str, rows: Sequence[Corrected], kl: float, *, kl_weight: float, kl_cap: float,
                       penalty: float = 0.0) -> float:
    """methods.md: comply ``mean_score + w·min(KL, cap)``, refuse ``−mean_score + w·min(KL, cap)``,
    degenerate responses penalised in both (:func:`objective_score`), plus a capability penalty."""
    score = objective_score(objective, rows)
    if score is None:
        raise TorsionError("every response of the trial was a judge error; check the judge")
    return score + kl_weight * min(kl, kl_cap) + penalty


def capability_penalty(base: dict[str, float], steered: dict[str, float], *, mcq_weight: float,
                       perplexity_weight: float) -> float:
    """``w_mcq · max(0, acc_base − acc) + w_ppl · max(0, log(ppl / ppl_base))``; 0 for a metric not measured."""
    penalty = 0.0
    if mcq_weight and "mcq_accuracy" in steered:
        penalty += mcq_weight * max(0.0, base["mcq_accuracy"] - steered["mcq_accuracy"])
    if perplexity_weight and "perplexity" in steered:
        penalty += perplexity_weight * max(0.0, math.log(steered["perplexity"] / base["perplexity"]))
    return penalty
