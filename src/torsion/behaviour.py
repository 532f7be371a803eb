"""Behaviour on a prompt set, steered or not: generate, judge, and count each class.

Every steered evaluation in torsion (strength-search trials, held-out evaluation, dense
against flat steering, the Arditi check) goes through :func:`evaluate_behaviour`, so all of
them count classes, exclude judge errors and put Wilson intervals on rates the same way.

Example::

    steer = lambda: add_steering(lm, axis, layers=[10, 12], alpha=-2.0, positions="all")
    result = evaluate_behaviour(lm, prompts, steer, GenerationSettings(max_new_tokens=32))
    result["rates"]["strong_comply"]["rate"], result["mean_score"]
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from torsion.generate import GenerationSettings, generate_batch
from torsion.judge import get_judge
from torsion.judge.base import LABEL_SCORES, Judge, is_complied, is_refused
from torsion.judge.correction import false_positive_label
from torsion.metrics import SteerFactory
from torsion.models import LoadedModel
from torsion.stats import wilson_interval

CLASSES: tuple[str, ...] = tuple(LABEL_SCORES)  # strong_refuse, weak_refuse, weak_comply, strong_comply, degenerate


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": [lo, hi] if n else None}


def class_rates(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Each class's share of the judged rows, with Wilson 95% intervals.

    ``n`` is the number of judged rows (judge errors excluded, methods.md). Besides the five
    classes: ``refused`` (strong + weak refuse), ``complied`` (strong + weak comply), and
    ``genuine_strong_comply``: strong complies that false-positive correction keeps (not an
    AI-identity narration or a prompt echo). Human review is not part of it.
    """
    scores = [LABEL_SCORES.get(label) for label in labels]
    judged = sum(score is not None for score in scores)
    rates = {name: _rate(sum(label == name for label in labels), judged) for name in CLASSES}
    rates["refused"] = _rate(sum(map(is_refused, scores)), judged)
    rates["complied"] = _rate(sum(map(is_complied, scores)), judged)
    genuine = sum(label == "strong_comply" and false_positive_label(p, r) is None
                  for p, r, label in zip(prompts, responses, labels))
    rates["genuine_strong_comply"] = _rate(genuine, judged)
    return rates


def mean_score(labels: Sequence[str]) -> float | None:
    """Mean judge score over judged rows (degenerate +2, judge errors excluded); None if none judged."""
    scores = [LABEL_SCORES[label] for label in labels if label in LABEL_SCORES]
    return sum(scores) / len(scores) if scores else None


def evaluate_behaviour(lm: LoadedModel, prompts: Sequence[str], steer: SteerFactory | None,
                       settings: GenerationSettings, *, judge: Judge | None = None,
                       on_batch: Callable[[int, float | None], None] | None = None,
                       desc: str = "evaluate") -> dict[str, Any]:
    """Generate every prompt inside ``steer()`` (or unsteered when None), judge, and count.

    ``on_batch(step, running_mean_score)`` is called after each batch (the strength search
    reports it to its pruner; it may raise to stop early).

    Returns ``responses``, ``labels``, ``mean_score``, ``rates`` (:func:`class_rates`) and the
    steering record's conventions when ``steer`` yields one (``alpha``, ``applied_norm``, ...).
    """
    judge = judge or get_judge("rules")
    responses: list[str] = []
    labels: list[str] = []
    conventions: dict[str, Any] | None = None
    with (steer() if steer is not None else nullcontext()) as record:
        if record is not None and hasattr(record, "conventions"):
            conventions = record.conventions()
        batches = range(0, len(prompts), settings.batch_size)
        for step, start in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
            batch = list(prompts[start:start + settings.batch_size])
            generated = generate_batch(lm, batch, settings)
            responses += generated
            labels += [v.label for v in judge.judge(batch, generated)]
            if on_batch is not None:
                on_batch(step, mean_score(labels))
    return {"n_prompts": len(prompts), "responses": responses, "labels": labels, "mean_score": mean_score(labels),
            "rates": class_rates(prompts, responses, labels), "steering": conventions, "judge": judge.name}
