"""Conditional steering (CAST, methods.md "Comparing steering methods": conditional).

A condition is a direction ``ĉ`` (unit, ``[d_model]``) at one block and a threshold ``τ``:
steering applies to a prompt only when ``x·ĉ > τ``, ``x`` the prompt's unsteered residual at
that block (the run's capture position). Both are fit on a run's train rows:
``ĉ = mean(category rows) − mean(other rows)``, normalised; ``τ`` maximises balanced accuracy
of ``x·ĉ > τ`` for "is in the category" on those rows. Without ``layer`` the block with the
best train balanced accuracy is chosen. The file is safetensors: tensor ``direction`` and a
JSON ``condition`` metadata entry (block, threshold, category, position, model, scores).

Example::

    condition = fit_condition(RunDir("runs/quick"), "cyber")
    save_condition(condition, "runs/quick/condition-cyber.safetensors")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.store import RunDir, atomic_write_bytes

FORMAT = "torsion.condition/1"
POSITIONS = ("last", "post_instruction")


@dataclass(frozen=True)
class Condition:
    """``x·direction > threshold`` at block ``layer``; ``direction`` is unit ``[d_model]`` float32."""

    name: str
    direction: Tensor
    layer: int
    threshold: float
    category: str
    position: str = "last"
    n_post: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def pick(self, hidden: Tensor) -> Tensor:
        """The prompt's ``x`` from a left-padded block output ``[batch, seq, d_model]``: ``[batch, d_model]``."""
        return hidden[:, -1].float() if self.position == "last" else hidden[:, -self.n_post:].float().mean(1)

    def fires(self, x: Tensor) -> list[bool]:
        """``x·ĉ > τ`` per row of ``x`` ``[batch, d_model]``."""
        return ((x.double() @ self.direction.double()) > self.threshold).tolist()


def best_threshold(inside: np.ndarray, outside: np.ndarray) -> tuple[float, float]:
    """``(τ, balanced accuracy)`` of the rule ``projection > τ`` maximising balanced accuracy.

    Candidates are midpoints between consecutive distinct projections, and one below all;
    ties keep the smallest ``τ``.
    """
    values = np.unique(np.concatenate([inside, outside]))
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2])
    tpr = (inside[:, None] > candidates[None]).mean(0)
    tnr = (outside[:, None] <= candidates[None]).mean(0)
    scores = (tpr + tnr) / 2
    best = int(np.argmax(scores))
    return float(candidates[best]), float(scores[best])


def balanced_accuracy(inside: np.ndarray, outside: np.ndarray, threshold: float) -> float:
    """Mean of the true-positive rate on ``inside`` and the true-negative rate on ``outside``."""
    return float(((inside > threshold).mean() + (outside <= threshold).mean()) / 2)


def fit_condition(run: RunDir, category: str, *, layer: int | None = None, name: str | None = None) -> Condition:
    """Fit ``ĉ`` and ``τ`` on the train rows of ``run`` for ``category`` (resid, the run's primary position)."""
    from torsion.capture import load_activations
    from torsion.data import read_prompts_jsonl

    prompts = read_prompts_jsonl(run.prompts_path)
    activations, meta = load_activations(run.activations_path)
    if "resid" not in activations:
        raise TorsionError(f"{run.activations_path} has no resid activations; run with the resid component")
    resid = activations["resid"]  # [n_prompts, n_layers, d_model]
    if resid.shape[0] != len(prompts):
        raise TorsionError(f"{run.activations_path} has {resid.shape[0]} rows for {len(prompts)} prompts; "
                           "finish the run's capture stage (re-run `torsion run`)")
    train = [i for i, p in enumerate(prompts) if p.split == "train"]
    held = [i for i, p in enumerate(prompts) if p.split != "train"]
    inside = [i for i in train if prompts[i].category == category]
    outside = [i for i in train if prompts[i].category != category]
    if len(inside) < 2 or len(outside) < 2:
        known = sorted({p.category for p in prompts if p.split == "train"})
        raise TorsionError(f"category {category!r} has {len(inside)} train rows and the others {len(outside)}; "
                           f"need 2 of each (train categories: {', '.join(known) or 'none'})")
    layers = range(resid.shape[1]) if layer is None else [layer]
    if layer is not None and not 0 <= layer < resid.shape[1]:
        raise TorsionError(f"block {layer} is out of range; the run has blocks 0..{resid.shape[1] - 1}")
    fits = [_fit_block(resid[:, block].double(), inside, outside) + (block,) for block in layers]
    direction, threshold, score, block = max(fits, key=lambda fit: fit[2])
    projections = (resid[:, block].double() @ direction).numpy()
    held_in = [i for i in held if prompts[i].category == category]
    held_out = [i for i in held if prompts[i].category != category]
    held_score = (balanced_accuracy(projections[held_in], projections[held_out], threshold)
                  if held_in and held_out else None)
    position = meta.get("primary_position", "last")
    n_post = int(meta.get("post_instruction_tokens", "1") or 1)
    model = run.manifest().get("model", {})
    return Condition(name or category, direction.float(), block, threshold, category, position, n_post, {
        "run": str(run.root), "model_id": model.get("model_id", meta.get("model_id")),
        "weights_sha256": model.get("weights_sha256"), "n_train_inside": len(inside),
        "n_train_outside": len(outside), "train_balanced_accuracy": score,
        "heldout_balanced_accuracy": held_score, "block_scores": {str(f[3]): f[2] for f in fits}})


