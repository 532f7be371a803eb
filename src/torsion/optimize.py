"""Strength search and held-out evaluation (methods.md, "Layer selection and strength").

The search steers with one steering method (:mod:`torsion.steering`, default ``flat``: ``α · v_l``
on the top-``k`` blocks of a run by train-split AUC, :func:`select_layers`) built from the run
(:func:`torsion.steering.from_run.run_method`) and scores each strength (``α``, ``β`` or ``t``,
the method's ``strength_name``) on train-split prompts through ``method.bind(lm)``:

- comply objective: ``mean_score + w · min(KL, cap)`` (minimised);
- refuse objective: ``−mean_score + w · min(KL, cap)``;

where scores are after false-positive correction (an ``fp_refuse`` scores +0.5), a degenerate
response adds +2 to the minimised value in **both** objectives (score +2 in the comply
objective, −2 in the refuse one), and ``KL = kl_base_to_steered`` at the first token of a
neutral probe set. Responses are labelled by the run's own judge unless the caller passes
another; the judge is part of the study's spec. An optional capability penalty adds
``w_mcq · max(0, acc_base − acc)`` (MCQ accuracy) and ``w_ppl · max(0, log(ppl / ppl_base))``
(perplexity of the probe texts). Trials live in an Optuna storage (:mod:`torsion.search`):
resumable, shareable by several workers.

The chosen strength is then frozen and evaluated once on the holdout split, which chose nothing:
vectors, layers and knots were fit on train rows, the strength on train prompts, and the KL probe is one
half of the neutral set while the held-out KL uses the other half.

Example::

    settings = SearchSettings(objective="comply", n_trials=12)
    result = run_optimize(Path("runs/quick"), lm, settings)   # judge: the run's own
    result["held_out"]["rates"]["strong_comply"], result["in_sample"]["rates"]["strong_comply"]
    run_optimize(Path("runs/quick"), lm, SearchSettings(method="ablation"))   # beta in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torsion.behaviour import evaluate_behaviour, result_rows
from torsion.conventions import LAYER_INDEXING
from torsion.data import Prompt, load_mcq, sample
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.judge.base import Judge
from torsion.judge.correction import Corrected
from torsion.metrics import first_token_kl, mcq_accuracy, perplexity
from torsion.models import LoadedModel
from torsion.objective import (DEGENERATE_PENALTY, capability_penalty, objective_score,  # noqa: F401 (re-exported)
                               strength_objective)
from torsion.runs import labelled_prompts, neutral_halves, recorded_judge, row_behaviour, run_judge
from torsion.search import best_params, open_study, redact_url, run_worker, storage_url
from torsion.selection import DEFAULT_WINDOW, eligible_layers, select_layers
from torsion.steering.base import SteeringMethod
from torsion.steering.from_run import run_method
from torsion.store import RunDir, atomic_write_json, read_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1
OBJECTIVES = ("comply", "refuse")
# Settings that do not define the objective (methods.md): a resumed study may change them.
NOT_OBJECTIVE = ("prune", "n_trials", "batch_size", "seed")


@dataclass(frozen=True)
class SearchSettings:
    """One strength search with steering method ``method`` (``flat``: ``alpha`` multiplies the raw ``v_l``).

    ``alpha_range`` is the search range of the method's strength (default: the method's own,
    :meth:`~torsion.steering.base.SteeringMethod.search_range`); ``method_params`` override method
    parameters (``--param``); ``manifold`` is the splines' manifold file (default the run's own).
    """

    objective: str = "comply"
    key: str = "md/resid"
    category: str | None = None
    top_k: int = 4
    layer_window: tuple[float, float] = DEFAULT_WINDOW
    alpha_range: tuple[float, float] | None = None  # default: the method's search_range(objective)
    n_trials: int = 12
    sampler: str = "tpe"
    prune: bool = True
    n_prompts: int = 24
    n_kl_prompts: int = 16
    kl_weight: float = 1.0
    kl_cap: float = 10.0  # high enough that a degenerate push (score +2) cannot buy its KL back
    mcq_weight: float = 0.0
    perplexity_weight: float = 0.0
    n_mcq: int = 40
    positions: str = "all"
    batch_size: int = 8
    seed: int = 0
    method: str = "flat"
    method_params: Mapping[str, Any] | Sequence[Sequence[Any]] = ()
    manifold: str | None = None
    multi: bool = False  # two objectives, refusal rate and KL (torsion.optimize_multi)

    def __post_init__(self) -> None:
        from torsion.steering.registry import method_class

        if self.objective not in OBJECTIVES:
            raise TorsionError(f"unknown objective {self.objective!r}; choose comply or refuse")
        object.__setattr__(self, "method", method_class(self.method).name)
        pairs = self.method_params.items() if isinstance(self.method_params, Mapping) else self.method_params
        object.__setattr__(self, "method_params", tuple(sorted((str(k), v) for k, v in pairs)))
        if self.manifold is not None:
            object.__setattr__(self, "manifold", str(self.manifold))
        for name in ("kl_weight", "kl_cap", "mcq_weight", "perplexity_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TorsionError(f"{name} = {value} must be finite and >= 0")
        if self.n_prompts < 1 or self.n_kl_prompts < 1:
            raise TorsionError("--n-prompts and --n-kl-prompts must be at least 1")
        if self.batch_size < 1:
            raise TorsionError(f"batch_size = {self.batch_size}; pass at least 1 prompt per batch")
        if self.alpha_range is not None:
            low, high = self.alpha_range
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise TorsionError(f"the search range needs low < high, got [{low}, {high}]; fix --alpha-range")
        eligible_layers(100, self.layer_window)  # checks the window
        if self.multi:
            from torsion.optimize_multi import check_multi

            check_multi(self)
            if self.sampler not in ("tpe", "nsga2"):
                raise TorsionError(f"--multi samples several parameters; choose --sampler tpe or nsga2, "
                                   f"not {self.sampler}")
            object.__setattr__(self, "prune", False)  # Optuna prunes single-objective studies only
        elif self.sampler == "nsga2":
            raise TorsionError("nsga2 is a multi-objective sampler; add --multi, or choose --sampler tpe or grid")
        if self.sampler == "grid":  # a grid is a complete curve: every point runs to the end
            object.__setattr__(self, "prune", False)
        if self.perplexity_weight and self.positions != "all":
            raise TorsionError("the perplexity penalty scores every position, so it needs --positions all")

    @property
    def scope(self) -> str:
        return self.category or "global"

    @property
    def study_name(self) -> str:
        """``<objective>-<scope>``, or ``multi-<method>-<objective>`` for a multi-objective search."""
        return f"multi-{self.method}-{self.objective}" if self.multi else f"{self.objective}-{self.scope}"

    @property
    def vector_key(self) -> str:
        return f"{self.key}/{self.category}" if self.category else self.key


def check_vector(run_dir: Path, settings: SearchSettings) -> None:
    """Fail before any model is loaded when the run lacks the vector the search steers with."""
    vectors = load_vectors(RunDir(run_dir).vectors_path)
    if settings.vector_key not in vectors:
        raise TorsionError(f"{RunDir(run_dir).vectors_path} has no vector {settings.vector_key!r}; choose --key and "
                           f"--category from: {', '.join(sorted(vectors))}")


def prompt_sets(run: RunDir, settings: SearchSettings) -> dict[str, list[Prompt]]:
    """The prompts each step uses: ``search`` (train split), ``holdout``, ``kl_probe``, ``kl_eval``."""
    prompts, _ = labelled_prompts(run)
    if settings.category is not None:
        prompts = [p for p in prompts if p.category == settings.category]
        if not prompts:
            raise TorsionError(f"the run has no prompts in category {settings.category!r}; "
                               "use one of the categories in prompts.jsonl")
    train = [p for p in prompts if p.split == "train"]
    holdout = [p for p in prompts if p.split == "holdout"]
    if not train or not holdout:
        raise TorsionError(f"scope {settings.scope!r} has {len(train)} train and {len(holdout)} held-out prompts; "
                           "a search needs both (use a run with a holdout fraction > 0, or a larger category)")
    probe, evaluation = neutral_halves(run)
    return {"search": sample(train, settings.n_prompts, seed=settings.seed), "holdout": holdout,
            "kl_probe": sample(probe, settings.n_kl_prompts, seed=settings.seed),
            "kl_eval": sample(evaluation, settings.n_kl_prompts, seed=settings.seed)}


def _ids_sha256(prompts: list[Prompt]) -> str:
    return hashlib.sha256("\n".join(p.id for p in prompts).encode()).hexdigest()


def mcq_items(n: int, seed: int) -> list:
    """``n`` items of the built-in MCQ probe (all if fewer), drawn by ``seed``, in file order."""
    items = load_mcq()
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))]


def capability(lm: LoadedModel, settings: SearchSettings, probe: list[Prompt], steer=None) -> dict[str, float]:
    """The capability metrics the penalty uses (only those with a non-zero weight)."""
    measured: dict[str, float] = {}
    if settings.mcq_weight:
        measured["mcq_accuracy"] = mcq_accuracy(lm, mcq_items(settings.n_mcq, settings.seed), steer)["accuracy"]
    if settings.perplexity_weight:
        measured["perplexity"] = perplexity(lm, [p.prompt for p in probe], steer)["perplexity"]
    return measured


def _trial_objective(lm: LoadedModel, settings: SearchSettings, method: SteeringMethod, sets: dict[str, list[Prompt]],
                     generation: GenerationSettings, base_capability: dict[str, float], judge: Judge):
    import optuna

    low, high = settings.alpha_range
    steering, name = method.bind(lm), method.strength_name
    search = [p.prompt for p in sets["search"]]
    probe = [p.prompt for p in sets["kl_probe"]]

    def objective(trial) -> float:
        start = time.perf_counter()
        strength = trial.suggest_float(name, low, high)
        kl = first_token_kl(lm, probe, steering(strength))
        measured = capability(lm, settings, sets["kl_probe"], steering(strength)) if base_capability else {}
        penalty = capability_penalty(base_capability, measured, mcq_weight=settings.mcq_weight,
                                     perplexity_weight=settings.perplexity_weight)

        def value(rows: Sequence[Corrected]) -> float:
            return strength_objective(settings.objective, rows, kl["kl_base_to_steered"],
                                      kl_weight=settings.kl_weight, kl_cap=settings.kl_cap, penalty=penalty)

        def on_batch(step: int, rows: Sequence[Corrected]) -> None:
            if objective_score(settings.objective, rows) is None or not settings.prune:
                return
            trial.report(value(rows), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{name}={strength:.3f} after {step + 1} batch(es)")

        result = evaluate_behaviour(lm, search, steering(strength), generation, judge=judge, on_batch=on_batch,
                                    desc=f"trial {trial.number} {name}={strength:+.3f}")
        rows = result_rows(result)
        trial.set_user_attr("evaluation", {
            name: strength, "strength": strength, "mean_score": result["mean_score"],
            "objective_score": objective_score(settings.objective, rows), "rates": result["rates"],
            "kl_base_to_steered": kl["kl_base_to_steered"], "kl_steered_to_base": kl["kl_steered_to_base"],
            "capability": measured, "penalty": penalty, "applied_norm": result["steering"]["applied_norm"],
            "mean_delta_norm": result["steering"]["mean_delta_norm"],
            "labels": result["labels"], "corrections": result["corrections"], "responses": result["responses"],
            "seconds": round(time.perf_counter() - start, 2)})
        return value(rows)

    return objective


def run_generation_settings(run: RunDir, settings: SearchSettings) -> GenerationSettings:
    """Greedy decoding of the run's own length, so the run's responses are the unsteered baseline."""
    recorded = run.manifest().get("generation", {})
    if float(recorded.get("temperature", 0.0)) != 0.0:
        raise TorsionError(f"{run.root} was generated with temperature {recorded['temperature']}, but the search "
                           "compares greedy steered responses with the run's own; use a greedy run (temperature 0)")
    return GenerationSettings(max_new_tokens=int(recorded.get("max_new_tokens", 32)),
                              batch_size=settings.batch_size)


def baseline_rates(run: RunDir, prompts: list[Prompt], judge: Judge) -> dict[str, Any]:
    """Unsteered class rates of the run's own responses (same greedy decoding and length) under the
    labelling the trials use: the run's stored labels, corrections and review decisions when
    ``judge`` is the run's judge, else the responses judged again by ``judge``."""
    from torsion.behaviour import class_rates, correct_rows, mean_score

    _, responses = labelled_prompts(run)
    by_id = {r["id"]: r for r in responses}
    texts, generated = [p.prompt for p in prompts], [by_id[p.id]["response"] for p in prompts]
    if judge.name == recorded_judge(responses):
        labels = [by_id[p.id]["label"] for p in prompts]
        rows = [row_behaviour(by_id[p.id]) for p in prompts]
        source = "responses.jsonl labels, corrections and review decisions"
    else:
        labels = [v.label for v in judge.judge(texts, generated)]
        rows = correct_rows(texts, generated, labels)
        source = "responses.jsonl texts, judged again"
    return {"n_prompts": len(prompts), "mean_score": mean_score(rows), "source": source, "judge": judge.name,
            "rates": class_rates(texts, generated, labels, rows=rows)}


