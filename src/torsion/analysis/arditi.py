"""The Arditi et al. check: is the refusal direction causal in both directions?

The direction is chosen on the train split only: the MD axis at the layer whose projection
best separates refused from complied (ROC-AUC, :mod:`torsion.selection`), among the first
``max_depth`` of the blocks (directions near the output mostly encode the next token).
It is then tested on prompts that chose nothing:

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

import torch
from tqdm.auto import tqdm

from torsion.capture import load_activations
from torsion.data import load_source, sample
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings, generate_batch
from torsion.judge import get_judge
from torsion.judge.base import is_complied, is_refused
from torsion.metrics import first_token_kl
from torsion.models import LoadedModel
from torsion.selection import layer_auc, top_layers
from torsion.stats import wilson_interval
from torsion.steer import ablate_direction, add_steering
from torsion.runs import fit_rows, labelled_prompts
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


def _judged_rate(lm: LoadedModel, prompts: list[str], settings: GenerationSettings, context=None, *,
                 desc: str) -> dict[str, Any]:
    responses = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc=desc, unit="batch"):
        batch = prompts[start:start + settings.batch_size]
        if context is None:
            responses += generate_batch(lm, batch, settings)
        else:
            with context():
                responses += generate_batch(lm, batch, settings)
    verdicts = get_judge("rules").judge(prompts, responses)
    result = refusal_rate([v.score for v in verdicts])
    result["examples"] = [{"prompt": p, "response": r, "label": v.label}
                          for p, r, v in list(zip(prompts, responses, verdicts))[:3]]
    return result


def run_arditi(run_dir: Path, lm: LoadedModel, *, component: str = "resid", max_depth: float = 0.8,
               alpha: float = 1.0, n_neutral: int = 48, max_new_tokens: int = 32, seed: int = 0) -> dict[str, Any]:
    """Choose the direction on the train split; test ablation and addition on unseen prompts."""
    run = RunDir(run_dir)
    prompts, responses = labelled_prompts(run)
    activations, _ = load_activations(run.activations_path)
    vectors = load_vectors(run.vectors_path, d_model=lm.d_model)
    axes = vectors[f"md/{component}"].directions
    train = fit_rows(prompts, responses)
    refused = torch.tensor([is_refused(responses[i]["score"]) for i in train])
    auc = layer_auc(activations[component][train], refused, axes)
    eligible = max(1, int(max_depth * lm.n_layers))
    layer = top_layers(auc[:eligible], 1)[0]
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
                        "eligible_layers": f"0..{eligible - 1}", "ablation": "every write into the residual stream",
                        "addition": "alpha * v at the chosen layer, all positions", "judge": "rules",
                        "kl": "first token, neutral prompts"},
        "layer": layer, "layer_auc": auc.tolist(), "alpha": alpha, "applied_norm": applied_norm,
        "n_train": len(train), "n_holdout_harmful": len(holdout), "n_neutral": len(neutral),
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
