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
so a killed run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


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


def read_jsonl(path: Path) -> list[dict]:
    """Read whole lines; a torn last line (from a killed append) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


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
        handle.seek(0, os.SEEK_END)
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


class RunDir:
    """Paths and stage bookkeeping of one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    manifest_path = property(lambda self: self.root / "manifest.json")
    prompts_path = property(lambda self: self.root / "prompts.jsonl")
    responses_path = property(lambda self: self.root / "responses.jsonl")
    activations_path = property(lambda self: self.root / "activations.safetensors")
    vectors_path = property(lambda self: self.root / "vectors.safetensors")
    report_path = property(lambda self: self.root / "report.html")

    def analysis_path(self, name: str) -> Path:
        return self.root / "analysis" / f"{name}.json"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

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
