"""The weights hash every vector file carries (methods.md: model id and weights hash).

A model directory's hash is the sha256 of its ``sha256sum``-style listing: one line
``<sha256 of the file>  <file name>`` per weight file, names sorted (the safetensors files, or
the ``*.bin`` files where there are none). For a directory of shards it equals
``sha256sum model-*.safetensors | sha256sum`` run inside it. Hashing gigabytes takes a while, so
each file's digest is cached in ``$TORSION_CACHE/weights_sha256.json`` (JSON, keyed by the
file's real path, and valid while its size and mtime are unchanged).

Example::

    weights_sha256(Path("~/models/Qwen2.5-7B-Instruct").expanduser())   # '3f1c…'
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from torsion import assets
from torsion.errors import TorsionError
from torsion.store import atomic_write_json

CACHE_FILE = "weights_sha256.json"
NOT_WEIGHTS = ("training_args.bin",)


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory, sorted by name: safetensors, else ``*.bin``."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(
        p for p in directory.glob("*.bin") if p.name not in NOT_WEIGHTS)
    return [p for p in files if p.is_file()]


def weights_sha256(directory: Path, *, cache_dir: Path | None = None) -> str:
    """sha256 of the ``<sha256>  <name>`` listing of :func:`weight_files` (see the module docstring).

    Raises:
        TorsionError: the directory holds no weight files.
    """
    files = weight_files(directory)
    if not files:
        raise TorsionError(f"{directory} holds no *.safetensors or *.bin weight files; point --model at a "
                           "Hugging Face model directory")
    cache_path = Path(cache_dir or assets.cache_root()) / CACHE_FILE
    cache = _read_cache(cache_path)
    listing, changed = [], False
    for path in files:
        real, stat = path.resolve(), path.stat()
        entry = cache.get(str(real))
        if not (entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": assets.sha256_file(real)}
            cache[str(real)], changed = entry, True
        listing.append(f"{entry['sha256']}  {path.name}\n")
    if changed:
        _write_cache(cache_path, cache)
    return hashlib.sha256("".join(listing).encode("utf-8")).hexdigest()


def hub_weights_sha256(repo_id: str, *, cache_dir: Path | str | None = None) -> str | None:
    """:func:`weights_sha256` of a Hub model's cached snapshot (after it was loaded), or None with a warning."""
    from transformers.utils import cached_file

    try:
        config = cached_file(repo_id, "config.json", cache_dir=cache_dir, local_files_only=True)
        return weights_sha256(Path(config).parent)
    except (OSError, TorsionError) as error:
        warnings.warn(f"no weights hash for {repo_id}: its cached snapshot was not found ({error})", stacklevel=2)
        return None


def _read_cache(path: Path) -> dict[str, dict]:
    """The cache's entries; an unreadable or malformed cache is treated as empty (it is only a cache)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {key: value for key, value in cache.items() if isinstance(value, dict)}


def _write_cache(path: Path, cache: dict[str, dict]) -> None:
    """Write the cache atomically, dropping entries whose file is gone."""
    try:
        atomic_write_json(path, {key: value for key, value in sorted(cache.items()) if Path(key).exists()})
    except OSError as error:  # a read-only cache directory costs a re-hash next time, nothing more
        warnings.warn(f"could not write the weights-hash cache {path} ({error})", stacklevel=3)
