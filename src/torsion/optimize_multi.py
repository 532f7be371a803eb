"""Multi-objective refusal removal: the Pareto front of refusals against KL (``torsion optimize --multi``).

An Optuna study with two minimised objectives searches the ``weighted-ablation`` kernel
(:mod:`torsion.steering.weighted_ablation`) at strength 1, the way heretic searches its
abliteration parameters:

1. the train-split refusal rate (:func:`torsion.judge.correction.refusal_rate`, after
   false-positive correction) of greedy responses to ``n_prompts`` train prompts;
2. ``kl_base_to_steered`` at the first token of the neutral probe half (:func:`torsion.metrics.first_token_kl`),
   as the single-objective search scores it (:mod:`torsion.optimize`).

The search space (:func:`kernel_space`, ``last = n_layers − 1``, block indexing) follows heretic
1.4's ranges: ``peak_weight`` ∈ [0.8, 1.5], ``peak_position`` ∈ [0.6, 1.0]·last,
``floor_fraction`` ∈ [0, 1] (``floor = floor_fraction · peak_weight``), ``width`` ∈ [1, max(1, 0.6·last)]
blocks, ``direction_index`` ∈ [0.4, 0.9]·last (fractional: adjacent blocks' directions interpolated),
``direction_scope`` global (that one direction everywhere) or per-block (each block its own),
``components`` attn+mlp, attn or mlp, and ``direction_source``: ``refusal`` (the run's vector,
refused minus complied, ``--key``) or ``harm`` (harmful minus harmless, projected off the harmless
mean, as heretic ablates it: :func:`torsion.vectors.harm_direction` of the train split against the
neutral search half, :func:`harm_vector`). The search picks the source per trial, so a model whose
refusal is carried by one more than the other is searched on equal budget either way. Methods in
:data:`MULTI_METHODS` (those with a removal kernel) support ``--multi``; the objective is ``comply``
(refusals removed).

Trials live in an Optuna storage (:mod:`torsion.search`): resumable, shareable by PostgreSQL
workers. Every point of the final front is then evaluated once on the held-out harmful prompts
and the held-out neutral half, plus MCQ accuracy and the perplexity ratio
(:func:`evaluate_point`); ``analysis/front_<study>.json`` (:func:`front_file_format`) is written
after each point, so a killed evaluation resumes without repeating a point.

Example::

    settings = SearchSettings(method="weighted-ablation", multi=True, n_trials=24)
    front = run_optimize_multi(Path("runs/quick"), lm, settings)
    [(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"]) for p in front["points"]]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from torsion.behaviour import evaluate_behaviour
from torsion.capture import capture_batch
from torsion.conventions import LAYER_INDEXING
from torsion.data import Prompt, read_prompts_jsonl
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge.base import Judge
from torsion.metrics import first_token_kl, mcq_accuracy, perplexity
from torsion.models import LoadedModel
from torsion.optimize import (NOT_OBJECTIVE, SearchSettings, _ids_sha256, baseline_rates, check_vector,
                              held_out_evaluation, mcq_items, prompt_sets, run_generation_settings)
from torsion.pareto import hypervolume_2d
from torsion.runs import neutral_halves, run_activations, run_judge
from torsion.search import open_study, redact_url, run_worker, storage_url
from torsion.steering.registry import get_method
from torsion.store import RunDir, atomic_write_json, read_json
from torsion.vectors import SteeringVector, harm_direction, load_vectors, save_vectors

SCHEMA_VERSION = 1
MULTI_METHODS = ("weighted-ablation",)  # methods with a removal kernel, hence a refusal/KL trade-off to search
OBJECTIVE_NAMES = ("refusal_rate", "kl_base_to_steered")
DIRECTIONS = ("minimize", "minimize")
HARM_KEY = "harm/resid"
DEFAULT_SAMPLER = "tpe"  # benchmarks/results/multi_sampler.json: the comparison that chose it
REFERENCE_POINT = (1.0, 1.0)  # (refusal rate, KL nats): every refusal, and a KL past any usable model
SCOPES = ("global", "per-block")
COMPONENTS = ("attn+mlp", "attn", "mlp")
DIRECTION_SOURCES = ("refusal", "harm")  # the run's refused-minus-complied vector; harmful minus harmless


def kernel_space(n_layers: int) -> dict[str, Any]:
    """The search space for a model of ``n_layers`` blocks: ``[low, high]`` floats, or a list of choices."""
    last = n_layers - 1
    return {"peak_weight": [0.8, 1.5], "peak_position": [0.6 * last, 1.0 * last], "floor_fraction": [0.0, 1.0],
            "width": [1.0, max(1.0, 0.6 * last)], "direction_index": [0.4 * last, 0.9 * last],
            "direction_scope": list(SCOPES), "components": list(COMPONENTS),
            "direction_source": list(DIRECTION_SOURCES)}


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """One trial's sampled values (every parameter always sampled: multivariate TPE needs a fixed space)."""
    sampled = {}
    for name, bounds in space.items():
        if isinstance(bounds[0], str):
            sampled[name] = trial.suggest_categorical(name, bounds)
        elif bounds[0] == bounds[1]:  # a 1-block model: nothing to choose
            sampled[name] = float(bounds[0])
        else:
            sampled[name] = trial.suggest_float(name, bounds[0], bounds[1])
    return sampled