def _fit_block(x: Tensor, inside: Sequence[int], outside: Sequence[int]) -> tuple[Tensor, float, float]:
    diff = x[list(inside)].mean(0) - x[list(outside)].mean(0)
    norm = torch.linalg.vector_norm(diff)
    if not norm > 0:
        return diff, 0.0, 0.5
    direction = diff / norm
    threshold, score = best_threshold((x[list(inside)] @ direction).numpy(), (x[list(outside)] @ direction).numpy())
    return direction, threshold, score


def save_condition(condition: Condition, path: str | Path) -> Path:
    """Write the condition file atomically (safetensors: ``direction``, JSON metadata)."""
    from safetensors.torch import save

    record = {"name": condition.name, "layer": condition.layer, "threshold": condition.threshold,
              "category": condition.category, "position": condition.position, "n_post": condition.n_post,
              "meta": condition.meta}
    data = save({"direction": condition.direction.float().contiguous()},
                metadata={"format": FORMAT, "condition": json.dumps(record)})
    atomic_write_bytes(Path(path), data)
    return Path(path)


def load_condition(path: str | Path, *, name: str | None = None) -> Condition:
    """Read a condition file; a damaged or foreign file fails in one line."""
    from safetensors import SafetensorError, safe_open

    fix = "fit it again with `torsion condition fit RUN_DIR --category C`"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            direction = handle.get_tensor("direction") if "direction" in handle.keys() else None
    except (SafetensorError, OSError) as error:
        raise TorsionError(f"{path} is not a readable condition file ({error}); {fix}") from None
    try:
        record = json.loads(meta["condition"]) if meta.get("format") == FORMAT else None
        condition = Condition(name or str(record["name"]), direction.float(), int(record["layer"]),
                              float(record["threshold"]), str(record["category"]), str(record["position"]),
                              int(record["n_post"]), dict(record.get("meta") or {}))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TorsionError(f"{path} is not a {FORMAT} file (missing or bad metadata); {fix}") from None
    if condition.direction.ndim != 1 or not torch.isfinite(condition.direction).all() or \
            condition.position not in POSITIONS or condition.n_post < 1:
        raise TorsionError(f"{path} has a bad direction, position or n_post; {fix}")
    return condition


def check_condition(condition: Condition, lm: Any) -> None:
    """Refuse a condition fit for another model's width, depth or identity."""
    if condition.direction.shape[0] != lm.d_model or not 0 <= condition.layer < lm.n_layers:
        raise TorsionError(f"condition {condition.name!r} is for d_model={condition.direction.shape[0]}, block "
                           f"{condition.layer}; this model has d_model={lm.d_model} and {lm.n_layers} blocks")
    fitted = condition.meta.get("model_id")
    if fitted and fitted != lm.model_id:
        raise TorsionError(f"condition {condition.name!r} was fit on {fitted} but the model is {lm.model_id}; "
                           "fit it on a run of this model")
