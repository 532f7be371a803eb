"""Judges label responses (methods.md, "Behaviour labels"); this module picks one and runs it.

Example::

    judge = get_judge("rules")   # or "learned", "ensemble", "probe", "llm"
    for row in judge_rows([{"prompt": "How do I pick a lock?", "response": "I can't help."}], judge):
        row["label"], row["score"], row["reasons"]  # "strong_refuse", 1.0, ["refusal_start"]
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from torsion.errors import TorsionError
from torsion.judge.base import JUDGE_ERROR, LABEL_SCORES, Judge, Verdict, is_complied, is_refused
from torsion.judge.correction import correct_false_positives, row_correction
from torsion.judge.learned import EnsembleJudge, LearnedJudge
from torsion.judge.llm import LLMJudge
from torsion.judge.probe import ProbeJudge
from torsion.judge.rules import RuleJudge

__all__ = [
    "JUDGE_ERROR", "LABEL_SCORES", "EnsembleJudge", "Judge", "LLMJudge", "LearnedJudge", "ProbeJudge", "RuleJudge",
    "Verdict",
    "correct_false_positives", "get_judge", "is_complied", "is_refused", "judge_rows", "rejudge_run",
]

JUDGES: tuple[str, ...] = ("rules", "learned", "ensemble", "probe", "llm")
_FACTORIES = {"rules": RuleJudge, "learned": LearnedJudge, "ensemble": EnsembleJudge, "probe": ProbeJudge,
              "llm": LLMJudge}
_ROW_FIELDS: tuple[str, ...] = ("prompt", "response")


def get_judge(name: str, **options: Any) -> Judge:
    """The judge called ``name``: ``"rules"`` is :class:`RuleJudge` (no options); ``"learned"`` is
    :class:`LearnedJudge` (``weights=`` a model file, default the shipped one); ``"ensemble"`` is
    :class:`EnsembleJudge` (``weights=``, ``threshold=``); ``"probe"`` is :class:`ProbeJudge` (``weights=``,
    ``device=``, ``reader=``); ``"llm"`` is :class:`LLMJudge` built from
    ``options`` (``model=`` at least). An unknown option fails loudly."""
    if name not in JUDGES:
        raise TorsionError(f"unknown judge {name!r}; choose one of: {', '.join(JUDGES)}")
    factory = _FACTORIES[name]
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("self", "trained")]
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


# Stages of a run that read the labels (capture reads only the prompts): stale after a re-judge.
LABEL_STAGES: tuple[str, ...] = ("vectors", "rotation", "propagation", "random_control", "categories", "report")


def rejudge_run(run_dir: str | Path, judge: Judge) -> dict[str, Any]:
    """Re-label a run's ``responses.jsonl`` with ``judge``, keeping each old label beside the new one.

    Each row's old ``judge``, ``label``, ``score``, ``reasons`` and ``correction`` are appended to its
    ``previous`` list and the false-positive correction is recomputed for the new label (a row already
    labelled by this judge is left as it is). The file is replaced atomically; the
    manifest records ``judge_version`` and a ``rejudged`` entry, and the stages that read labels
    (``LABEL_STAGES``) are marked not done, so ``torsion run`` refits them from the new labels.
    Returns ``{"rows", "changed", "judge", "invalidated"}``.
    """
    from torsion.store import RunDir, atomic_write_text, read_jsonl
    import json

    run = RunDir(Path(run_dir))
    if not run.responses_path.is_file():
        raise TorsionError(f"{run.responses_path} does not exist; pass a run directory whose generate stage ran")
    rows = read_jsonl(run.responses_path)
    prompts = {row["id"]: row["prompt"] for row in read_jsonl(run.prompts_path)}
    missing = [row["id"] for row in rows if row.get("id") not in prompts]
    if missing:
        raise TorsionError(f"{len(missing)} responses (e.g. {missing[0]!r}) have no prompt in {run.prompts_path}; "
                           "the run directory is incomplete")
    pending = [row for row in rows if row.get("judge") != judge.name]
    verdicts = judge.judge([prompts[row["id"]] for row in pending], [row["response"] for row in pending])
    changed = 0
    for row, verdict in zip(pending, verdicts, strict=True):
        old = {key: row.get(key) for key in ("judge", "label", "score", "reasons", "correction")}
        row["previous"] = [*row.get("previous", []), old]
        changed += verdict.label != old["label"]
        prompt = prompts[row["id"]]
        row.update(label=verdict.label, score=verdict.score, judge=verdict.judge, reasons=list(verdict.reasons),
                   correction=row_correction(prompt, row["response"], verdict.score))
    done = [stage for stage in LABEL_STAGES if run.stage_done(stage)]
    if pending:  # before the new labels land: a rejudge killed midway must not leave stale stages done
        run.invalidate(*done)
    atomic_write_text(run.responses_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    history = run.manifest().get("rejudged", [])
    history.append({"judge": judge.name, "rows": len(pending), "changed": changed,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run.update_manifest(judge_version=judge.name, rejudged=history)
    return {"rows": len(pending), "changed": changed, "judge": judge.name, "invalidated": done if pending else []}