def method_params(sampled: dict[str, Any]) -> dict[str, Any]:
    """The ``weighted-ablation`` parameters a trial's sampled values stand for."""
    return {"peak_weight": sampled["peak_weight"], "peak_position": sampled["peak_position"],
            "width": sampled["width"], "floor": sampled["floor_fraction"] * sampled["peak_weight"],
            "direction_index": sampled["direction_index"] if sampled["direction_scope"] == "global" else None,
            "components": sampled["components"]}


def point_source(params: dict[str, Any]) -> str:
    """A trial's direction source (fronts written before ``direction_source`` existed searched ``refusal``)."""
    return params.get("direction_source", "refusal")


def harm_vector(run: RunDir, lm: LoadedModel, study_name: str, harmless: list[Prompt], *,
                batch_size: int = 16) -> SteeringVector:
    """The study's ``harm`` directions: the run's train-split harmful activations (``resid`` at its
    primary position) against ``harmless`` captured now at the same position.

    Written once to ``analysis/harm_<study>.safetensors`` (key ``harm/resid``) and read back by a
    resumed search, a joining worker and ``orthogonalize --from-study``; a file made from other
    prompts or another model is recomputed.
    """
    prompts = read_prompts_jsonl(run.prompts_path)
    harmful, file_meta = run_activations(run, "resid")
    rows = [i for i, p in enumerate(prompts) if p.split == "train"]
    position = file_meta.get("primary_position", "last")
    meta = {"method": "harm", "projected": True, "component": "resid", "position": position,
            "layer_indexing": LAYER_INDEXING, "model_id": lm.model_id, "weights_sha256": lm.weights_sha256,
            "harmful_ids_sha256": _ids_sha256([prompts[i] for i in rows]),
            "harmless_ids_sha256": _ids_sha256(harmless), "n_harmful": len(rows), "n_harmless": len(harmless)}
    path = harm_path(run, study_name)
    if path.is_file():
        stored = load_vectors(path, d_model=lm.d_model).get(HARM_KEY)
        if stored is not None and all(stored.meta.get(k) == v for k, v in meta.items()):
            return stored
    batches = [capture_batch(lm, [p.prompt for p in harmless[i:i + batch_size]], components=("resid",),
                             positions=(position,))["resid"][position] for i in range(0, len(harmless), batch_size)]
    directions = harm_direction(harmful[rows], torch.cat(batches))
    vector = SteeringVector(directions, meta)
    save_vectors(path, {HARM_KEY: vector}, run_meta={"study": study_name})
    return vector


def harm_path(run: RunDir, study_name: str) -> Path:
    return run.root / "analysis" / f"harm_{study_name}.safetensors"


def check_multi(settings: SearchSettings) -> None:
    """One line unless ``settings`` can run a multi-objective search."""
    if settings.method not in MULTI_METHODS:
        raise TorsionError(f"--multi searches a removal kernel against KL, and {settings.method} has none; use "
                           f"--method {' or '.join(MULTI_METHODS)}, or drop --multi")
    if settings.objective != "comply":
        raise TorsionError("--multi removes refusals (refusal rate against KL); use --objective comply")
    if settings.category is not None:
        raise TorsionError("--multi searches one global front; drop --category and --per-category")
    if settings.method_params or settings.alpha_range is not None:
        raise TorsionError("--multi samples the whole kernel itself (strength 1); drop --param and --alpha-range")


