"""Agreement between two judges' labels: confusion matrices, accuracy and Cohen's κ.

Two views of the same rows (methods.md, "Behaviour labels"):

- **binary**: ``refuse`` (strong/weak_refuse) against ``comply`` (weak/strong_comply). A row
  where either side is ``degenerate`` or ``judge_error`` is left out and counted under
  ``excluded`` (``judge_error`` first when both occur).
- **four_class**: the four behaviour classes, plus ``degenerate`` as a fifth class when either
  side uses it. A row where either side is ``judge_error`` is left out and counted.

Confusion rows are judge A's labels, columns judge B's. ``κ = (p_o − p_e) / (1 − p_e)`` with
``p_o`` the diagonal share and ``p_e = Σ_k row_k · col_k / n²``; κ is None when ``p_e = 1``
(both judges used one class only) and accuracy is None with no rows.

Example::

    result = agreement(["strong_refuse", "weak_comply"], ["weak_refuse", "strong_comply"])
    result["binary"]["accuracy"], result["four_class"]["accuracy"]   # 1.0, 0.0
    print(format_agreement(result))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torsion.errors import TorsionError
from torsion.judge.base import JUDGE_ERROR, LABEL_SCORES, LABELS, is_refused
from torsion.store import read_jsonl

FOUR_CLASSES: tuple[str, ...] = ("strong_refuse", "weak_refuse", "weak_comply", "strong_comply")
BINARY_CLASSES: tuple[str, ...] = ("refuse", "comply")
DEGENERATE = "degenerate"


def confusion_matrix(labels_a: Sequence[str], labels_b: Sequence[str], classes: Sequence[str]) -> list[list[int]]:
    """``counts[i][j]`` = rows where A says ``classes[i]`` and B says ``classes[j]``."""
    index = {label: i for i, label in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for a, b in zip(labels_a, labels_b, strict=True):
        counts[index[a]][index[b]] += 1
    return counts


def cohen_kappa(confusion: Sequence[Sequence[int]]) -> float | None:
    """Cohen's κ from a square confusion matrix; None when chance agreement is 1 or there are no rows."""
    n = sum(map(sum, confusion))
    if n == 0:
        return None
    p_observed = sum(confusion[k][k] for k in range(len(confusion))) / n
    columns = [sum(row[k] for row in confusion) for k in range(len(confusion))]
    p_chance = sum(sum(row) * column for row, column in zip(confusion, columns)) / n**2
    return None if p_chance == 1 else (p_observed - p_chance) / (1 - p_chance)


def _table(labels_a: Sequence[str], labels_b: Sequence[str], classes: Sequence[str],
           excluded: dict[str, int]) -> dict[str, Any]:
    confusion = confusion_matrix(labels_a, labels_b, classes)
    n = len(labels_a)
    return {"classes": list(classes), "confusion": confusion, "n": n,
            "accuracy": sum(confusion[k][k] for k in range(len(classes))) / n if n else None,
            "kappa": cohen_kappa(confusion), "excluded": excluded}


def agreement(labels_a: Sequence[str], labels_b: Sequence[str]) -> dict[str, Any]:
    """Binary and four-class agreement of two label sequences aligned by row (see the module docstring)."""
    if len(labels_a) != len(labels_b):
        raise TorsionError(f"{len(labels_a)} labels from A but {len(labels_b)} from B; align the rows first")
    for label in {*labels_a, *labels_b}:
        if label not in LABELS:
            raise TorsionError(f"unknown label {label!r}; agreement compares judge labels ({', '.join(LABELS)}): "
                               "compare the judges' 'label' field, not corrected labels")
    pairs = list(zip(labels_a, labels_b))
    judged = [(a, b) for a, b in pairs if JUDGE_ERROR not in (a, b)]
    behaviour = [(a, b) for a, b in judged if DEGENERATE not in (a, b)]
    n_errors, n_degenerate = len(pairs) - len(judged), len(judged) - len(behaviour)
    four = FOUR_CLASSES + ((DEGENERATE,) if n_degenerate else ())
    return {
        "n_rows": len(pairs),
        "binary": _table([_stance(a) for a, _ in behaviour], [_stance(b) for _, b in behaviour], BINARY_CLASSES,
                         {DEGENERATE: n_degenerate, JUDGE_ERROR: n_errors}),
        "four_class": _table([a for a, _ in judged], [b for _, b in judged], four, {JUDGE_ERROR: n_errors}),
    }


def _stance(label: str) -> str:
    return "refuse" if is_refused(LABEL_SCORES[label]) else "comply"


def _labels(path: Path) -> tuple[list[dict], str | None]:
    if not path.is_file():
        raise TorsionError(f"{path} does not exist; pass a judged JSONL file (torsion judge IN --out OUT)")
    rows = read_jsonl(path, last_line=True)
    if not rows:
        raise TorsionError(f"{path} has no rows; pass a judged JSONL file (one row with 'label' per line)")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("label"), str):
            raise TorsionError(f"row {number} of {path} has no 'label'; judge the file first (torsion judge)")
        if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
            raise TorsionError(f"row {number} of {path} has an 'id' that is not a string or whole number; fix it")
    judges = {row.get("judge") for row in rows}
    return rows, judges.pop() if len(judges) == 1 else None


