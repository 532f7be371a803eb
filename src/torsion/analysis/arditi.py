"""The Arditi et al. check: is the refusal direction causal in both directions?

The direction is chosen on the train split only: the MD axis at the layer whose projection
best separates refused from complied (ROC-AUC, :func:`torsion.selection.select_layers`), among
the blocks of the eligible window (default: from a quarter to four fifths of the depth, as
Arditi et al. skip the first blocks and the last fifth). It is then tested on prompts that
chose nothing:

- **ablation** (every write into the residual stream) on held-out harmful prompts: the
  refusal rate should fall;
- **addition** of ``α · v`` at the chosen layer, every position, on ``neutral`` prompts (the
  held-out half of the neutral set, which no strength search saw): the refusal rate should
  rise. Several ``α`` may be given; each is reported (a dose-response, none of them chosen on
  these prompts). ``α = 1`` moves a complied activation by exactly the refused-minus-complied
  mean gap;
- the first-token KL of both interventions on the neutral prompts, with its direction named.

Example::

    result = run_arditi(Path("runs/quick"), lm, alphas=(1.0, 2.0, 4.0), n_neutral=48)
    result["neutral"]["added"][0]["rate"], result["holdout_harmful"]["ablated"]["rate"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torsion.behaviour import evaluate_behaviour
from torsion.data import sample
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.metrics import first_token_kl
from torsion.models import LoadedModel
from torsion.judge.base import Judge
from torsion.runs import labelled_prompts, neutral_halves, run_judge
from torsion.selection import DEFAULT_WINDOW, select_layers
from torsion.steer import ablate_direction, add_steering
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 3


def _judged_rate(lm: LoadedModel, prompts: list[str], settings: GenerationSettings, steer=None, *,
                 judge: Judge, desc: str) -> dict[str, Any]:
    """The refusal rate (refused / judged, as every rate in torsion), every class, and examples."""
    evaluation = evaluate_behaviour(lm, prompts, steer, settings, judge=judge, desc=desc)
    result = {**evaluation["rates"]["refused"], "classes": evaluation["rates"], "steering": evaluation["steering"]}
    result["examples"] = [{"prompt": p, "response": r, "label": label}
                          for p, r, label in list(zip(prompts, evaluation["responses"], evaluation["labels"]))[:3]]
    return result


def run_arditi(run_dir: Path, lm: LoadedModel, *, component: str = "resid",
               window: tuple[float, float] = DEFAULT_WINDOW,
               alphas: Sequence[float] = (1.0,), n_neutral: int = 48, max_new_tokens: int = 32,
               seed: int = 0, judge: Judge | None = None) -> dict[str, Any]:
    """Choose the direction on the train split; test ablation and addition on unseen prompts.

    ``judge`` labels every evaluation (default: the run's own, :func:`~torsion.runs.run_judge`).
    """
    run = RunDir(run_dir)
    judge = judge or run_judge(run)
    prompts, _ = labelled_prompts(run)
    axes = load_vectors(run.vectors_path, d_model=lm.d_model)[f"md/{component}"].directions
    selection = select_layers(run.root, key=f"md/{component}", k=1, window=window)
    layer = selection["layers"][0]
    direction = axes[layer]

    holdout = [p.prompt for p in prompts if p.split == "holdout"]
    if not holdout:
        raise TorsionError("the run has no held-out prompts; re-run with a holdout fraction > 0")
    if not alphas:
        raise TorsionError("no addition strength given; pass at least one --alpha")
    neutral = [p.prompt for p in sample(neutral_halves(run)[1], n_neutral, seed=seed)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    ablate = lambda: ablate_direction(lm, direction)  # noqa: E731

    def add(alpha: float):
        return lambda: add_steering(lm, axes, layers=[layer], alpha=alpha, component=component, positions="all")

    added = []
    for alpha in alphas:
        rate = _judged_rate(lm, neutral, settings, add(alpha), judge=judge, desc=f"neutral, added alpha={alpha:g}")
        added.append({"alpha": alpha, "applied_norm": rate["steering"]["applied_norm"][0], **rate,
                      "kl": _kl(first_token_kl(lm, neutral, add(alpha)))})
    result = {
        "schema_version": SCHEMA_VERSION, "analysis": "arditi",
        "conventions": {"layer_indexing": LAYER_INDEXING, "axis": f"md/{component}",
                        "selection": "max ROC-AUC on train split",
                        "eligible_layers": "{}..{}".format(*selection["eligible"]), "ablation": "every write into the residual stream",
                        "addition": "alpha * v at the chosen layer, all positions", "judge": judge.name,
                        "kl": "first token, neutral prompts", "neutral": "held-out half of the neutral set",
                        "rate": "refused (strong + weak refuse + fp_refuse) / judged responses, Wilson 95%"},
        "layer": layer, "layer_auc": selection["auc"],
        "n_train": len(selection["prompt_ids"]), "n_holdout_harmful": len(holdout), "n_neutral": len(neutral),
        "holdout_harmful": {"baseline": _judged_rate(lm, holdout, settings, judge=judge,
                                                     desc="held-out harmful, baseline"),
                            "ablated": _judged_rate(lm, holdout, settings, ablate, judge=judge,
                                                    desc="held-out harmful, ablated")},
        "neutral": {"baseline": _judged_rate(lm, neutral, settings, judge=judge, desc="neutral, baseline"),
                    "added": added},
        "kl_neutral_ablation": _kl(first_token_kl(lm, neutral, ablate)),
    }
    atomic_write_json(run.analysis_path("arditi"), result)
    return result


def _kl(result: dict[str, Any]) -> dict[str, float]:
    return {"kl_base_to_steered": result["kl_base_to_steered"], "kl_steered_to_base": result["kl_steered_to_base"]}
