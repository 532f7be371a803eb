"""Helpers the run-directory analyses share: default blocks, a run's vector, a seeded prompt sample."""

from __future__ import annotations

from torch import Tensor

from torsion.data import read_prompts_jsonl, sample
from torsion.errors import TorsionError
from torsion.store import RunDir
from torsion.vectors import SteeringVector


def back_half_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` blocks evenly spaced over the back half, ``n_layers // 2 … n_layers - 1``."""
    start = n_layers // 2
    count = min(k, n_layers - start)
    return sorted({round(start + i * (n_layers - 1 - start) / max(count - 1, 1)) for i in range(count)})


def run_vector(vectors: dict[str, SteeringVector], key: str) -> Tensor:
    """``vectors[key].directions`` ``[n_layers, d_model]``, or an error naming the keys there are."""
    if key not in vectors:
        raise TorsionError(f"the run has no vector {key!r} (it has {', '.join(sorted(vectors))}); "
                           "pick a method and component the run fitted")
    return vectors[key].directions


def split_prompts(run: RunDir, split: str, n_prompts: int | None, seed: int) -> list[str]:
    """Up to ``n_prompts`` prompts of ``split`` from ``prompts.jsonl``: :func:`torsion.data.sample`'s seeded sample."""
    prompts = [p for p in read_prompts_jsonl(run.prompts_path) if p.split == split]
    if not prompts:
        raise TorsionError(f"{run.prompts_path} has no {split!r} prompts; run the pipeline's prompts stage "
                           "or choose split='train' or 'holdout'")
    return [p.prompt for p in sample(prompts, n_prompts, seed=seed)]