def _trial_objective(lm: LoadedModel, directions: dict[str, Tensor], space: dict[str, Any], sets: dict,
                     generation: GenerationSettings, judge: Judge):
    search = [p.prompt for p in sets["search"]]
    probe = [p.prompt for p in sets["kl_probe"]]

    def objective(trial) -> tuple[float, float]:
        start = time.perf_counter()
        sampled = suggest(trial, space)
        method = get_method("weighted-ablation", directions=directions[point_source(sampled)],
                            **method_params(sampled))
        steer = method.factory(lm, 1.0)
        kl = first_token_kl(lm, probe, steer)
        result = evaluate_behaviour(lm, search, steer, generation, judge=judge, desc=f"trial {trial.number}")
        refused = result["rates"]["refused"]
        if refused["rate"] is None:
            raise TorsionError("every response of the trial was a judge error; check the judge")
        trial.set_user_attr("evaluation", {
            "method_params": method_params(sampled), "refusal_rate": refused["rate"], "rates": result["rates"],
            "kl_base_to_steered": kl["kl_base_to_steered"], "kl_steered_to_base": kl["kl_steered_to_base"],
            "mean_score": result["mean_score"], "labels": result["labels"], "corrections": result["corrections"],
            "responses": result["responses"], "seconds": round(time.perf_counter() - start, 2)})
        return refused["rate"], kl["kl_base_to_steered"]

    return objective


def front_file_format() -> str:
    """What ``analysis/front_<study>.json`` holds (also written into the file as ``format``)."""
    return ("study, method, objectives [refusal_rate, kl_base_to_steered] (both minimised), sampler, n_trials "
            "(finished), reference_point [refusal, KL], hypervolume_train (of the front's train objectives) and "
            "hypervolume_heldout (of the same points' held-out refusal rate and KL; null until every point is "
            "evaluated), points sorted by train refusal rate then KL: index, trial, params (sampled), method_params "
            "(weighted-ablation's, strength 1), train {refusal_rate, kl, kl_steered_to_base, degenerate_rate, n}, "
            "heldout {refusal_rate, refusal_ci (Wilson 95%), genuine_rate, degenerate_rate, kl_base_to_steered, "
            "kl_steered_to_base, mcq_accuracy (null with --n-mcq 0), perplexity_ratio (steered/base on the held-out "
            "neutral texts), n, "
            "rates}; baseline (unsteered held-out rates, MCQ accuracy, perplexity); prompts (id hashes of each set)")