def search_method(run: RunDir, lm: LoadedModel,
                  settings: SearchSettings) -> tuple[SteeringMethod, dict, SearchSettings]:
    """The search's steering method, its record, and ``settings`` with the strength range resolved.

    The method steers the run's ``settings.vector_key`` vector; blocks are the top-``k`` by
    train-split AUC (:func:`select_layers`), recorded in the record's ``selection``.
    """
    check_vector(run.root, settings)
    vector = load_vectors(run.vectors_path, d_model=lm.d_model)[settings.vector_key]
    selection = select_layers(run.root, key=settings.vector_key, k=settings.top_k, window=settings.layer_window)
    method, record = run_method(run, lm, settings.method, vectors=vector.directions, layers=selection["layers"],
                                component=settings.key.split("/")[1], positions=settings.positions,
                                params=dict(settings.method_params), manifold=settings.manifold)
    record.update(selection=selection, vector_sha256=hashlib.sha256(vector.directions.numpy().tobytes()).hexdigest())
    if settings.alpha_range is None:
        settings = replace(settings, alpha_range=tuple(method.search_range(settings.objective)))
    return method, record, settings


def run_optimize(run_dir: Path, lm: LoadedModel, settings: SearchSettings, *, storage: str | None = None,
                 study_name: str | None = None, evaluate: bool = True, judge: Judge | None = None,
                 heartbeat_interval: int = 10, grace_period: int = 60, write: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or join, or resume) the search; then freeze the best strength and evaluate it on the holdout.

    ``judge`` labels every trial, the baselines and the holdout (default: the run's own,
    :func:`~torsion.runs.run_judge`). Writes ``analysis/optimize_<study>.json`` (the held-out part
    only with ``evaluate``; nothing with ``write=False``, for callers that keep their own record)
    and returns it; it holds data only (``torsion.report`` draws the figure). Trials live in
    ``storage`` (default SQLite ``run_dir/optimize.db``).
    """
    run = RunDir(run_dir)
    judge = judge or run_judge(run)
    study_name = study_name or settings.study_name
    method, method_record, settings = search_method(run, lm, settings)
    selection = method_record.pop("selection")
    vector_sha256 = method_record.pop("vector_sha256")
    layers = list(method.steered_layers) or list(range(lm.n_layers))
    component = settings.key.split("/")[1]
    strength_name = method.strength_name
    sets = prompt_sets(run, settings)
    generation = run_generation_settings(run, settings)
    scale = {k: v for k, v in asdict(settings).items() if k not in NOT_OBJECTIVE}
    spec = {"settings": json.loads(json.dumps(scale)), "layers": layers, "component": component,
            "vector_sha256": vector_sha256, "method": json.loads(json.dumps(method_record)),
            "weights_sha256": lm.weights_sha256, "max_new_tokens": generation.max_new_tokens,
            "judge": judge.name, "degenerate_penalty": DEGENERATE_PENALTY,
            **{f"{name}_ids_sha256": _ids_sha256(prompts) for name, prompts in sets.items() if name != "holdout"}}
    url = storage_url(run.root, storage)
    study = open_study(url, study_name, spec, n_trials=settings.n_trials, param=strength_name,
                       low=settings.alpha_range[0],
                       high=settings.alpha_range[1], sampler=settings.sampler, seed=settings.seed,
                       prune=settings.prune, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    base_capability = capability(lm, settings, sets["kl_probe"])
    log(f"study {study_name} in {redact_url(url)}: {method.name} on layers {layers}, {strength_name} in "
        f"{list(settings.alpha_range)}, {settings.n_trials} trials ({settings.sampler}), judge {judge.name}")
    objective = _trial_objective(lm, settings, method, sets, generation, base_capability, judge)
    summary = run_worker(study, objective, log=log)
    strength = best_params(summary)[strength_name]
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "analysis": "optimize", "study": study_name,
        "storage": redact_url(url), "objective": settings.objective, "scope": settings.scope,
        "settings": json.loads(json.dumps(asdict(settings))), "vector_key": settings.vector_key,
        "judge": judge.name, "method": method_record,
        "conventions": {"layer_indexing": LAYER_INDEXING, "method": method.name,
                        "strength": f"{strength_name}: {(type(method).__doc__ or '').strip().splitlines()[0]}",
                        "component": component, "positions": settings.positions,
                        "kl": "kl_base_to_steered, first token, neutral probe half",
                        "objective": "comply: mean_score + w*min(KL, cap); refuse: -mean_score + w*min(KL, cap); "
                                     "a degenerate response adds +2 to the minimised value in both",
                        "scores": "after false-positive correction (fp_refuse +0.5)",
                        "rates": "share of judged rows (judge errors excluded), Wilson 95%; refused = refused/judged"},
        "layers": layers, "layer_selection": {k: v for k, v in selection.items() if k != "prompt_ids"},
        "trials": [_trial_row(t, strength_name) for t in summary["trials"]],
        "best": _trial_row(summary["best"], strength_name),
        "strength_name": strength_name, "strength": strength, strength_name: strength,
        "in_sample": {**summary["best"]["user_attrs"]["evaluation"], "n_prompts": len(sets["search"])},
        "baseline_in_sample": baseline_rates(run, sets["search"], judge),
        "prompt_ids": {"fit_and_layer_selection": selection["prompt_ids"],
                       **{name: [p.id for p in prompts] for name, prompts in sets.items()}},
    }
    path = run.analysis_path(f"optimize_{study_name}")
    existing = read_json(path) if path.is_file() else {}
    if write and "held_out" in existing and existing.get("best") == result["best"] \
            and existing.get("storage") == result["storage"]:
        log(f"held-out evaluation of trial {result['best']['number']} already in {path}; not repeated")
        return existing  # the holdout is evaluated once per chosen trial, by whichever worker got there first
    if evaluate:
        result.update(held_out_evaluation(run, lm, method, strength, sets, generation, judge=judge, log=log))
    if write:
        atomic_write_json(path, result)
    return result


def _trial_row(trial: dict[str, Any] | None, strength_name: str) -> dict[str, Any] | None:
    """A trial for the result file: number, state, value, strength and its rates (no response texts)."""
    if trial is None:
        return None
    evaluation = {k: v for k, v in trial["user_attrs"].get("evaluation", {}).items()
                  if k not in ("responses", "labels", "corrections")}
    return {"number": trial["number"], "state": trial["state"], "value": trial["value"],
            "strength": trial["params"].get(strength_name), strength_name: trial["params"].get(strength_name),
            **evaluation}


def held_out_evaluation(run: RunDir, lm: LoadedModel, method: SteeringMethod, strength: float,
                        sets: dict[str, list[Prompt]], generation: GenerationSettings, *, judge: Judge,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The frozen strength once on the holdout split, its baseline, and the KL on the held-out neutral half."""
    log(f"held-out evaluation at {method.strength_name}={strength:+.4f} on {len(sets['holdout'])} prompts")
    held_out = evaluate_behaviour(lm, [p.prompt for p in sets["holdout"]], method.factory(lm, strength), generation,
                                  judge=judge, desc="held-out")
    kl = first_token_kl(lm, [p.prompt for p in sets["kl_eval"]], method.factory(lm, strength))
    return {"held_out": {**held_out, "kl_base_to_steered": kl["kl_base_to_steered"],
                         "kl_steered_to_base": kl["kl_steered_to_base"], "kl_prompts": "kl_eval"},
            "baseline_held_out": baseline_rates(run, sets["holdout"], judge)}


def load_result(run_dir: Path, study_name: str) -> dict[str, Any]:
    """``analysis/optimize_<study>.json``, or an error naming the command that makes it."""
    path = RunDir(run_dir).analysis_path(f"optimize_{study_name}")
    if not path.is_file():
        objective, _, scope = study_name.partition("-")
        category = "" if scope == "global" else f" --category {scope}"
        raise TorsionError(f"{path} is missing; run `torsion optimize {run_dir} --objective {objective}{category}` "
                           "first (or pass the --scope of the searches you ran)")
    return read_json(path, fix=f"delete it and run `torsion optimize {run_dir}` again")


def search_categories(run_dir: Path, key: str) -> list[str]:
    """Categories that have a ``key/<category>`` vector in the run (the per-category searches)."""
    vectors = load_vectors(RunDir(run_dir).vectors_path)
    categories = sorted(k[len(key) + 1:] for k in vectors if k.startswith(key + "/"))
    if not categories:
        raise TorsionError(f"the run has no per-category vectors under {key!r}; run `torsion run` with categories")
    return categories
