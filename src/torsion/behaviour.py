"""Behaviour on a prompt set, steered or not: generate, judge, and count each class.

Every steered evaluation in torsion (strength-search trials, held-out evaluation, dense
against flat steering, the Arditi check) goes through :func:`evaluate_behaviour`, so all of
them count classes, apply the false-positive correction, exclude judge errors and put Wilson
intervals on rates the same way.

Example::

    steer = get_method("flat", vectors=axis, layers=[10, 12], positions="all").factory(lm, -2.0)
    result = evaluate_behaviour(lm, prompts, steer, GenerationSettings(max_new_tokens=32), judge=run_judge(run))
    result["rates"]["strong_comply"]["rate"], result["mean_score"]
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from torsion.generate import GenerationSettings, iter_generate
from torsion.judge.base import LABEL_SCORES, Judge
from torsion.judge.correction import FP_ECHO, FP_REFUSE, Corrected, corrected, genuine_rate, refusal_rate, \
    row_correction, share
from torsion.metrics import SteerFactory
from torsion.models import LoadedModel

CLASSES: tuple[str, ...] = tuple(LABEL_SCORES)  # strong_refuse, weak_refuse, weak_comply, strong_comply, degenerate


def correct_rows(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str]) -> list[Corrected]:
    """Each generated row's behaviour after false-positive correction (no review: steered rows are not reviewed)."""
    return [corrected(label, row_correction(p, r, LABEL_SCORES.get(label)))
            for p, r, label in zip(prompts, responses, labels, strict=True)]


def class_rates(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str], *,
                rows: Sequence[Corrected] | None = None) -> dict[str, Any]:
    """Each class's share of the judged rows, with Wilson 95% intervals.

    ``n`` is the number of judged rows (judge errors excluded, methods.md). Besides the five judge
    classes: ``fp_refuse`` and ``fp_echo`` (complies the false-positive correction changed),
    ``refused`` (:func:`~torsion.judge.correction.refusal_rate`: strong + weak refuse + fp_refuse),
    ``complied`` (strong + weak comply, fp_refuse excluded), and ``genuine_strong_comply``
    (:attr:`~torsion.judge.correction.Corrected.genuine`). ``rows`` (default: corrected here, no
    review) lets a caller pass the rows' behaviour with review decisions applied.
    """
    rows = correct_rows(prompts, responses, labels) if rows is None else rows
    judged = sum(r.judged for r in rows)
    rates = {name: share(sum(r.label == name for r in rows), judged) for name in CLASSES}
    for name in (FP_REFUSE, FP_ECHO):
        rates[name] = share(sum(r.correction == name for r in rows), judged)
    rates["refused"] = refusal_rate(rows)
    rates["complied"] = share(sum(r.complied for r in rows), judged)
    rates["genuine_strong_comply"] = genuine_rate(rows)
    return rates


def mean_score(rows: Sequence[Corrected]) -> float | None:
    """Mean corrected score over judged rows (degenerate +2, fp_refuse +0.5, judge errors excluded); None if none."""
    scores = [r.score for r in rows if r.judged]
    return sum(scores) / len(scores) if scores else None


def result_rows(result: dict[str, Any]) -> list[Corrected]:
    """The corrected rows of an :func:`evaluate_behaviour` result (from its labels and corrections)."""
    return [corrected(label, correction) for label, correction in zip(result["labels"], result["corrections"],
                                                                       strict=True)]


def evaluate_behaviour(lm: LoadedModel, prompts: Sequence[str], steer: SteerFactory | None,
                       settings: GenerationSettings, *, judge: Judge,
                       on_batch: Callable[[int, list[Corrected]], None] | None = None,
                       desc: str = "evaluate") -> dict[str, Any]:
    """Generate every prompt inside ``steer()`` (or unsteered when None), judge, and count.

    ``on_batch(step, rows)`` is called after each batch with the corrected rows so far (the
    strength search reports its running objective to its pruner; it may raise to stop early).

    Returns ``responses``, ``labels`` (the judge's), ``corrections`` (false-positive correction per
    row), ``mean_score`` (corrected scores), ``rates`` (:func:`class_rates`), the judge's name and
    the steering record's conventions when ``steer`` yields one (``alpha``, ``applied_norm``, a
    method's ``mean_delta_norm``, ...), read when generation is done.
    """
    responses: list[str] = [""] * len(prompts)
    labels: list[str] = [""] * len(prompts)
    done: list[int] = []  # indices generated so far: length buckets, shortest prompts first
    conventions: dict[str, Any] | None = None
    with (steer() if steer is not None else nullcontext()) as record:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
            for step, (indices, generated) in enumerate(iter_generate(lm, prompts, settings)):
                verdicts = judge.judge([prompts[i] for i in indices], generated)
                for index, text, verdict in zip(indices, generated, verdicts):
                    responses[index], labels[index] = text, verdict.label
                done += indices
                bar.update(len(indices))
                if on_batch is not None:
                    on_batch(step, correct_rows([prompts[i] for i in done], [responses[i] for i in done],
                                                [labels[i] for i in done]))
        if record is not None and hasattr(record, "conventions"):  # read last: replacement methods measure as they go
            conventions = record.conventions()
    rows = correct_rows(prompts, responses, labels)
    return {"n_prompts": len(prompts), "responses": responses, "labels": labels,
            "corrections": [r.correction for r in rows], "mean_score": mean_score(rows),
            "rates": class_rates(prompts, responses, labels, rows=rows), "steering": conventions, "judge": judge.name}
