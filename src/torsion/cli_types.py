"""Argument types and shared option groups of the ``torsion`` parser.

Every argument is checked as it is parsed (the ``type=`` functions here), so bad input fails
before any model loads, in one line (:class:`Parser`).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Callable, NoReturn

from torsion.errors import TorsionError, one_line


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem, the fix, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"torsion: error: {one_line(message)} (see `{self.prog} --help`)\n")


def checked(convert: Callable[[str], object], test: Callable[[object], bool], need: str) -> Callable[[str], object]:
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


positive_int = checked(int, lambda n: n >= 1, "a whole number >= 1")
batch_size_arg = checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1,
                         "a whole number >= 1 or auto")
block_index = checked(int, lambda n: n >= 0, "a block index >= 0")
seed_int = checked(int, lambda n: 0 <= n < 2 ** 63, "a whole number >= 0")
port_int = checked(int, lambda n: 0 <= n <= 65535, "a port number 0..65535")
finite_float = checked(float, math.isfinite, "a finite number")
nonneg_float = checked(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
positive_float = checked(float, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
fraction = checked(float, lambda x: 0 <= x <= 1, "a fraction between 0 and 1")
device_name = checked(str, lambda d: re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", d) is not None,
                       "cpu, cuda, cuda:N, mps or auto")
nonempty_text = checked(str, lambda t: bool(t.strip()), "non-empty text")
storage_url = checked(str, lambda u: "://" in u, "a database URL such as sqlite:///FILE or postgresql://HOST/DB")


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


def comma_list(item: Callable[[str], str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type=`` for a comma-separated list of distinct ``item``s (``flat,ace``)."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item(part) for part in text.split(","))
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} names a {what} twice; list each once, comma-separated")
        return values
    return parse


def objective_name(text: str) -> str:
    if text.strip() not in ("comply", "refuse"):
        raise argparse.ArgumentTypeError(f"unknown objective {text!r}; choose comply, refuse or comply,refuse")
    return text.strip()


def run_directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not (path / "manifest.json").is_file():
        problem = "has no manifest.json" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {problem}; pass a directory made by `torsion run`")
    return path


def study_path(text: str) -> Path:
    """``RUN_DIR/STUDY``: a run directory and a study name in it (``torsion orthogonalize --from-study``)."""
    path = Path(text).expanduser()
    if not (path.parent / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{path.parent} has no manifest.json; pass RUN_DIR/STUDY, e.g. "
                                         "runs/quick/multi-weighted-ablation-comply")
    return path


def pick_rule(text: str) -> str:
    """``refusal<=X``, ``knee`` or a front index (:func:`torsion.pareto.check_pick`)."""
    from torsion.pareto import check_pick

    try:
        return check_pick(text)
    except TorsionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


env_name = checked(str, lambda t: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) is not None,
                    "an environment variable name")


def add_model_options(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    parser.add_argument("--model", default=default_model,
                        help="embedded:qwen2.5-coder-0.5b (default), embedded:smollm2-135m, a Hugging Face id, "
                        "a local model directory or a .gguf file")
    parser.add_argument("--dtype", default=None if default_model is None else "float32",
                        choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32); activations are always stored in float32")
    parser.add_argument("--device", default=None if default_model is None else "cpu", type=device_name,
                        help="cpu (default), cuda, cuda:N, or auto to shard a large model over all GPUs")


def add_method_options(steer: argparse.ArgumentParser) -> None:
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
