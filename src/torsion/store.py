"""The run directory: atomic writes, append-only JSONL with resume, and stage bookkeeping.

A run directory holds (README, "Run directory")::

    manifest.json            config, versions, model, dataset hash, seed, time per stage
    prompts.jsonl            one prompt per line
    responses.jsonl          one judged response per line (appended as batches finish)
    activations.safetensors  [n_prompts, n_layers, d_model] per component
    vectors.safetensors      <method>/<component>[/<category>] -> [n_layers, d_model]
    analysis/<name>.json     one file per analysis
    report.html

Every write is atomic (temp file + ``os.replace``) or an fsynced append of whole lines,
so a killed run never leaves a half-written file that a later run would trust. Readers
refuse a damaged file with a :class:`~torsion.errors.TorsionError` naming the file, the line
and the fix; only writers create the directory.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from torsion.errors import TorsionError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _parse_json(text: str, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TorsionError(f"{where} is not valid JSON ({error.msg}); {fix}") from None
    except (ValueError, RecursionError):  # an integer past Python's digit limit, nesting past the stack
        raise TorsionError(f"{where} is not JSON torsion can read (too deeply nested or too long a number); "
                           f"{fix}") from None


def read_json(path: Path, *, fix: str = "fix the file or delete it and run the step that writes it again") -> dict:
    """A JSON object file such as ``manifest.json`` or ``analysis/<name>.json``.

    A missing file, bytes that are not UTF-8, invalid JSON or a non-object raise
    :class:`TorsionError` with the file, the line and ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise TorsionError(f"{path} does not exist; run the step that writes it first or check the path")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise TorsionError(f"{path} line {line} is not UTF-8; {fix}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise TorsionError(f"{path} line {error.lineno} is not valid JSON ({error.msg}); {fix}") from None
    except (ValueError, RecursionError):
        raise TorsionError(f"{path} is not JSON torsion can read (too deeply nested or too long a number); "
                           f"{fix}") from None
    if not isinstance(obj, dict):
        raise TorsionError(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def numbered_jsonl(path: Path, *, fix: str = "fix or delete that line",
                   last_line: bool = False) -> list[tuple[int, dict]]:
    """``(line number, row)`` for each JSON object line of ``path``; see :func:`read_jsonl`."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    if not last_line:
        lines = lines[:-1]  # the piece after the last newline: empty, or a torn append
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TorsionError(f"{path} line {number} is not UTF-8; {fix}") from None
        if not line.strip():
            continue
        row = _parse_json(line, f"{path} line {number}", fix)
        if not isinstance(row, dict):
            raise TorsionError(f"{path} line {number} holds a JSON {type(row).__name__}, not an object; {fix}")
        rows.append((number, row))
    return rows


def read_jsonl(path: Path, *, fix: str = "fix or delete that line", last_line: bool = False) -> list[dict]:
    """Read whole lines as JSON objects; a torn last line (from a killed append) is dropped.

    ``last_line=True`` reads a final line without a newline too (a user's file, not one torsion
    appends to). A missing file reads as no rows; blank lines are skipped. A line that is not
    UTF-8, not valid JSON or not an object raises :class:`TorsionError` naming the file, the
    line and ``fix``.
    """
    return [row for _, row in numbered_jsonl(path, fix=fix, last_line=last_line)]


def read_responses(path: Path) -> list[dict]:
    """The rows of a run's ``responses.jsonl``, each checked for a string ``id`` and ``label``
    and a numeric or null ``score``, so a hand-edited file fails here with its line, not later."""
    fix = "fix that line: each row is one JSON object with 'id', 'response', 'label' and 'score'"
    rows = numbered_jsonl(path, fix=fix)
    for number, row in rows:
        score = row.get("score")
        if not isinstance(row.get("id"), str) or not isinstance(row.get("label"), str) or (
                score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)))):
            raise TorsionError(f"{path} line {number} needs a string 'id' and 'label' and a number or null "
                               f"'score'; {fix}")
    return [row for _, row in rows]


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync. A torn trailing line from an earlier kill is cut first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(max(0, size - 1))
            if handle.read(1) != b"\n":
                handle.seek(0)
                content = handle.read()
                handle.truncate(content.rfind(b"\n") + 1)
        data = b"".join((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
        handle.seek(0, os.SEEK_END)
        handle.write(data)  # encoded first, so a row that cannot be written leaves none of the batch
        handle.flush()
        os.fsync(handle.fileno())


class RunDir:
    """Paths and stage bookkeeping of one run directory.

    Making one touches nothing on disk: the first write creates the directory, so reading a
    mistyped path never leaves an empty directory behind.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    manifest_path = property(lambda self: self.root / "manifest.json")
    prompts_path = property(lambda self: self.root / "prompts.jsonl")
    responses_path = property(lambda self: self.root / "responses.jsonl")
    activations_path = property(lambda self: self.root / "activations.safetensors")
    vectors_path = property(lambda self: self.root / "vectors.safetensors")
    report_path = property(lambda self: self.root / "report.html")

    def analysis_path(self, name: str) -> Path:
        return self.root / "analysis" / f"{name}.json"

    def manifest(self) -> dict:
        """``manifest.json`` as a dict; ``{}`` before the first write. A damaged file is refused."""
        if not self.manifest_path.is_file():
            return {}
        return read_json(self.manifest_path, fix="fix it by hand (it is JSON) or start a new run directory")

    def responses(self) -> list[dict]:
        """The judged rows of ``responses.jsonl`` (:func:`read_responses`)."""
        return read_responses(self.responses_path)

    def update_manifest(self, **fields: Any) -> dict:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def stage_done(self, name: str) -> bool:
        return bool(self.manifest().get("stages", {}).get(name, {}).get("done"))

    @contextmanager
    def stage(self, name: str, *, invalidates: tuple[str, ...] = ()) -> Iterator[None]:
        """Time a stage and mark it done in the manifest when its body returns.

        Callers check ``stage_done`` first; a stage interrupted midway stays not-done and
        resumes from its own checkpoints. Stages named in ``invalidates`` (those that read this
        one's output, such as the report) are marked not done, so they run again.
        """
        start = time.perf_counter()
        yield
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        previous = stages.get(name, {}).get("seconds", 0.0)
        stages[name] = {"done": True, "seconds": round(previous + time.perf_counter() - start, 3)}
        for downstream in invalidates:
            stages.pop(downstream, None)
        atomic_write_json(self.manifest_path, manifest)

    def invalidate(self, *names: str) -> None:
        """Mark stages as not done (their inputs changed)."""
        manifest = self.manifest()
        for name in names:
            manifest.get("stages", {}).pop(name, None)
        atomic_write_json(self.manifest_path, manifest)
