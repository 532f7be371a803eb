"""``torsion steer --method NAME``: command-line options to a steering method.

Options: ``--method-file`` (a saved method), ``--manifold`` with ``--t`` (spline-a, spline-b),
``--vector``/``--key`` with ``--layers`` and ``--alpha`` (flat, dense, ablation,
weighted-ablation, ace), ``--run`` (ace: the complied train mean ``μ``), ``--beta``,
``--allow-extrapolation``, ``--positions``, ``--component``, and ``--param KEY=VALUE`` for any
other parameter (checked against the method's signature).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steering.base import SteeringMethod, provenance
from torsion.steering.io import load_method
from torsion.steering.registry import get_method, method_class

SPLINES = ("spline-a", "spline-b")
ABLATIONS = ("ablation", "weighted-ablation")


def method_strength(args: argparse.Namespace) -> tuple[float, str | None]:
    """The one strength (``--t`` for splines, ``--alpha`` otherwise; ablation defaults to 1) and the method name."""
    name = method_class(args.method).name if args.method else None
    if name in SPLINES or (name is None and args.t is not None):
        if args.t is None:
            raise TorsionError(f"{name} steers at a position t; pass --t (0 refuse .. 1 comply)")
        return args.t, name
    if args.alpha is None:
        if name in ABLATIONS:
            return 1.0, name
        raise TorsionError(f"{name or 'the method'} needs one strength; pass --alpha")
    if len(args.alpha) != 1:
        raise TorsionError(f"--method takes one --alpha (its one strength), got {len(args.alpha)}")
    return args.alpha[0], name


def parse_params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` items as a dict; a value is read as JSON where it parses, else as text."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TorsionError(f"--param {item!r} is not KEY=VALUE; e.g. --param peak_position=12")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def build_method(args: argparse.Namespace, lm: LoadedModel, name: str | None) -> SteeringMethod:
    """The method the options describe, validated against ``lm``."""
    if args.method_file:
        method = load_method(args.method_file, lm=lm)
        if name and method.name != name:
            raise TorsionError(f"{args.method_file} holds a {method.name} method, not {name}; drop --method or fix it")
        return method
    params = parse_params(args.param)
    if args.beta is not None:
        params["beta"] = args.beta
    if name in SPLINES:
        from torsion.manifold.file import load_manifold
        from torsion.steering.spline_a import SplineA
        from torsion.steering.spline_b import SplineB

        if args.manifold is None:
            raise TorsionError(f"{name} needs --manifold FILE (from `torsion manifold fit`)")
        cls = SplineA if name == "spline-a" else SplineB
        method = cls.from_manifold(load_manifold(args.manifold), args.layers, positions=args.positions,
                                   allow_extrapolation=args.allow_extrapolation, **params)
    else:
        from torsion.vectors import load_vector

        if args.vector is None:
            raise TorsionError(f"{name} needs --vector FILE (and --key)")
        vector = load_vector(args.vector, args.key, d_model=lm.d_model)
        meta = provenance(None, model_id=vector.meta.get("model_id"), weights_sha256=vector.meta.get("weights_sha256"),
                          vector_file=str(args.vector), key=args.key)
        if name in ABLATIONS:
            method = get_method(name, directions=vector.directions, meta=meta, **params)
        else:
            params.update(component=args.component, positions=args.positions)
            if name != "dense":
                if args.layers is None:
                    raise TorsionError(f"{name} needs --layers")
                params["layers"] = args.layers
            if name == "ace":
                if args.run is None:
                    raise TorsionError("ace needs --run RUN_DIR: mu is the run's complied train mean")
                from torsion.steering.ace import complied_means

                params["means"] = complied_means(args.run, args.component)
            method = get_method(name, vectors=vector.directions, meta=meta, **params)
    method.validate(lm)
    return method
