"""The ``torsion analyze`` and ``torsion optimize`` parsers (commands in :mod:`torsion.commands_analysis`)."""

from __future__ import annotations

import argparse
import textwrap

from torsion import commands_analysis as commands
from torsion.cli_types import (add_model_options, block_index, checked, comma_list, existing_file, finite_float,
                               fraction, method_name, nonempty_text, nonneg_float, objective_name,
                               positive_float, positive_int, run_directory, seed_int, storage_url)


def add_analysis_parsers(subcommands: argparse._SubParsersAction) -> None:
    """Add the parsers; each sets ``func`` to its command."""
    analyze = subcommands.add_parser(
        "analyze", help="run one analysis on a finished run directory and refresh its report",
        description="rotation: adjacent-layer angles with bootstrap CIs, shuffled null and split-half "
        "reliability. propagation: inject alpha*v_s at source blocks and follow the change downstream. "
        "random-control: steering KL against norm-matched random directions. categories: geometry of "
        "per-category vectors. arditi: ablate the refusal direction on held-out harmful prompts and add "
        "it on neutral ones. asymmetry (after `torsion optimize` with both objectives): the write-up's "
        "refuse/comply asymmetry table, and dense (every block) against flat top-k steering at matched KL. "
        "motion: a strength sweep of a steering method (--method, default flat) on held-out prompts, with the orthogonal fraction of the "
        "decoding-time shift against the steered and readout axes (also analysis/motion.safetensors). hedge: "
        "the hedge's position t and bow on the refuse-to-comply segment, with its on-line null. stability: "
        "learning curves k/n^a + floor of every MD vector and behaviour-bin knot. "
        "methods: every steering method's strength searched on train prompts (one study per method and "
        "objective in optimize.db), frozen and evaluated once on held-out harmful prompts, plus each "
        "method's held-out rate-vs-KL curve and the matched-KL comparison (fits RUN_DIR/manifold.safetensors "
        "for the splines when absent). Each writes analysis/<name>.json.")
    analyze.add_argument("name", choices=["rotation", "propagation", "random-control", "categories", "arditi",
                                          "asymmetry", "motion", "hedge", "stability", "methods"])
    analyze.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    add_model_options(analyze)
    analyze.add_argument("--layers", type=block_index, nargs="+", default=None,
                         help="source layers (propagation), steered layers (random-control, motion, hedge), averaged "
                         "layers (categories); default: 4 evenly spaced blocks in the back half")
    analyze.add_argument("--component", default="resid", choices=["resid", "attn", "mlp"])
    analyze.add_argument("--alpha", type=finite_float, nargs="+", default=None,
                         help="steering strength of --method (flat: alpha on the run's MD vector; t for the splines; default -1 "
                         "for propagation, 1 otherwise); "
                         "arditi takes several (a dose-response of the addition); motion and hedge take a sweep "
                         "(default: 4 strengths of the method's comply search range; flat: -1 -2 -3 -4)")
    analyze.add_argument("--n-prompts", type=positive_int, default=None,
                         help="prompts used by the causal analyses (default 16 propagation, motion and hedge, 32 "
                         "random-control and asymmetry, 48 arditi); methods: train prompts per search trial (default 24)")
    analyze.add_argument("--n-random", type=positive_int, default=50,
                         help="random directions (random-control; hedge's causal test)")
    analyze.add_argument("--bootstrap", type=positive_int, default=1000,
                         help="prompt-bootstrap resamples (rotation, motion, hedge)")
    analyze.add_argument("--permutations", type=positive_int, default=200,
                         help="shuffled-label permutations (rotation); null draws (hedge)")
    analyze.add_argument("--split-halves", type=positive_int, default=50, help="split-half repetitions (rotation)")
    analyze.add_argument("--readout-blocks", type=block_index, nargs="+", default=None,
                         help="motion, hedge: blocks read while decoding (default: first steered block + 1 "
                         "to the last)")
    analyze.add_argument("--k", type=positive_int, default=8, help="motion, hedge: generated tokens averaged (default 8)")
    analyze.add_argument("--subsamples", type=positive_int, default=200,
                         help="stability: subsamples per pool size (default 200)")
    analyze.add_argument("--reference", choices=["split", "pool"], default="split",
                         help="stability: what a subsample is compared with: split (default) a disjoint subsample "
                         "of the same size, sizes up to N/2, whose curve can show a floor; pool the full pool's "
                         "estimate, methods.md's definition, which is 0 at n = N by construction so its fitted "
                         "floor is pulled to 0")
    analyze.add_argument("--scope", default="global", type=nonempty_text,
                         help="asymmetry: which searches, global (default) or a category name")
    steering = analyze.add_argument_group("propagation, random-control, motion, hedge: the steering method")
    steering.add_argument("--method", type=method_name, default="flat",
                          help="the injected method (default flat on the run's MD vector); its strength is --alpha "
                          "(t for spline-a/spline-b, which read --manifold or RUN_DIR/manifold.safetensors)")
    steering.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                          help="another method parameter, e.g. beta=0.5 (JSON values); repeatable")
    compare = analyze.add_argument_group("methods")
    compare.add_argument("--methods", type=comma_list(method_name, "method"), default=None,
                         help="comma-separated (default flat,dense,ablation,weighted-ablation,ace,spline-a,spline-b)")
    compare.add_argument("--objectives", type=comma_list(objective_name, "objective"), default=("comply", "refuse"),
                         help="comma-separated, default comply,refuse")
    compare.add_argument("--sampler", default="tpe", choices=["tpe", "grid"],
                         help="strength search sampler (default tpe)")
    compare.add_argument("--trials", type=positive_int, default=12, help="finished trials per study (default 12)")
    compare.add_argument("--curve-points", type=positive_int, default=5,
                         help="strengths on each method's held-out rate-vs-KL curve (default 5)")
    compare.add_argument("--top-k", type=positive_int, default=4,
                         help="blocks steered by flat, ace and the splines: best train-split AUC (default 4)")
    compare.add_argument("--manifold", type=existing_file, default=None,
                         help="the splines' manifold file (default RUN_DIR/manifold.safetensors; methods fits it "
                         "when absent)")
    compare.add_argument("--n-mcq", type=checked(int, lambda n: n >= 0, "a whole number >= 0"), default=40,
                         help="MCQ items for the capability check (default 40; 0 skips it)")
    compare.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generation batch (default 8)")
    compare.add_argument("--judge", default=None, choices=["rules", "llm"],
                         help="judge for trials, curves and baselines (default: the one that labelled the run)")
    analyze.add_argument("--seed", type=seed_int, default=None, help="default: the run's seed (manifest.json)")
    analyze.add_argument("--verbose", action="store_true", help="print the result JSON")
    analyze.set_defaults(func=commands.analyze)

    optimize = subcommands.add_parser(
        "optimize", help="search the steering strength alpha (Optuna), then evaluate it once on the holdout",
        description="Steer the top-k blocks of a run (train-split AUC) with alpha * v_l (or with --method: any "
        "steering method, whose strength is alpha, beta or t) and search the strength on train-split prompts. comply minimises mean_score + w*min(KL, cap); refuse minimises "
        "-mean_score + w*min(KL, cap); degenerate responses score +2; KL is the first-token "
        "kl_base_to_steered on half of the neutral set. Trials live in an Optuna storage (SQLite in the "
        "run directory by default; --storage URL lets workers on several machines share one study). A "
        "killed search resumes without re-running finished trials; a changed objective is refused. The "
        "best alpha is then frozen and evaluated once on the holdout split -> analysis/optimize_<study>.json.",
        epilog="examples:\n"
        "  torsion optimize runs/quick --objective comply --trials 12\n"
        "  torsion optimize runs/quick --objective refuse --sampler grid --trials 9\n"
        "  torsion optimize runs/quick --per-category --trials 8\n"
        "  torsion optimize runs/quick --method spline-a --manifold runs/quick/manifold.safetensors\n"
        "  torsion optimize runs/quick --storage postgresql://user@db-host/torsion   # on each worker\n"
        "  torsion optimize runs/quick --method weighted-ablation --multi --trials 24   # refusals vs KL front\n"
        "\n" + textwrap.fill("--multi (weighted-ablation only): an Optuna study with two minimised objectives, the train-split refusal "
        "rate (after false-positive correction) and the probe first-token KL, over heretic's kernel ranges (peak "
        "weight 0.8-1.5, peak position 0.6-1.0 x last block, floor 0-1 x peak, width 1-0.6 x last, fractional "
        "direction block 0.4-0.9 x last or per-block directions, components attn+mlp/attn/mlp) and the direction "
        "source: refusal (the run's --key vector, refused minus complied) or harm (harmful minus harmless means, "
        "projected off the harmless mean, as heretic ablates; train-split harmful prompts against the neutral probe "
        "half, saved to analysis/harm_<study>.safetensors). Default study "
        "multi-weighted-ablation-comply. Every front point is evaluated once on the holdout (refusal rate, "
        "genuine compliance, degenerate share, KL both ways, MCQ accuracy, perplexity ratio) -> "
        "analysis/front_<study>.json; bake one with `torsion orthogonalize --from-study RUN_DIR/STUDY --pick ...`.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    optimize.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    add_model_options(optimize)
    optimize.add_argument("--objective", default="comply", choices=["comply", "refuse"],
                          help="comply (default): steer toward compliance; refuse: deepen refusal")
    optimize.add_argument("--key", default="md/resid", type=nonempty_text,
                          help="vector (method/component), default md/resid")
    scope = optimize.add_mutually_exclusive_group()
    scope.add_argument("--category", default=None, type=nonempty_text,
                       help="search one category with its own vector and prompts")
    scope.add_argument("--per-category", action="store_true", help="one search per category in the vector file")
    optimize.add_argument("--method", type=method_name, default="flat",
                          help="steering method: flat (default), dense, ablation, weighted-ablation, ace, spline-a, "
                          "spline-b")
    optimize.add_argument("--manifold", type=existing_file, default=None,
                          help="spline-a/spline-b: a manifold file (default RUN_DIR/manifold.safetensors)")
    optimize.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                          help="a method parameter, e.g. peak_position=12 (JSON values); repeatable")
    optimize.add_argument("--trials", type=positive_int, default=12, help="finished trials in the study (default 12)")
    optimize.add_argument("--sampler", default=None, choices=["tpe", "grid", "nsga2"],
                          help="tpe (default), or grid: --trials evenly spaced alphas over the range; with --multi "
                          "tpe (default, multivariate) or nsga2 (population 8)")
    optimize.add_argument("--multi", action="store_true",
                          help="weighted-ablation only: search the kernel for the Pareto front of train refusal rate "
                          "and probe KL (both minimised) instead of one weighted objective")
    optimize.add_argument("--alpha-range", type=finite_float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                          help="search range of the method's strength (default: alpha -4 0 for comply, 0 4 for "
                          "refuse; beta 0 1 for ablations; ace -n n / 0 2n with n the mean |v_l|; the manifold's "
                          "coherent t range for splines)")
    optimize.add_argument("--top-k", type=positive_int, default=4,
                          help="steered blocks, best train-split AUC (default 4)")
    optimize.add_argument("--layer-window", type=fraction, nargs=2, default=[0.25, 0.8], metavar=("LO", "HI"),
                          help="eligible blocks as fractions of depth (default 0.25 0.8)")
    optimize.add_argument("--n-prompts", type=positive_int, default=24,
                          help="train-split prompts per trial (default 24)")
    optimize.add_argument("--n-kl-prompts", type=positive_int, default=16,
                          help="neutral prompts for the KL (default 16)")
    optimize.add_argument("--kl-weight", type=nonneg_float, default=1.0, help="w in w*min(KL, cap) (default 1)")
    optimize.add_argument("--kl-cap", type=positive_float, default=10.0,
                          help="cap in w*min(KL, cap) (default 10: a degenerate push, score +2, cannot buy back "
                          "its KL in the refuse objective)")
    optimize.add_argument("--mcq-weight", type=nonneg_float, default=0.0,
                          help="capability penalty per unit of MCQ accuracy lost (default 0: off)")
    optimize.add_argument("--perplexity-weight", type=nonneg_float, default=0.0,
                          help="capability penalty per unit of log perplexity gained (default 0: off)")
    optimize.add_argument("--n-mcq", type=checked(int, lambda n: n >= 0, "a whole number >= 0"), default=40,
                          help="MCQ items for the capability penalty and the --multi front's held-out MCQ accuracy "
                          "(default 40; 0 skips MCQ)")
    optimize.add_argument("--positions", default="all", choices=["last", "all"], help="steered positions (default all)")
    optimize.add_argument("--no-prune", action="store_true",
                          help="run every trial to the end (a grid always does; tpe prunes by the median rule)")
    optimize.add_argument("--storage", default=None, type=storage_url,
                          help="Optuna storage URL (default sqlite:///RUN_DIR/optimize.db); e.g. postgresql://...")
    optimize.add_argument("--study", default=None, type=nonempty_text,
                          help="study name (default <objective>-<category or global>)")
    optimize.add_argument("--no-evaluate", action="store_true",
                          help="search only; skip the held-out evaluation (extra workers)")
    optimize.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generation batch (default 8)")
    optimize.add_argument("--seed", type=seed_int, default=0, help="sampler seed and prompt sampling (default 0)")
    optimize.add_argument("--judge", default=None, choices=["rules", "llm"],
                          help="judge for trials and baselines (default: the one that labelled the run)")
    optimize.set_defaults(func=commands.optimize)