def agree_files(a_path: str | Path, b_path: str | Path) -> dict[str, Any]:
    """:func:`agreement` of two judged JSONL files, joined on ``id`` when every row has one, else by row order.

    The result adds ``join`` (``"id"`` or ``"row_order"``), ``only_a`` and ``only_b`` (ids in one file
    only, left out), ``judge_a`` / ``judge_b`` (the files' ``judge`` field when uniform), and
    ``per_source`` (:func:`per_source`; empty when no row has a ``source`` field).
    """
    rows_a, judge_a = _labels(Path(a_path))
    rows_b, judge_b = _labels(Path(b_path))
    if all("id" in row for row in rows_a + rows_b):
        by_id = []
        for path, rows in ((a_path, rows_a), (b_path, rows_b)):
            ids = {row["id"]: row["label"] for row in rows}
            if len(ids) != len(rows):
                raise TorsionError(f"{path} repeats an id; keep one judged row per id")
            by_id.append(ids)
        shared = [i for i in by_id[0] if i in by_id[1]]
        sources = {row["id"]: row.get("source") for row in rows_b} | {
            row["id"]: row["source"] for row in rows_a if row.get("source") is not None}
        pairs = [(by_id[0][i], by_id[1][i], sources.get(i)) for i in shared]
        join = {"join": "id", "only_a": len(by_id[0]) - len(shared), "only_b": len(by_id[1]) - len(shared)}
    else:
        if len(rows_a) != len(rows_b):
            raise TorsionError(f"{a_path} has {len(rows_a)} rows and {b_path} {len(rows_b)}, and not every row "
                               "has an 'id'; give both files ids or the same rows in the same order")
        pairs = [(a["label"], b["label"], a.get("source", b.get("source"))) for a, b in zip(rows_a, rows_b)]
        join = {"join": "row_order", "only_a": 0, "only_b": 0}
    result = agreement([a for a, _, _ in pairs], [b for _, b, _ in pairs])
    return {**result, **join, "judge_a": judge_a, "judge_b": judge_b, "per_source": per_source(pairs)}


def per_source(pairs: Sequence[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``source`` value (A's row first, else B's): rows, binary and four-class accuracy (as
    :func:`agreement`). Empty when no row has a source; rows without one are grouped under ``"(none)"``."""
    if all(source is None for _, _, source in pairs):
        return {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for a, b, source in pairs:
        groups.setdefault("(none)" if source is None else str(source), []).append((a, b))
    out = {}
    for source in sorted(groups):
        result = agreement([a for a, _ in groups[source]], [b for _, b in groups[source]])
        out[source] = {"n": len(groups[source]), "binary_n": result["binary"]["n"],
                       "binary_accuracy": result["binary"]["accuracy"],
                       "four_class_accuracy": result["four_class"]["accuracy"]}
    return out


def _format_number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_agreement(result: dict[str, Any]) -> str:
    """A plain-text report: per view, n, accuracy, κ, exclusions and the confusion matrix (rows A, columns B)."""
    judges = ", ".join(f"{side} = {result[key]}" for side, key in (("A", "judge_a"), ("B", "judge_b"))
                       if result.get(key))
    lines = [f"{result['n_rows']} rows compared" + (f" ({judges})" if judges else "")]
    if "join" in result:
        lines[0] += f", joined on {result['join']} ({result['only_a']} only in A, {result['only_b']} only in B)"
    for view in ("binary", "four_class"):
        table = result[view]
        excluded = ", ".join(f"{name} {count}" for name, count in table["excluded"].items())
        summary = (f"{view}: n {table['n']}, accuracy {_format_number(table['accuracy'])}, "
                   f"kappa {_format_number(table['kappa'])} (excluded: {excluded})")
        lines += ["", summary]
        width = max(len(c) for c in table["classes"]) + 2
        lines.append("A \\ B".ljust(width) + "".join(c.rjust(width) for c in table["classes"]))
        for name, row in zip(table["classes"], table["confusion"]):
            lines.append(name.ljust(width) + "".join(str(count).rjust(width) for count in row))
    if result.get("per_source"):
        width = max(len(name) for name in result["per_source"]) + 2
        lines += ["", "per source:".ljust(width) + "n".rjust(6) + "binary".rjust(9) + "four_class".rjust(12)]
        for name, row in result["per_source"].items():
            lines.append(name.ljust(width) + str(row["n"]).rjust(6) + _format_number(row["binary_accuracy"]).rjust(9)
                         + _format_number(row["four_class_accuracy"]).rjust(12))
    return "\n".join(lines)
