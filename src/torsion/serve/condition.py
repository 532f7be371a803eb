"""Conditional steering (CAST, methods.md "Comparing steering methods": conditional).

A condition is a direction ``ĉ`` (unit, ``[d_model]``) at one block and a threshold ``τ``:
steering applies to a prompt only when ``x·ĉ > τ``, ``x`` the prompt's unsteered residual at
that block (the run's capture position). Both are fit on a run's train rows:
``ĉ = mean(category rows) − mean(other rows)``, normalised; ``τ`` maximises balanced accuracy
of ``x·ĉ > τ`` for "is in the category" on those rows. Without ``layer`` the block with the
best train balanced accuracy is chosen. The file is safetensors: tensor ``direction`` and a
JSON ``condition`` metadata entry (block, threshold, category, position, model, scores).

:func:`evaluate_condition` (``torsion condition eval``) measures a condition on the run's held-out
harmful prompts: the condition fires on a prompt when its unsteered resid state at the condition's
block, as captured by the run, passes the threshold, exactly what ``torsion serve`` tests on its
unsteered prefill. A conditionally steered prompt therefore answers as the steered model where the
condition fires and as the unsteered model elsewhere (greedy rows give the tokens they give alone),
so the steered arm is generated once and the unsteered arm is the run's own responses.

Example::

    condition = fit_condition(RunDir("runs/quick"), "cyber")
    save_condition(condition, "runs/quick/condition-cyber.safetensors")
    evaluate_condition(RunDir("runs/quick"), condition, lm, judge=run_judge(RunDir("runs/quick")))
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


def condition_search(run: RunDir, study: str) -> tuple[float, list[int], str]:
    """The chosen ``alpha``, blocks and steered positions of the strength search ``study``
    (``analysis/optimize_<study>.json``; a search that recorded no positions steered all of them)."""
    from torsion.store import read_json

    path = run.root / "analysis" / f"optimize_{study}.json"
    if not path.is_file():
        raise TorsionError(f"{path} does not exist; run `torsion optimize {run.root} --objective comply` first, "
                           "or name another study with --study")
    search = read_json(path)
    try:
        positions = (search.get("settings") or {}).get("positions", "all")
        if positions not in ("all", "last"):
            raise ValueError(positions)
        return float(search["alpha"]), [int(layer) for layer in search["layers"]], positions
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TorsionError(f"{path} has no chosen alpha and layers; finish the search with `torsion optimize`") \
            from None


def evaluate_condition(run: RunDir, condition: Condition, lm: Any, *, judge: Any, study: str = "comply-global",
                       out: str | Path | None = None) -> Path:
    """Refusal and genuine-compliance rates (Wilson 95% intervals) on the held-out prompts, for the condition's
    category and for the others, unsteered, conditional and unconditional; written to ``out`` (default
    ``RUN_DIR/analysis/condition_<category>.json``, atomic).

    Steering: ``flat`` with ``md/resid`` at the ``alpha``, blocks and positions of the strength search ``study``
    (so "unconditional" is the search's own steering).
    """
    from torsion.behaviour import correct_rows, evaluate_behaviour
    from torsion.capture import load_activations
    from torsion.generate import GenerationSettings
    from torsion.judge.correction import genuine_rate, refusal_rate
    from torsion.runs import labelled_prompts
    from torsion.steering import get_method
    from torsion.store import atomic_write_json
    from torsion.vectors import load_vector

    alpha, layers, positions = condition_search(run, study)
    check_condition(condition, lm)
    prompts, responses = labelled_prompts(run)
    held = [i for i, p in enumerate(prompts) if p.split == "holdout"]
    if not held:
        raise TorsionError(f"{run.root} has no held-out prompts; run with a holdout split")
    resid, _ = load_activations(run.activations_path)
    fires = condition.fires(resid["resid"][held, condition.layer])
    vector = load_vector(run.vectors_path, "md/resid", d_model=lm.d_model)
    method = get_method("flat", vectors=vector.directions, layers=layers, component="resid", positions=positions)
    settings = GenerationSettings(max_new_tokens=run.manifest()["config"]["max_new_tokens"])
    texts = [prompts[i].prompt for i in held]
    steered = evaluate_behaviour(lm, texts, lambda: method.apply(lm, alpha), settings, judge=judge,
                                 desc="steered holdout")
    base_rows = correct_rows(texts, [responses[i]["response"] for i in held], [responses[i]["label"] for i in held])
    steered_rows = correct_rows(texts, steered["responses"], steered["labels"])
    arms = {"unsteered": base_rows, "unconditional": steered_rows,
            "conditional": [s if fire else b for s, b, fire in zip(steered_rows, base_rows, fires)]}
    inside = [k for k, i in enumerate(held) if prompts[i].category == condition.category]
    outside = [k for k, i in enumerate(held) if prompts[i].category != condition.category]

    def rates(rows: list) -> dict:
        return {"refused": refusal_rate(rows), "genuine_strong_comply": genuine_rate(rows)}

    result = {
        "analysis": "conditional steering (CAST), held-out harmful prompts",
        "condition": {"category": condition.category, "layer": condition.layer, "threshold": condition.threshold,
                      **{k: condition.meta.get(k) for k in ("train_balanced_accuracy", "heldout_balanced_accuracy")}},
        "steering": {"method": "flat", "vector": "md/resid", "alpha": alpha, "layers": layers,
                     "positions": positions, "study": study},
        "fired": {"targeted": sum(fires[k] for k in inside), "others": sum(fires[k] for k in outside),
                  "n_targeted": len(inside), "n_others": len(outside)},
        "arms": {name: {"targeted": rates([rows[k] for k in inside]), "others": rates([rows[k] for k in outside])}
                 for name, rows in arms.items()},
        "conventions": {"layer_indexing": "block", "refusal_rate": "refused / judged", "intervals": "Wilson 95%"},
    }
    path = Path(out) if out is not None else run.root / "analysis" / f"condition_{condition.category}.json"
    atomic_write_json(path, result)
    return path
