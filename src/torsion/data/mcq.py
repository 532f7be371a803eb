"""The shipped four-choice capability probe (``mcq.jsonl``), scored by the answer letter.

Example::

    items = load_mcq()
    print(format_mcq(items[0]))  # question, "A. ..." to "D. ...", then "Answer with the letter ..."
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question; ``answer`` is the letter of the correct choice."""

    id: str  # "mcq-000", "mcq-001", … in file order
    question: str
    choices: tuple[str, ...]
    answer: str  # "A" … "D"
    subject: str


def load_mcq() -> list[MCQItem]:
    """Every shipped question, in file order."""
    lines = (Path(__file__).parent / "mcq.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [MCQItem(id=f"mcq-{i:03d}", question=row["question"], choices=tuple(row["choices"]),
                    answer=row["answer"], subject=row["subject"]) for i, row in enumerate(rows)]


def item_field(item: MCQItem | Mapping[str, Any], name: str) -> Any:
    """A field of an MCQ item given as an :class:`MCQItem` (or any object) or a mapping."""
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def format_mcq(item: MCQItem | Mapping[str, Any]) -> str:
    """The user message: the question, the lettered choices, and a request for the letter only."""
    choices = item_field(item, "choices")
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    valid = ", ".join(LETTERS[: len(choices)])
    instruction = f"Answer with the letter of the correct choice ({valid}) only."
    return f"{item_field(item, 'question')}\n\n{options}\n\n{instruction}"