def run_optimize_multi(run_dir: Path, lm: LoadedModel, settings: SearchSettings, *, storage: str | None = None,
                       study_name: str | None = None, evaluate: bool = True, judge: Judge | None = None,
                       heartbeat_interval: int = 10, grace_period: int = 60,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or join, or resume) the multi-objective study; then evaluate its front once on held-out prompts.

    Writes and returns ``analysis/front_<study>.json`` (:func:`front_file_format`); with
    ``evaluate=False`` (a worker that only runs trials) the points carry no ``heldout`` part.
    """
    check_multi(settings)
    run = RunDir(run_dir)
    judge = judge or run_judge(run)
    study_name = study_name or settings.study_name
    check_vector(run.root, settings)
    vector = load_vectors(run.vectors_path, d_model=lm.d_model)[settings.vector_key]
    if vector.directions.shape[0] != lm.n_layers:
        raise TorsionError(f"vector {settings.vector_key} covers {vector.directions.shape[0]} blocks but the model has "
                           f"{lm.n_layers}; use the run's own model")
    vector_sha256 = _sha256(vector.directions)
    space = kernel_space(lm.n_layers)
    sets = prompt_sets(run, settings)
    harm = harm_vector(run, lm, study_name, neutral_halves(run)[0])
    directions = {"refusal": vector.directions, "harm": harm.directions}
    sources = {"refusal": {"vector_key": settings.vector_key, "sha256": vector_sha256},
               "harm": {"file": str(harm_path(run, study_name).relative_to(run.root)), "key": HARM_KEY,
                        "sha256": _sha256(harm.directions), **harm.meta}}
    generation = run_generation_settings(run, settings)
    scale = {k: v for k, v in asdict(settings).items() if k not in NOT_OBJECTIVE}
    prompts = {f"{name}_ids_sha256": _ids_sha256(items) for name, items in sets.items()}
    spec = {"settings": json.loads(json.dumps(scale)), "objectives": list(OBJECTIVE_NAMES), "space": space,
            "method": "weighted-ablation", "strength": 1.0, "vector_sha256": vector_sha256,
            "harm_sha256": sources["harm"]["sha256"],
            "weights_sha256": lm.weights_sha256, "max_new_tokens": generation.max_new_tokens, "judge": judge.name,
            **{k: v for k, v in prompts.items() if k != "holdout_ids_sha256"}}
    url = storage_url(run.root, storage)
    study = open_study(url, study_name, spec, n_trials=settings.n_trials, sampler=settings.sampler,
                       seed=settings.seed, directions=DIRECTIONS, heartbeat_interval=heartbeat_interval,
                       grace_period=grace_period)
    log(f"study {study_name} in {redact_url(url)}: weighted-ablation kernel, objectives {list(OBJECTIVE_NAMES)}, "
        f"{settings.n_trials} trials ({settings.sampler}), judge {judge.name}")
    summary = run_worker(study, _trial_objective(lm, directions, space, sets, generation, judge), log=log)
    by_number = {t["number"]: t for t in summary["trials"]}
    front = sorted((by_number[n] for n in summary["front"]), key=lambda t: (t["values"][0], t["values"][1], t["number"]))
    if not front:
        raise TorsionError(f"study {study_name!r} has no complete trial; start a new --study with more --trials")
    path = run.analysis_path(f"front_{study_name}")
    existing = read_json(path) if path.is_file() else {}
    done = {(p["trial"], json.dumps(p["params"], sort_keys=True)): p["heldout"]
            for p in existing.get("points", []) if p.get("heldout") and existing.get("storage") == redact_url(url)}
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "analysis": "front", "format": front_file_format(), "study": study_name,
        "storage": redact_url(url), "method": "weighted-ablation", "objectives": list(OBJECTIVE_NAMES),
        "directions": list(DIRECTIONS), "sampler": settings.sampler, "n_trials": summary["n_finished"],
        "reference_point": list(REFERENCE_POINT), "space": space, "judge": judge.name,
        "settings": json.loads(json.dumps(asdict(settings))), "vector_key": settings.vector_key,
        "vector_sha256": vector_sha256, "direction_sources": sources, "model_id": lm.model_id,
        "weights_sha256": lm.weights_sha256,
        "max_new_tokens": generation.max_new_tokens,
        "conventions": {"layer_indexing": LAYER_INDEXING, "strength": 1.0,
                        "refusal_rate": "refused/judged after false-positive correction (fp_refuse counts), Wilson 95%",
                        "kl": "first-token KL; train: neutral probe half, heldout: the other half",
                        "hypervolume": "2-D, both minimised, bounded by reference_point",
                        "knee": "min-max normalise both held-out objectives over the front; closest to (0, 0)"},
        "prompts": {**prompts, "n": {name: len(items) for name, items in sets.items()}},
        "points": [_point(i, t) for i, t in enumerate(front)],
    }
    result["hypervolume_train"] = hypervolume_2d([(p["train"]["refusal_rate"], p["train"]["kl"])
                                                  for p in result["points"]], REFERENCE_POINT)
    result["hypervolume_heldout"] = None
    keys = [(p["trial"], json.dumps(p["params"], sort_keys=True)) for p in result["points"]]
    if not evaluate:  # a trials-only worker keeps what an evaluating worker already wrote for this front
        if all(key in done for key in keys) and len(existing["points"]) == len(keys) \
                and existing.get("n_trials") == result["n_trials"]:
            return existing
        atomic_write_json(path, result)
        return result
    baseline = existing.get("baseline") if existing.get("storage") == redact_url(url) else None
    result["baseline"] = baseline or _baseline(run, lm, settings, sets, judge)
    for point, key in zip(result["points"], keys):
        if key in done:
            point["heldout"] = done[key]
            continue
        method = get_method("weighted-ablation", directions=directions[point_source(point["params"])],
                            **point["method_params"])
        point["heldout"] = evaluate_point(run, lm, method, settings, sets, generation, judge, result["baseline"],
                                          log=log)
        atomic_write_json(path, result)  # a killed evaluation resumes after the last finished point
    result["hypervolume_heldout"] = hypervolume_2d(
        [(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"]) for p in result["points"]],
        REFERENCE_POINT)
    atomic_write_json(path, result)
    return result


def _sha256(directions: Tensor) -> str:
    return hashlib.sha256(directions.numpy().tobytes()).hexdigest()


def _point(index: int, trial: dict[str, Any]) -> dict[str, Any]:
    evaluation = trial["user_attrs"]["evaluation"]
    rates = evaluation["rates"]
    return {"index": index, "trial": trial["number"], "params": trial["params"],
            "method_params": evaluation["method_params"], "seconds": evaluation.get("seconds"),
            "train": {"refusal_rate": trial["values"][0], "kl": trial["values"][1],
                      "kl_steered_to_base": evaluation["kl_steered_to_base"],
                      "degenerate_rate": rates["degenerate"]["rate"], "n": rates["refused"]["n"]}}


def _baseline(run: RunDir, lm: LoadedModel, settings: SearchSettings, sets: dict, judge: Judge) -> dict[str, Any]:
    """The unsteered model on the held-out prompts (the run's own responses), MCQ and held-out perplexity."""
    rates = baseline_rates(run, sets["holdout"], judge)["rates"]
    return {"refusal_rate": rates["refused"]["rate"], "refusal_ci": rates["refused"]["ci95"],
            "genuine_rate": rates["genuine_strong_comply"]["rate"], "degenerate_rate": rates["degenerate"]["rate"],
            "n": rates["refused"]["n"], "n_mcq": settings.n_mcq,
            "mcq_accuracy": _mcq(lm, settings, None),
            "perplexity": perplexity(lm, [p.prompt for p in sets["kl_eval"]])["perplexity"]}


def _mcq(lm: LoadedModel, settings: SearchSettings, steer) -> float | None:
    """MCQ accuracy on ``settings.n_mcq`` items of the built-in probe (None with ``n_mcq`` 0)."""
    if settings.n_mcq == 0:
        return None
    return mcq_accuracy(lm, mcq_items(settings.n_mcq, settings.seed), steer)["accuracy"]


def evaluate_point(run: RunDir, lm: LoadedModel, method, settings: SearchSettings, sets: dict,
                   generation: GenerationSettings, judge: Judge, baseline: dict[str, Any], *,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """One front point once on the held-out prompts: rates, both KLs, MCQ accuracy, perplexity ratio."""
    held = held_out_evaluation(run, lm, method, 1.0, sets, generation, judge=judge, log=log)["held_out"]
    steer = method.factory(lm, 1.0)
    rates = held["rates"]
    return {"refusal_rate": rates["refused"]["rate"], "refusal_ci": rates["refused"]["ci95"],
            "genuine_rate": rates["genuine_strong_comply"]["rate"], "degenerate_rate": rates["degenerate"]["rate"],
            "kl_base_to_steered": held["kl_base_to_steered"], "kl_steered_to_base": held["kl_steered_to_base"],
            "mcq_accuracy": _mcq(lm, settings, steer),
            "perplexity_ratio": perplexity(lm, [p.prompt for p in sets["kl_eval"]], steer)["perplexity"]
            / baseline["perplexity"],
            "n": rates["refused"]["n"], "rates": rates}


def load_front(study_path: Path) -> tuple[Path, dict[str, Any]]:
    """``RUN_DIR/STUDY`` → (run directory, ``analysis/front_<STUDY>.json``), or one line naming the command."""
    run_dir, study = Path(study_path).parent, Path(study_path).name
    path = RunDir(run_dir).analysis_path(f"front_{study}")
    if not path.is_file():
        raise TorsionError(f"{path} is missing; run `torsion optimize {run_dir} --method weighted-ablation --multi "
                           f"--study {study}` first (--from-study takes RUN_DIR/STUDY)")
    rerun = f"`torsion optimize {run_dir} --method weighted-ablation --multi --study {study}`"
    front = read_json(path, fix=f"delete it and run {rerun} again")
    points = front.get("points")
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise TorsionError(f"{path} has no front points; delete it and run {rerun} again")
    if not all(isinstance(p.get("heldout"), dict) for p in points):
        raise TorsionError(f"{path} has no held-out evaluation of its front; run {rerun} without --no-evaluate")
    if not _well_formed(front):
        raise TorsionError(f"{path} is not a front file this torsion wrote (missing or mistyped fields); delete it "
                           f"and run {rerun} again")
    return run_dir, front


def _well_formed(front: dict[str, Any]) -> bool:
    """The fields ``orthogonalize --from-study`` reads, with their types (a damaged file fails in one line)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    strings = all(isinstance(front.get(k), str) for k in ("study", "vector_key", "vector_sha256", "sampler"))
    numbers = all(number(front.get(k)) for k in ("n_trials", "hypervolume_train", "hypervolume_heldout"))
    prompts = isinstance(front.get("prompts"), dict) and isinstance(front["prompts"].get("n"), dict)
    reference = isinstance(front.get("reference_point"), list)
    for point in front["points"]:
        held, train, params = point["heldout"], point.get("train"), point.get("method_params")
        if not (isinstance(train, dict) and isinstance(params, dict) and number(point.get("trial"))):
            return False
        if not all(number(held.get(k)) for k in ("refusal_rate", "kl_base_to_steered", "kl_steered_to_base",
                                                   "perplexity_ratio", "n")):
            return False
        if not all(number(train.get(k)) for k in ("refusal_rate", "kl", "kl_steered_to_base", "n")):
            return False
        if set(params) != {"peak_weight", "peak_position", "width", "floor", "direction_index", "components"}:
            return False
    baseline = front.get("baseline")
    return strings and numbers and prompts and reference and (baseline is None or isinstance(baseline, dict))
