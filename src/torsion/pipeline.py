"""The main job: prompts -> responses -> labels -> activations -> vectors -> rotation -> report.

The steering-method comparison (``methods``) runs only when the config names methods
(``--profile paper`` does; ``quick`` and ``smoke`` do not).

Each stage writes its files atomically and is marked done in ``manifest.json``; a re-run
skips finished stages and a killed stage resumes from its own checkpoint.

Example::

    run_pipeline(RunConfig.from_profile("smoke"), Path("runs/smoke"))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Callable


import torsion
from torsion.analysis.categories import run_categories
from torsion.analysis.propagation import run_propagation
from torsion.analysis.random_control import run_random_control
from torsion.analysis.rotation import run_rotation
from torsion.capture import capture_to_file, load_activations
from torsion.config import RunConfig
from torsion.conventions import LAYER_INDEXING
from torsion.data import build_prompt_set, read_prompts_jsonl, write_prompts_jsonl
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings, generate_responses
from torsion.judge import get_judge
from torsion.judge.base import Judge
from torsion.models import LoadedModel, load_model, resolve_spec
from torsion.report import build_report
from torsion.review import read_decisions, review_analysis, review_set, summarize
from torsion.runs import fit_rows, fit_scores, labelled_prompts
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import SteeringVector, fit_vectors, save_vectors

STAGES = ("prompts", "generate", "capture", "vectors", "rotation", "propagation", "random_control",
          "categories", "report")  # and "methods" before the report when the config names methods (paper)
_VERSIONED = ("torch", "transformers", "safetensors", "numpy", "scipy", "gguf", "garak")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torsion": torsion.__version__}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def dataset_sha256(prompts) -> str:
    """Hash of the prompt set and its split: same prompts, same split, same hash."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(f"{p.id}\t{p.prompt_hash}\t{p.split}\n".encode())
    return digest.hexdigest()


# settings that change how fast a stage runs, never what it computes (greedy tokens and captured
# activations do not depend on the batch): a resume may change them
THROUGHPUT_SETTINGS = frozenset({"generation_batch_size", "capture_batch_size"})


def _check_config(run: RunDir, config: RunConfig) -> None:
    previous = run.manifest().get("config")
    if previous is None:
        return
    current = config.to_dict()
    changed = sorted(k for k in previous if previous[k] != current.get(k) and k not in THROUGHPUT_SETTINGS)
    if changed:
        raise TorsionError(
            f"{run.root} was made with different settings ({', '.join(changed)}); "
            "use a new --out directory, or the same settings to resume"
        )


def fit_run_vectors(run: RunDir, config: RunConfig, prompts: list, responses: list[dict]) -> None:
    """Every method × component (global and per category) on the train split: ``vectors.safetensors``."""
    activations, _ = load_activations(run.activations_path)
    rows = fit_rows(prompts, responses)
    scores = fit_scores(responses, rows)  # after false-positive correction and review
    provenance = {
        **run.manifest().get("model", {}),
        "position": config.positions[0],
        "layer_indexing": LAYER_INDEXING,
        "prompt_ids_sha256": hashlib.sha256("\n".join(prompts[i].id for i in rows).encode()).hexdigest(),
        "split": "train",
        "torsion_version": torsion.__version__,
    }
    vectors: dict[str, SteeringVector] = {}
    for component in config.components:
        train = activations[component][rows]
        for method in config.methods:
            fitted = fit_vectors(train, scores, method=method, categories=[prompts[i].category for i in rows],
                                 lam=config.ridge_lambda, lam_mode=config.ridge_lambda_mode)
            for category, vector in fitted.items():
                key = f"{method}/{component}" + (f"/{category}" if category else "")
                vectors[key] = SteeringVector(vector.directions, {**vector.meta, **provenance, "component": component})
    save_vectors(run.vectors_path, vectors, run_meta={"config": config.to_dict()})


