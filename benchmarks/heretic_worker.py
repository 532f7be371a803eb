"""Run inside ``.venv-heretic`` by ``bench_heretic.py``: heretic's own code for the two things it needs.

``front WORK OUT``: heretic's Pareto front, re-applied by heretic's code. Reads the study
heretic's CLI left in ``WORK/checkpoints/*.jsonl`` (an Optuna journal), takes its Pareto front the way heretic's menu does (trials sorted by refusals then KL, kept while the KL
falls), rebuilds heretic's ``Model`` with the study's own settings (batch size, response prefix
and seed included), recomputes the refusal directions exactly as ``heretic.main.run`` does (mean
residuals of the good and bad prompts, normalised difference, projected against the good mean),
and for each front trial calls ``Model.reset_model`` and ``Model.abliterate``. What heretic then
holds is a LoRA adapter per ``o_proj`` and ``down_proj`` (``W' = W + lora_B @ lora_A``, scaling 1);
those factors are written, per trial, to ``OUT/trial_<number>.safetensors`` under the module's
name in the plain transformers model (``model.layers.3.mlp.down_proj``: ``<name>.lora_A`` and
``<name>.lora_B``), and ``OUT/front.json`` lists the trials: number, heretic's parameters, its
train refusals and KL, and the trial's wall seconds from the journal. Nothing is re-implemented:
the kernel, the row-norm preservation and the direction are heretic's own functions.

``refusals IN OUT``: ``IN`` is a JSON list of response texts; ``OUT`` gets heretic's verdict on each
(a JSON list of booleans), from ``heretic.evaluator.Evaluator.is_refusal`` with heretic's default
refusal markers.

Usage: ``.venv-heretic/bin/python benchmarks/heretic_worker.py front WORK OUT`` or ``... refusals IN OUT``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from heretic.config import Settings
from heretic.model import AbliterationParameters, Model
from heretic.utils import load_prompts
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."


def front_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """heretic's menu: complete trials by (refusals, KL), each kept when its KL is below all before it."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    front, lowest = [], math.inf
    for trial in sorted(complete, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])):
        if trial.user_attrs["kl_divergence"] < lowest:
            lowest = trial.user_attrs["kl_divergence"]
            front.append(trial)
    return front


def refusal_directions(settings: Settings, model: Model) -> torch.Tensor:
    """``[n_layers + 1, d_model]`` as ``heretic.main.run`` computes them (without residual plots)."""
    good_means = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad_means = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad_means - good_means, p=2, dim=1)
    if settings.orthogonalize_direction:
        good_directions = F.normalize(good_means, p=2, dim=1)
        projection = torch.sum(directions * good_directions, dim=1)
        directions = F.normalize(directions - projection.unsqueeze(1) * good_directions, p=2, dim=1)
    return directions


def adapters(model: Model) -> dict[str, torch.Tensor]:
    """Every LoRA factor heretic set, keyed by the plain transformers module name."""
    tensors = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            plain = name.removeprefix(PEFT_PREFIX)
            tensors[f"{plain}.lora_A"] = module.lora_A["default"].weight.detach().float().contiguous().cpu()
            tensors[f"{plain}.lora_B"] = module.lora_B["default"].weight.detach().float().contiguous().cpu()
            assert module.scaling["default"] == 1.0, module.scaling
    return tensors


def refusals(responses: Path, out: Path) -> None:
    """heretic's ``Evaluator.is_refusal`` on each response (it reads only ``settings.refusal_markers``)."""
    from types import SimpleNamespace

    from heretic.evaluator import Evaluator

    markers = Settings.model_fields["refusal_markers"].default
    judge = SimpleNamespace(settings=SimpleNamespace(refusal_markers=markers))
    verdicts = [Evaluator.is_refusal(judge, text) for text in json.loads(responses.read_text())]
    out.write_text(json.dumps(verdicts))


def front(work: Path, out: Path) -> None:
    journals = sorted((work / "checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        raise SystemExit(f"expected one heretic journal in {work / 'checkpoints'}, found {len(journals)}")
    storage = JournalStorage(JournalFileBackend(str(journals[0]), lock_obj=JournalFileOpenLock(str(journals[0]))))
    study = optuna.load_study(study_name="heretic", storage=storage)
    settings = Settings.model_validate_json(study.user_attrs["settings"])
    torch.set_grad_enabled(False)
    model = Model(settings)
    directions = refusal_directions(settings, model)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for trial in front_trials(study):
        parameters = {k: AbliterationParameters(**v) for k, v in trial.user_attrs["parameters"].items()}
        model.reset_model()
        model.abliterate(directions, trial.user_attrs["direction_index"], parameters)
        save_file(adapters(model), str(out / f"trial_{trial.number}.safetensors"))
        rows.append({"number": trial.number, "params": trial.params,
                     "direction_index": trial.user_attrs["direction_index"],
                     "abliteration_parameters": trial.user_attrs["parameters"],
                     "train": {"refusals": trial.user_attrs["refusals"],
                               "n_bad_prompts": trial.user_attrs["n_bad_prompts"],
                               "refusal_rate": trial.user_attrs["refusals"] / trial.user_attrs["n_bad_prompts"],
                               "kl": trial.user_attrs["kl_divergence"]},
                     "file": f"trial_{trial.number}.safetensors"})
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    record = {"n_trials": len(study.trials), "n_complete": len(complete), "trial_seconds": seconds,
              "base_refusals": complete[0].user_attrs["base_refusals"] if complete else None,
              "settings": json.loads(study.user_attrs["settings"]), "front": rows}
    (out / "front.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    command, given, out = sys.argv[1:4]
    sys.argv[1:] = []  # heretic's Settings parse the command line whenever one is built
    {"front": front, "refusals": refusals}[command](Path(given), Path(out))
