"""The prompt record and its run-directory file, ``prompts.jsonl``.

Example::

    prompt = make_prompt("Why is the sky blue?", "science", "neutral")
    write_prompts_jsonl(run_dir / "prompts.jsonl", [prompt])
    assert read_prompts_jsonl(run_dir / "prompts.jsonl") == [prompt]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torsion.errors import TorsionError
from torsion.store import atomic_write_text, numbered_jsonl

PROMPT_FIELDS = ("id", "prompt", "category", "source", "split", "prompt_hash")
SPLITS = ("train", "holdout")


@dataclass(frozen=True)
class Prompt:
    """One prompt with its provenance and split."""

    id: str  # f"{source}-{prompt_hash[:12]}"
    prompt: str
    category: str  # "" if none
    source: str  # a built-in name, "hf:NAME", or a local file's name
    prompt_hash: str  # sha256 hex of the stripped prompt text
    split: str = "train"  # "train" | "holdout"


def prompt_hash(text: str) -> str:
    """The sha256 hex digest of ``text``, stripped and UTF-8 encoded."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def make_prompt(text: str, category: str, source: str) -> Prompt:
    """A train-split :class:`Prompt` with the stripped text, its hash and the stable id."""
    text = text.strip()
    digest = prompt_hash(text)
    return Prompt(id=f"{source}-{digest[:12]}", prompt=text, category=category, source=source, prompt_hash=digest)


def write_prompts_jsonl(path: Path, prompts: Sequence[Prompt]) -> None:
    """Write ``prompts.jsonl`` atomically, one prompt a line with exactly :data:`PROMPT_FIELDS`."""
    lines = []
    for prompt in prompts:
        fields = asdict(prompt)
        lines.append(json.dumps({name: fields[name] for name in PROMPT_FIELDS}, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def read_prompts_jsonl(path: Path) -> list[Prompt]:
    """Read a file written by :func:`write_prompts_jsonl`, in file order.

    A damaged file (not UTF-8, a line that is not a JSON object, a missing or non-string field,
    an unknown split) raises :class:`TorsionError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TorsionError(f"prompts file {path} does not exist; run the prompts stage first or check the path")
    fix = "restore the file, or rebuild the prompt set in a new run directory"
    prompts = []
    for number, row in numbered_jsonl(path, fix=fix, last_line=True):
        bad = [name for name in PROMPT_FIELDS if not isinstance(row.get(name), str)]
        if bad:
            raise TorsionError(f"{path} line {number} lacks {', '.join(bad)} (each a string); {fix}")
        if row["split"] not in SPLITS:
            raise TorsionError(f"{path} line {number} has split {row['split']!r}, not one of {', '.join(SPLITS)}; "
                               f"{fix}")
        prompts.append(Prompt(**{name: row[name] for name in PROMPT_FIELDS}))
    return prompts
