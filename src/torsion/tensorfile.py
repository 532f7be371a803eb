"""A safetensors file written row by row, so capture memory stays bounded by one batch.

The safetensors layout is an 8-byte little-endian header length, a JSON header, then the
raw tensor bytes. With every shape known up front, the header is written first and the
data region is memory-mapped; batches fill their rows in place. The file is written at
``<path>.partial`` with a ``<path>.partial.json`` checkpoint of the rows finished, and is
renamed to ``<path>`` once complete, so a reader never sees a half-filled file and a
killed writer resumes at its checkpoint.

Example::

    with RowWriter(path, {"resid": (n, L, d)}, metadata={"position": "last"}) as w:
        for start in range(w.rows_done, n, batch):
            w.write(start, {"resid": batch_array})
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from torsion.errors import TorsionError
from torsion.store import atomic_write_json


class RowWriter:
    """Fill float32 tensors ``[n_rows, ...]`` in row order, resumably."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.checkpoint = self.path.with_name(self.path.name + ".partial.json")
        self.shapes = shapes
        self.n_rows = next(iter(shapes.values()))[0]
        if any(shape[0] != self.n_rows for shape in shapes.values()):
            raise ValueError("every tensor needs the same number of rows")
        header, self._offsets = self._header(shapes, metadata)
        self.rows_done = self._resume(header)
        if self.rows_done == 0:
            self._create(header)
        self._maps = {
            name: np.memmap(self.partial, dtype=np.float32, mode="r+", offset=8 + len(header) + begin,
                            shape=shape)
            for name, (shape, begin) in self._offsets.items()
        }

    @staticmethod
    def _header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[bytes, dict]:
        entries, offsets, cursor = {}, {}, 0
        for name, shape in shapes.items():
            size = int(np.prod(shape)) * 4
            entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [cursor, cursor + size]}
            offsets[name] = (shape, cursor)
            cursor += size
        header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        return header, offsets

    def _resume(self, header: bytes) -> int:
        if not (self.partial.is_file() and self.checkpoint.is_file()):
            return 0
        with open(self.partial, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if handle.read(length) != header:
                return 0  # a different capture (other prompts or settings): start over
        try:
            rows_done = json.loads(self.checkpoint.read_text())["rows_done"]
            if isinstance(rows_done, bool) or not isinstance(rows_done, int) or not 0 <= rows_done <= self.n_rows:
                raise ValueError(f"rows_done {rows_done!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise TorsionError(f"capture checkpoint {self.checkpoint} is damaged ({type(error).__name__}); restart "
                               f"the capture: delete it and {self.partial.name}, then rerun") from None
        return rows_done

    def _create(self, header: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        total = sum(int(np.prod(s)) * 4 for s in self.shapes.values())
        with open(self.partial, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            handle.truncate(8 + len(header) + total)
        atomic_write_json(self.checkpoint, {"rows_done": 0})

    def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows ``start : start + len`` of every tensor, then checkpoint."""
        count = None
        for name, array in rows.items():
            self._maps[name][start:start + len(array)] = array
            count = len(array)
        for array in self._maps.values():
            array.flush()
        self.rows_done = start + (count or 0)
        atomic_write_json(self.checkpoint, {"rows_done": self.rows_done})

    def close(self) -> None:
        """Publish the file if every row is written."""
        self._maps.clear()
        if self.rows_done >= self.n_rows:
            os.replace(self.partial, self.path)
            self.checkpoint.unlink(missing_ok=True)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
