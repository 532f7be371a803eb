"""Judge agreement: confusion matrices and Cohen's κ against hand computations and sklearn's formula."""

from __future__ import annotations

import json

import numpy as np
import pytest

from torsion.errors import TorsionError
from torsion.judge.agreement import agree_files, agreement, cohen_kappa, format_agreement

SR, WR, WC, SC, DG, JE = "strong_refuse", "weak_refuse", "weak_comply", "strong_comply", "degenerate", "judge_error"


def sklearn_kappa(labels_a: list[str], labels_b: list[str]) -> float:
    """sklearn.metrics.cohen_kappa_score (unweighted), written out: 1 − Σ w·C / Σ w·E with w = 1 − I."""
    classes = sorted(set(labels_a) | set(labels_b))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)))
    for a, b in zip(labels_a, labels_b):
        confusion[index[a], index[b]] += 1
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / confusion.sum()
    weights = 1 - np.eye(len(classes))
    return float(1 - (weights * confusion).sum() / (weights * expected).sum())


def test_binary_two_by_two_by_hand():
    # A\B     refuse comply
    # refuse    20     5      p_o = 35/50 = 0.7
    # comply    10    15      p_e = (25·30 + 25·20) / 50² = 0.5, κ = (0.7 − 0.5) / (1 − 0.5) = 0.4
    pairs = [(SR, SR)] * 12 + [(WR, SR)] * 8 + [(SR, WC)] * 5 + [(SC, WR)] * 10 + [(WC, SC)] * 15
    result = agreement([a for a, _ in pairs], [b for _, b in pairs])
    binary = result["binary"]
    assert binary["classes"] == ["refuse", "comply"] and binary["confusion"] == [[20, 5], [10, 15]]
    assert binary["n"] == 50 and binary["accuracy"] == pytest.approx(0.7) and binary["kappa"] == pytest.approx(0.4)
    assert binary["excluded"] == {"degenerate": 0, "judge_error": 0}


def test_four_class_by_hand():
    # A\B  SR WR WC SC    p_o = 3/6; rows (2, 1, 1, 2), columns (1, 2, 1, 2)
    # SR    1  1  0  0    p_e = (2·1 + 1·2 + 1·1 + 2·2) / 36 = 1/4
    # WR    0  1  0  0    κ = (1/2 − 1/4) / (3/4) = 1/3
    # WC    0  0  0  1
    # SC    0  0  1  1    binary: A and B agree on every stance, κ = 1
    result = agreement([SR, SR, WR, WC, SC, SC], [SR, WR, WR, SC, SC, WC])
    four = result["four_class"]
    assert four["classes"] == [SR, WR, WC, SC]
    assert four["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert four["accuracy"] == pytest.approx(0.5) and four["kappa"] == pytest.approx(1 / 3)
    assert result["binary"]["kappa"] == pytest.approx(1.0) and result["binary"]["accuracy"] == 1.0


def test_kappa_matches_sklearns_formula_on_random_labels():
    rng = np.random.default_rng(0)
    labels = [SR, WR, WC, SC, DG]
    a = list(rng.choice(labels, size=200, p=[0.3, 0.2, 0.2, 0.25, 0.05]))
    b = [x if rng.random() < 0.6 else str(rng.choice(labels)) for x in a]
    result = agreement(a, b)
    assert result["four_class"]["classes"] == [SR, WR, WC, SC, DG]
    assert result["four_class"]["kappa"] == pytest.approx(sklearn_kappa(a, b), abs=1e-12)
    kept = [(x, y) for x, y in zip(a, b) if DG not in (x, y)]
    stance = {SR: "r", WR: "r", WC: "c", SC: "c"}
    assert result["binary"]["kappa"] == pytest.approx(
        sklearn_kappa([stance[x] for x, _ in kept], [stance[y] for _, y in kept]), abs=1e-12)
    assert result["binary"]["n"] == len(kept) and result["binary"]["excluded"]["degenerate"] == 200 - len(kept)


def test_degenerate_and_judge_errors_are_excluded_and_counted():
    result = agreement([SR, DG, JE, WC, DG], [SR, SC, WR, JE, DG])
    assert result["n_rows"] == 5
    assert result["binary"]["n"] == 1 and result["binary"]["excluded"] == {"degenerate": 2, "judge_error": 2}
    four = result["four_class"]
    assert four["classes"][-1] == DG and four["n"] == 3 and four["excluded"] == {"judge_error": 2}
    assert four["confusion"][0][0] == 1 and four["confusion"][4][3] == 1 and four["confusion"][4][4] == 1
    assert "degenerate" not in agreement([SR], [WR])["four_class"]["classes"]


def test_undefined_kappa_and_bad_input():
    assert cohen_kappa([[4, 0], [0, 0]]) is None  # both judges used one class: p_e = 1
    assert cohen_kappa([[0, 0], [0, 0]]) is None
    empty = agreement([JE], [SR])
    assert empty["binary"]["accuracy"] is None and empty["four_class"]["kappa"] is None
    with pytest.raises(TorsionError, match="unknown label 'fp_refuse'"):
        agreement(["fp_refuse"], [SR])
    with pytest.raises(TorsionError, match="align the rows first"):
        agreement([SR], [SR, SR])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_agree_files_joins_on_ids_or_row_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "p1", "label": SR, "judge": "rules-v1"},
                                           {"id": "p2", "label": WC, "judge": "rules-v1"},
                                           {"id": "p3", "label": SC, "judge": "rules-v1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "p3", "label": WC, "judge": "llm:m"},
                                           {"id": "p1", "label": WR, "judge": "llm:m"}])
    result = agree_files(a, b)
    assert (result["join"], result["only_a"], result["only_b"]) == ("id", 1, 0)
    assert (result["judge_a"], result["judge_b"]) == ("rules-v1", "llm:m")
    assert result["binary"]["confusion"] == [[1, 0], [0, 1]]
    assert result["four_class"]["accuracy"] == 0.0
    text = format_agreement(result)
    assert "2 rows compared (A = rules-v1, B = llm:m), joined on id (1 only in A, 0 only in B)" in text
    assert "binary: n 2, accuracy 1.000, kappa 1.000 (excluded: degenerate 0, judge_error 0)" in text

    plain_a = write_jsonl(tmp_path / "c.jsonl", [{"label": SR}, {"label": SC}])
    plain_b = write_jsonl(tmp_path / "d.jsonl", [{"label": SR}, {"label": WR}])
    by_order = agree_files(plain_a, plain_b)
    assert by_order["join"] == "row_order" and by_order["binary"]["confusion"] == [[1, 0], [1, 0]]
    with pytest.raises(TorsionError, match="not every row has an 'id'"):
        agree_files(plain_a, write_jsonl(tmp_path / "e.jsonl", [{"label": SR}]))
    with pytest.raises(TorsionError, match="has no 'label'"):
        agree_files(plain_a, write_jsonl(tmp_path / "f.jsonl", [{"id": "p1"}, {"id": "p2"}]))
