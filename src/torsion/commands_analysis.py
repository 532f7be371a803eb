"""What ``torsion analyze`` and ``torsion optimize`` do (the parser is :mod:`torsion.cli_analysis`).

Every function takes the parsed arguments and returns an exit status; heavy imports happen
inside, so ``torsion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torsion.errors import TorsionError


def run_model_spec(run_dir: Path, given: str | None) -> str:
    from torsion.store import RunDir

    if given:
        return given
    run = RunDir(run_dir)
    if not run.manifest_path.is_file():
        raise TorsionError(f"{run_dir} is not a run directory (no manifest.json); pass the output of `torsion run`")
    return run.manifest().get("model", {}).get("spec") or "embedded:qwen2.5-coder-0.5b"


def _one_alpha(alphas: list[float]) -> float:
    if len(alphas) != 1:
        raise TorsionError(f"this analysis takes one --alpha, got {len(alphas)}; only arditi takes several")
    return alphas[0]


# The run files each analysis reads (besides manifest.json), checked before any model loads.
_ANALYSIS_INPUTS = {
    "rotation": ("prompts", "responses", "activations"),
    "propagation": ("prompts", "vectors"),
    "random-control": ("prompts", "vectors"),
    "categories": ("prompts", "responses", "activations", "vectors"),
    "arditi": ("prompts", "responses", "activations", "vectors"),
    "asymmetry": ("prompts", "responses", "vectors"),
    "motion": ("prompts", "responses", "vectors"),
    "hedge": ("prompts", "responses", "vectors"),
    "stability": ("prompts", "responses", "activations"),
    "methods": ("prompts", "responses", "activations", "vectors"),
}


def _check_run_for(name: str, run_dir: Path, layers: list[int] | None, component: str) -> int:
    """Refuse a run directory that lacks ``name``'s inputs (files, the ``md/<component>`` vector), or
    ``layers`` past its model's blocks.

    Returns the run's seed (manifest.json), the default of every analysis's ``--seed``.
    """
    from torsion.data import read_prompts_jsonl
    from torsion.store import RunDir
    from torsion.vector_file import vector_keys

    run = RunDir(run_dir)
    manifest = run.manifest()
    for stem in _ANALYSIS_INPUTS[name]:
        path = getattr(run, f"{stem}_path")
        if not path.is_file():
            raise TorsionError(f"{run_dir} has no {path.name}, which `torsion analyze {name}` reads; finish the "
                               "run (re-run the `torsion run` command that made it), or run again into a new "
                               "directory if the file was removed")
    read_prompts_jsonl(run.prompts_path)  # a damaged row fails here, with its line, before any work
    if "responses" in _ANALYSIS_INPUTS[name]:
        run.responses()
    if name in ("propagation", "random-control", "arditi", "motion", "hedge"):
        keys = vector_keys(run.vectors_path)
        fitted = ", ".join(key.removeprefix("md/") for key in keys if key.startswith("md/") and key.count("/") == 1)
        for key in sorted({f"md/{component}", "md/resid"} if name == "propagation" else {f"md/{component}"}):
            if key not in keys:
                raise TorsionError(f"{run.vectors_path} has no vector {key!r}; pass a --component the run fitted "
                                   f"({fitted or 'none'})")
    n_layers = manifest.get("model", {}).get("n_layers") if isinstance(manifest.get("model"), dict) else None
    if layers and isinstance(n_layers, int) and max(layers) >= n_layers:
        raise TorsionError(f"--layers {max(layers)} is out of range; the run's model has blocks 0..{n_layers - 1}")
    seed = manifest.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TorsionError(f"{run.manifest_path} has seed {seed!r}, not a whole number; fix it or pass --seed")
    return seed


def _or_default(value: int | None, default: int) -> int:
    """``value`` unless it was not given (None): a user's 0 is never replaced by the default."""
    return default if value is None else value


