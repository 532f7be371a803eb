"""The Arditi et al. check: is the refusal direction causal in both directions?

The direction is chosen on the train split only: the MD axis at the layer whose projection
best separates refused from complied (ROC-AUC, :func:`torsion.selection.select_layers`), among
the blocks of the eligible window (default: from a quarter to four fifths of the depth, as
Arditi et al. skip the first blocks and the last fifth). It is then tested on prompts that
chose nothing:

- **ablation** (every write into the residual stream) on held-out harmful prompts: the
  refusal rate should fall;
- **addition** of ``α · v`` at the chosen layer, every position, on ``neutral`` prompts: the
  refusal rate should rise;
- the first-token KL of both interventions on the neutral prompts, with its direction named.

Example::

    result = run_arditi(Path("runs/quick"), lm, n_neutral=48)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torsion.behaviour import evaluate_behaviour
from torsion.data import load_source, sample
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge.base import LABEL_SCORES, is_complied, is_refused
from torsion.metrics import first_token_kl
from torsion.models import LoadedModel
from torsion.runs import labelled_prompts
from torsion.selection import DEFAULT_WINDOW, select_layers
from torsion.stats import wilson_interval
from torsion.steer import ablate_direction, add_steering
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1


def refusal_rate(scores: list[float | None]) -> dict[str, Any]:
    """Refused / (refused + complied) with a Wilson 95% interval; other labels are counted apart."""
    refused = sum(is_refused(s) for s in scores)
    judged = refused + sum(is_complied(s) for s in scores)
    lo, hi = wilson_interval(refused, judged)
    return {"refused": refused, "judged": judged, "other": len(scores) - judged,
            "rate": refused / judged if judged else None, "ci95": [lo, hi] if judged else None}


def _judged_rate(lm: LoadedModel, prompts: list[str], settings: GenerationSettings, steer=None, *,
                 desc: str) -> dict[str, Any]:
    evaluation = evaluate_behaviour(lm, prompts, steer, settings, desc=desc)
    result = refusal_rate([LABEL_SCORES.get(label) for label in evaluation["labels"]])
    result["classes"] = evaluation["rates"]
    result["examples"] = [{"prompt": p, "response": r, "label": label}
                          for p, r, label in list(zip(prompts, evaluation["responses"], evaluation["labels"]))[:3]]
    return result


def run_arditi(run_dir: Path, lm: LoadedModel, *, component: str = "resid",
               window: tuple[float, float] = DEFAULT_WINDOW,
               alpha: float = 1.0, n_neutral: int = 48, max_new_tokens: int = 32, seed: int = 0) -> dict[str, Any]:
    """Choose the direction on the train split; test ablation and addition on unseen prompts."""
    run = RunDir(run_dir)
    prompts, _ = labelled_prompts(run)
    axes = load_vectors(run.vectors_path, d_model=lm.d_model)[f"md/{component}"].directions
    selection = select_layers(run.root, key=f"md/{component}", k=1, window=window)
    layer = selection["layers"][0]
    direction = axes[layer]

    holdout = [p.prompt for p in prompts if p.split == "holdout"]
    if not holdout:
        raise TorsionError("the run has no held-out prompts; re-run with a holdout fraction > 0")
    neutral = [p.prompt for p in sample(load_source("neutral"), n_neutral, seed=seed)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    ablate = lambda: ablate_direction(lm, direction)  # noqa: E731
    add = lambda: add_steering(lm, axes, layers=[layer], alpha=alpha, component=component,  # noqa: E731
                               positions="all")
    with add() as record:
        applied_norm = record.applied_norms[0]
    result = {
        "schema_version": SCHEMA_VERSION, "analysis": "arditi",
        "conventions": {"layer_indexing": "block", "axis": f"md/{component}", "selection": "max ROC-AUC on train split",
                        "eligible_layers": "{}..{}".format(*selection["eligible"]), "ablation": "every write into the residual stream",
                        "addition": "alpha * v at the chosen layer, all positions", "judge": "rules",
                        "kl": "first token, neutral prompts"},
        "layer": layer, "layer_auc": selection["auc"], "alpha": alpha, "applied_norm": applied_norm,
        "n_train": len(selection["prompt_ids"]), "n_holdout_harmful": len(holdout), "n_neutral": len(neutral),
        "holdout_harmful": {"baseline": _judged_rate(lm, holdout, settings, desc="held-out harmful, baseline"),
                            "ablated": _judged_rate(lm, holdout, settings, ablate, desc="held-out harmful, ablated")},
        "neutral": {"baseline": _judged_rate(lm, neutral, settings, desc="neutral, baseline"),
                    "added": _judged_rate(lm, neutral, settings, add, desc="neutral, added")},
        "kl_neutral": {"ablation": _kl(first_token_kl(lm, neutral, ablate)),
                       "addition": _kl(first_token_kl(lm, neutral, add))},
    }
    atomic_write_json(run.analysis_path("arditi"), result)
    return result


def _kl(result: dict[str, Any]) -> dict[str, float]:
    return {"kl_base_to_steered": result["kl_base_to_steered"], "kl_steered_to_base": result["kl_steered_to_base"]}
