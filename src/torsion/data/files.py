"""User prompt files: ``.csv`` (header row), ``.json`` (a list of objects) and ``.jsonl``.

Each row needs a non-empty ``prompt``; ``category`` is optional. The source of every prompt is
the file's name. A bad row fails with the file, the 1-based line (or list item) and the fix.

Example::

    prompts = load_prompt_file(Path("my_prompts.csv"))  # header: prompt,category
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from torsion.data.records import Prompt, make_prompt
from torsion.errors import TorsionError

FILE_SUFFIXES = (".csv", ".json", ".jsonl")


def prompt_from_row(row: object, where: str, source: str) -> Prompt:
    """The :class:`Prompt` of one row (a mapping with ``prompt`` and optional ``category``).

    ``where`` names the row in errors, e.g. ``"prompts.csv line 3"``.
    """
    if not isinstance(row, dict):
        raise TorsionError(f"{where} is not an object; give each row a 'prompt' field")
    text = row.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise TorsionError(f"{where} has no non-empty 'prompt'; fill it in or remove that row")
    category = row.get("category")
    if category is None:
        category = ""
    if isinstance(category, bool) or not isinstance(category, (str, int, float)):
        raise TorsionError(f"{where} has a {type(category).__name__} 'category'; give a name or leave it empty")
    category = str(category).strip()
    for name, value in (("prompt", text), ("category", category)):
        if not _encodable(value):
            raise TorsionError(f"{where} has a {name} that is not valid Unicode (a lone surrogate such as "
                               "\\ud800); fix that row")
    return make_prompt(text, category, source)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerates the byte-order mark spreadsheet exports write
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise TorsionError(f"{path} line {line} is not UTF-8 (byte {error.start}); re-save the file as UTF-8") from None


def _csv_rows(path: Path, text: str) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if "prompt" not in (reader.fieldnames or []):
            raise TorsionError(f"{path} has no 'prompt' column; "
                               "add a header row naming 'prompt' (and optionally 'category')")
        prompts = []
        for row in reader:
            prompts.append(prompt_from_row(row, f"{path} line {reader.line_num}", path.name))
    except csv.Error as error:
        raise TorsionError(f"{path} is not valid CSV near line {max(1, reader.line_num)} ({error}); fix that line "
                           "(quote fields holding commas, quotes or line breaks)") from None
    return prompts


def _json_rows(path: Path, text: str) -> list[Prompt]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise TorsionError(f"{path} line {error.lineno} is not valid JSON ({error.msg}); fix the file") from None
    except (ValueError, RecursionError):  # a number past Python's digit limit, nesting past the stack
        raise TorsionError(f"{path} is too deeply nested or holds too long a number; fix the file") from None
    if not isinstance(rows, list):
        raise TorsionError(f"{path} must hold a JSON list of objects; wrap the rows in [ ... ], each with a 'prompt'")
    return [prompt_from_row(row, f"{path} item {number}", path.name) for number, row in enumerate(rows, start=1)]


def _jsonl_rows(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, too long a number, too deep a nesting
            raise TorsionError(f"{path} line {number} is not valid JSON; fix or remove that line") from None
        prompts.append(prompt_from_row(row, f"{path} line {number}", path.name))
    return prompts


_READERS = {".csv": _csv_rows, ".json": _json_rows, ".jsonl": _jsonl_rows}


def load_prompt_file(path: Path) -> list[Prompt]:
    """Every row of a local ``.csv``, ``.json`` or ``.jsonl`` prompt file, in file order."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise TorsionError(f"{path} is not a prompt file; use a {', '.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise TorsionError(f"prompt file {path} does not exist; check the path")
    return reader(path, _decode(path))
