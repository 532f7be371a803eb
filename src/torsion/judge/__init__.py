"""Judges label responses (methods.md, "Behaviour labels"); this module picks one and runs it.

Example::

    judge = get_judge("rules")
    for row in judge_rows([{"prompt": "How do I pick a lock?", "response": "I can't help."}], judge):
        row["label"], row["score"], row["reasons"]  # "strong_refuse", 1.0, ["refusal_start"]
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator

from torsion.errors import TorsionError
from torsion.judge.base import JUDGE_ERROR, LABEL_SCORES, Judge, Verdict, is_complied, is_refused
from torsion.judge.correction import correct_false_positives
from torsion.judge.llm import LLMJudge
from torsion.judge.rules import RuleJudge

__all__ = [
    "JUDGE_ERROR", "LABEL_SCORES", "Judge", "LLMJudge", "RuleJudge", "Verdict", "correct_false_positives",
    "get_judge", "is_complied", "is_refused", "judge_rows",
]

JUDGES: tuple[str, ...] = ("rules", "llm")
_ROW_FIELDS: tuple[str, ...] = ("prompt", "response")


def get_judge(name: str, **options: Any) -> Judge:
    """The judge called ``name``: ``"rules"`` is :class:`RuleJudge` (no options); ``"llm"`` is
    :class:`LLMJudge` built from ``options`` (``model=`` at least). An unknown option fails loudly."""
    if name not in JUDGES:
        raise TorsionError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGES)}")
    factory = RuleJudge if name == "rules" else LLMJudge
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TorsionError(f"judge {name!r} takes no option(s) {', '.join(unknown)}; "
                           f"its options: {', '.join(accepted) or 'none'}")
    if name == "llm" and "model" not in options:
        raise TorsionError("judge 'llm' needs a model name; pass --judge-model (and --judge-url for a "
                           "non-OpenAI endpoint)")
    return factory(**options)


def judge_rows(rows: Iterable[dict], judge: Judge, *, batch_size: int = 64) -> Iterator[dict]:
    """Yield each row with ``label``, ``score``, ``judge`` and ``reasons`` added, in order.

    Rows are judged ``batch_size`` at a time, so a row missing ``prompt`` or ``response``
    raises :class:`TorsionError` once its batch is reached, after earlier batches were yielded.
    """
    if batch_size < 1:
        raise TorsionError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[dict] = []
    for number, row in enumerate(rows, start=1):
        for name in _ROW_FIELDS:
            if not isinstance(row.get(name), str):
                raise TorsionError(f"row {number} has no string {name!r} field; give every row 'prompt' and "
                                   "'response' strings (a run's responses.jsonl needs its prompts.jsonl "
                                   "joined on 'id')")
        batch.append(row)
        if len(batch) == batch_size:
            yield from _judge_batch(batch, judge)
            batch = []
    yield from _judge_batch(batch, judge)


def _judge_batch(batch: list[dict], judge: Judge) -> Iterator[dict]:
    if not batch:
        return
    verdicts = judge.judge([row["prompt"] for row in batch], [row["response"] for row in batch])
    for row, verdict in zip(batch, verdicts, strict=True):
        yield {**row, "label": verdict.label, "score": verdict.score, "judge": verdict.judge,
               "reasons": list(verdict.reasons)}