def run_pipeline(config: RunConfig, out: Path, *, judge: Judge | None = None,
                 log: Callable[[str], None] = print) -> RunDir:
    """Run (or resume) every stage of the main job into ``out``.

    ``judge`` overrides ``config.judge`` (a library caller's own labeller).
    """
    resolve_spec(config.model)  # fail fast on a bad spec or missing assets, before any work
    run = RunDir(out)
    _check_config(run, config)
    if not run.manifest():
        run.update_manifest(torsion_version=torsion.__version__, seed=config.seed, versions=package_versions())
    run.update_manifest(config=config.to_dict())  # settings added since the run began are recorded too
    lm: LoadedModel | None = None

    def model() -> LoadedModel:
        nonlocal lm
        if lm is None:
            log(f"loading {config.model}")
            lm = load_model(config.model, dtype=config.dtype, device=config.device)
            run.update_manifest(model={"spec": config.model, "model_id": lm.model_id,
                                       "weights_sha256": lm.weights_sha256, "n_layers": lm.n_layers,
                                       "d_model": lm.d_model, "dtype": config.dtype,
                                       "device": str(lm.device)})
        return lm

    if not run.stage_done("prompts"):
        with run.stage("prompts", invalidates=("report",)):
            prompts = build_prompt_set(config.sources, n_per_source=config.n_per_source,
                                       holdout_fraction=config.holdout_fraction, seed=config.seed)
            write_prompts_jsonl(run.prompts_path, prompts)
            run.update_manifest(dataset_sha256=dataset_sha256(prompts), n_prompts=len(prompts))
    prompts = read_prompts_jsonl(run.prompts_path)
    log(f"{len(prompts)} prompts ({sum(p.split == 'holdout' for p in prompts)} held out)")

    if not run.stage_done("generate"):
        settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                      seed=config.seed, batch_size=config.generation_batch_size)
        run.update_manifest(generation=settings.__dict__)
        with run.stage("generate", invalidates=("report",)):
            generate_responses(model(), prompts, run.responses_path, settings=settings,
                               judge=judge or get_judge(config.judge))
    prompts, responses = labelled_prompts(run)

    if not run.stage_done("capture"):
        with run.stage("capture", invalidates=("report",)):
            capture_to_file(model(), [p.prompt for p in prompts], run.activations_path,
                            components=config.components, positions=config.positions,
                            batch_size=config.capture_batch_size)
    if not run.stage_done("vectors"):
        with run.stage("vectors", invalidates=("report",)):
            fit_run_vectors(run, config, prompts, responses)

    if not run.stage_done("rotation"):
        with run.stage("rotation", invalidates=("report",)):
            run_rotation(run.root, B=config.bootstrap, P=config.null_permutations,
                         n_splits=config.split_halves, seed=config.seed)

    if not run.stage_done("propagation"):
        with run.stage("propagation", invalidates=("report",)):
            run_propagation(run.root, model(), n_prompts=config.propagation_prompts, seed=config.seed)
    if not run.stage_done("random_control"):
        with run.stage("random_control", invalidates=("report",)):
            run_random_control(run.root, model(), n_random=config.random_directions,
                               n_prompts=config.random_control_prompts, seed=config.seed)
    if not run.stage_done("categories"):
        with run.stage("categories", invalidates=("report",)):
            run_categories(run.root)

    if config.compare_methods and not run.stage_done("methods"):
        from torsion.analysis.methods import CompareSettings, run_methods

        with run.stage("methods", invalidates=("report",)):
            compare = CompareSettings(methods=config.compare_methods, n_trials=config.compare_trials,
                                      curve_points=config.compare_curve_points, seed=config.seed)
            run_methods(run.root, model(), compare, judge=judge, log=log)

    if not run.stage_done("report"):
        with run.stage("report"):
            reviewed = review_set(run.root)  # judge -> false-positive correction -> (pending) human review
            atomic_write_json(run.analysis_path("review"),
                              review_analysis(reviewed, summarize(reviewed, read_decisions(run.root))))
            build_report(run.root)
    log(f"report: {run.report_path}")
    return run