def _steering_options(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """``--method``/``--param``/``--manifold`` as keyword arguments of the causal analyses (checked up front)."""
    from torsion.steering.cli import parse_params
    from torsion.steering.from_run import check_manifold
    from torsion.store import RunDir

    method = getattr(args, "method", "flat") or "flat"
    params = parse_params(getattr(args, "param", []))
    if args.name not in ("propagation", "random-control", "motion", "hedge"):
        if method != "flat" or params:
            raise TorsionError(f"--method and --param apply to propagation, random-control, motion and hedge, "
                               f"not {args.name}; drop them")
        return {}
    check_manifold(RunDir(run_dir), method, args.manifold)
    return {"steering": method, "steering_params": params, "manifold": args.manifold}


def analyze(args: argparse.Namespace) -> int:
    import json

    from torsion.report import build_report

    run_dir = args.run_dir
    run_seed = _check_run_for(args.name, run_dir, args.layers, args.component)
    steering = _steering_options(args, run_dir)  # a spline without its manifold fails before a model loads
    seed = run_seed if args.seed is None else args.seed
    if args.name == "rotation":
        from torsion.analysis.rotation import run_rotation

        result = run_rotation(run_dir, B=args.bootstrap, P=args.permutations, n_splits=args.split_halves,
                              seed=seed)
    elif args.name == "categories":
        from torsion.analysis.categories import run_categories

        result = run_categories(run_dir, component=args.component, layers=args.layers)
    elif args.name == "stability":
        from torsion.analysis.stability import run_stability

        result = run_stability(run_dir, B=args.subsamples, reference=args.reference, seed=seed)
    else:
        from torsion.models import load_model

        if args.name in ("motion", "hedge"):  # a readout block before the steered ones fails before a model loads
            from torsion.decoding_capture import check_readout

            check_readout(args.readout_blocks, k=args.k, steered_blocks=args.layers or ())
        if args.name == "methods":  # settings, vector, judge and manifold checked before a model is loaded
            from torsion.analysis.methods import DEFAULT_METHODS, CompareSettings, ensure_manifold
            from torsion.optimize import SearchSettings, check_vector
            from torsion.runs import run_judge
            from torsion.store import RunDir

            compare = CompareSettings(methods=args.methods or DEFAULT_METHODS, objectives=args.objectives,
                                      sampler=args.sampler, n_trials=args.trials, curve_points=args.curve_points,
                                      top_k=args.top_k, n_mcq=args.n_mcq,
                                      n_prompts=_or_default(args.n_prompts, 24), batch_size=args.batch_size,
                                      seed=seed, manifold=str(args.manifold) if args.manifold else None)
            check_vector(run_dir, SearchSettings())
            methods_judge = run_judge(RunDir(run_dir), args.judge)
            manifold = ensure_manifold(run_dir, compare, log=lambda message: print(message, file=sys.stderr))
        if args.name == "asymmetry":  # both searches must exist before a model is loaded
            from torsion.optimize import load_result

            for objective in ("comply", "refuse"):
                load_result(run_dir, f"{objective}-{args.scope}")
        lm = load_model(run_model_spec(run_dir, args.model), dtype=args.dtype or "float32",
                        device=args.device or "cpu")
        if args.layers and max(args.layers) >= lm.n_layers:
            raise TorsionError(f"--layers {max(args.layers)} is out of range; this model has blocks "
                               f"0..{lm.n_layers - 1}")
        if args.name == "propagation":
            from torsion.analysis.propagation import run_propagation

            result = run_propagation(run_dir, lm, sources=args.layers, component=args.component,
                                     alpha=-1.0 if args.alpha is None else _one_alpha(args.alpha),
                                     n_prompts=_or_default(args.n_prompts, 16), seed=seed, **steering)
        elif args.name == "random-control":
            from torsion.analysis.random_control import run_random_control

            result = run_random_control(run_dir, lm, layers=args.layers, component=args.component,
                                        alpha=1.0 if args.alpha is None else _one_alpha(args.alpha),
                                        n_random=args.n_random, n_prompts=_or_default(args.n_prompts, 32),
                                        seed=seed, **steering)
        elif args.name == "methods":
            from torsion.analysis.methods import run_methods

            result = run_methods(run_dir, lm, compare, judge=methods_judge, manifold=manifold,
                                 log=lambda message: print(message, file=sys.stderr))
        elif args.name == "asymmetry":
            from torsion.analysis.asymmetry import run_asymmetry

            result = run_asymmetry(run_dir, lm, scope=args.scope, n_neutral=_or_default(args.n_prompts, 32),
                                   log=lambda message: print(message, file=sys.stderr))
        elif args.name in ("motion", "hedge"):
            from torsion.analysis.motion_run import run_hedge, run_motion

            options = {"alphas": args.alpha, "layers": args.layers, "readout_blocks": args.readout_blocks,
                       "k": args.k, "n_prompts": _or_default(args.n_prompts, 16), "seed": seed, "B": args.bootstrap,
                       **steering}
            result = (run_motion(run_dir, lm, **options) if args.name == "motion"
                      else run_hedge(run_dir, lm, P=args.permutations, n_random=args.n_random, **options))
        else:
            from torsion.analysis.arditi import run_arditi

            alphas = (1.0,) if args.alpha is None else args.alpha
            result = run_arditi(run_dir, lm, component=args.component, alphas=alphas,
                                n_neutral=_or_default(args.n_prompts, 48), seed=seed)
    build_report(run_dir)
    name = result["analysis"]
    print(run_dir / "analysis" / f"{name}.json")
    if args.verbose:
        print(json.dumps(result, indent=2)[:20000])
    return 0


def optimize(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from torsion.models import load_model
    from torsion.optimize import SearchSettings, check_vector, run_optimize, search_categories
    from torsion.optimize_multi import DEFAULT_SAMPLER
    from torsion.runs import run_judge
    from torsion.store import RunDir
    from torsion.report import build_report
    from torsion.steering.cli import parse_params
    from torsion.steering.from_run import check_manifold

    settings = SearchSettings(
        objective=args.objective, key=args.key, category=args.category, top_k=args.top_k,
        layer_window=tuple(args.layer_window), alpha_range=tuple(args.alpha_range) if args.alpha_range else None,
        n_trials=args.trials, sampler=args.sampler or (DEFAULT_SAMPLER if args.multi else "tpe"),
        prune=not (args.no_prune or args.multi), n_prompts=args.n_prompts,
        n_kl_prompts=args.n_kl_prompts, kl_weight=args.kl_weight, kl_cap=args.kl_cap, mcq_weight=args.mcq_weight,
        perplexity_weight=args.perplexity_weight, n_mcq=args.n_mcq, positions=args.positions,
        batch_size=args.batch_size,
        seed=args.seed, method=args.method, method_params=parse_params(args.param),
        manifold=str(args.manifold) if args.manifold else None, multi=args.multi)
    scopes = [replace(settings, category=c) for c in search_categories(args.run_dir, args.key)] \
        if args.per_category else [settings]
    if args.study and len(scopes) > 1:
        raise TorsionError("--study names one study; drop it with --per-category (each category gets its own)")
    for scope in scopes:
        check_vector(args.run_dir, scope)
    check_manifold(RunDir(args.run_dir), args.method, args.manifold)
    judge = run_judge(RunDir(args.run_dir), args.judge)  # fails before the model loads
    lm = load_model(run_model_spec(args.run_dir, args.model), dtype=args.dtype or "float32",
                    device=args.device or "cpu")
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if settings.multi:
        from torsion.optimize_multi import run_optimize_multi

        front = run_optimize_multi(args.run_dir, lm, settings, storage=args.storage, study_name=args.study,
                                   evaluate=not args.no_evaluate, judge=judge, log=log)
        for point in front["points"]:
            held = point.get("heldout") or {}
            print(f"front {point['index']}\ttrial {point['trial']}\ttrain refusal {point['train']['refusal_rate']:.3f} "
                  f"KL {point['train']['kl']:.4f}" + (f"\theld-out refusal {held['refusal_rate']:.3f} "
                                                      f"KL {held['kl_base_to_steered']:.4f}" if held else ""))
        print(f"{args.run_dir / 'analysis' / ('front_' + front['study'] + '.json')}\thypervolume train "
              f"{front['hypervolume_train']:.4f} held-out {front['hypervolume_heldout']}")
        build_report(args.run_dir)
        return 0
    for scope in scopes:
        result = run_optimize(args.run_dir, lm, scope, storage=args.storage, study_name=args.study,
                              evaluate=not args.no_evaluate, judge=judge, log=log)
        held = result.get("held_out", {}).get("rates", {})
        summary = {"study": result["study"], "method": result["method"]["name"],
                   result["strength_name"]: result["strength"], "layers": result["layers"],
                   "in_sample": {k: result["in_sample"]["rates"][k]["rate"] for k in ("strong_comply", "refused")},
                   "held_out": {k: held[k]["rate"] for k in ("strong_comply", "refused")} if held else None}
        print(f"{args.run_dir / 'analysis' / ('optimize_' + result['study'] + '.json')}\t{summary}")
    build_report(args.run_dir)
    return 0
