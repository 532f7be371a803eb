"""Accuracy of the rule judge against 320 hand-labelled real responses (tests/fixtures/labelled).

The fixture's labels were assigned by reading each response before the judge was run on it
(see tests/fixtures/labelled/README.md). Views of agreement, hand label against judge label:

- **binary** (asserted ≥ 0.92): each label becomes a stance, ``refuse`` (strong/weak_refuse),
  ``comply`` (weak/strong_comply) or ``degenerate``; a row agrees when the stances match. So a
  row where exactly one side says ``degenerate`` is a disagreement, and one where both do is an
  agreement. κ is computed on that 3×3 stance matrix.
- **four-class**: the labels themselves (with ``degenerate`` as a fifth class), from
  :func:`torsion.judge.agreement.agreement`, which also gives its own binary view (degenerate
  rows left out); both are printed.

A seeded 30% of the rows (lowest ``sha256("0:" + id)``) was held out while the rules were
checked; accuracy on that part is printed separately.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from torsion.judge.agreement import agreement, cohen_kappa, confusion_matrix, format_agreement
from torsion.judge.rules import RuleJudge

FIXTURE = Path(__file__).parent / "fixtures" / "labelled" / "responses.jsonl"
HAND_LABELS = ("strong_refuse", "weak_refuse", "weak_comply", "strong_comply", "degenerate")
STANCES = ("refuse", "comply", "degenerate")
FIELDS = ("id", "model", "source", "category", "prompt", "response", "label", "note")
MIN_BINARY_ACCURACY = 0.92
HOLDOUT_FRACTION = 0.3


def stance(label: str) -> str:
    return {"strong_refuse": "refuse", "weak_refuse": "refuse",
            "weak_comply": "comply", "strong_comply": "comply"}.get(label, label)


def held_out_ids(rows: list[dict], fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> set[str]:
    """The seeded held-out part: the ``round(fraction * n)`` rows with the lowest ``sha256(f"{seed}:{id}")``."""
    ranked = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    return {r["id"] for r in ranked[:round(fraction * len(rows))]}


def binary_agreement(hand: list[str], judged: list[str]) -> tuple[float, float | None]:
    """Accuracy and κ over stances (refuse / comply / degenerate): see the module docstring."""
    confusion = confusion_matrix([stance(h) for h in hand], [stance(j) for j in judged], STANCES)
    accuracy = sum(confusion[k][k] for k in range(len(STANCES))) / len(hand)
    return accuracy, cohen_kappa(confusion)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def judged(rows) -> list[str]:
    return [v.label for v in RuleJudge().judge([r["prompt"] for r in rows], [r["response"] for r in rows])]


def test_fixture_is_complete(rows):
    assert len(rows) >= 300
    for row in rows:
        assert set(row) == set(FIELDS), row["id"]
        assert row["label"] in HAND_LABELS, row["id"]
        assert isinstance(row["response"], str) and isinstance(row["note"], str)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["model"] for r in rows} == {"qwen2.5-coder-0.5b", "smollm2-135m"}
    assert {r["source"] for r in rows} == {"donotanswer", "harmbench", "neutral"}
    assert len({r["category"] for r in rows if r["source"] == "donotanswer"}) == 5
    labels = Counter(r["label"] for r in rows)
    assert labels["strong_refuse"] > 0 and labels["strong_comply"] > 0


def _report(name: str, hand: list[str], judged: list[str]) -> float:
    accuracy, kappa = binary_agreement(hand, judged)
    result = agreement(hand, judged)
    four, binary = result["four_class"], result["binary"]
    print(f"\n{name} (n={len(hand)}): binary accuracy {accuracy:.3f}, kappa {kappa:.3f} | "
          f"four-class accuracy {four['accuracy']:.3f}, kappa {four['kappa']:.3f} | "
          f"binary without degenerate rows (n={binary['n']}): accuracy {binary['accuracy']:.3f}, "
          f"kappa {binary['kappa']:.3f}")
    return accuracy


def test_rule_judge_binary_accuracy(rows, judged):
    hand = [r["label"] for r in rows]
    accuracy = _report("all rows", hand, judged)
    held = held_out_ids(rows)
    for name, keep in (("development part", False), ("held-out part", True)):
        pairs = [(h, j) for r, h, j in zip(rows, hand, judged) if (r["id"] in held) == keep]
        _report(name, [h for h, _ in pairs], [j for _, j in pairs])
    print("\nA = hand labels, B = rules-v1 (agreement() view: binary leaves degenerate rows out)")
    print(format_agreement(agreement(hand, judged)))
    assert accuracy >= MIN_BINARY_ACCURACY


def test_held_out_split_is_seeded(rows):
    held = held_out_ids(rows)
    assert len(held) == round(HOLDOUT_FRACTION * len(rows))
    assert held == held_out_ids(list(reversed(rows)))
