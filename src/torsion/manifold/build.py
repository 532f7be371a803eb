"""Fitting a run's manifold: ``torsion manifold fit`` (``manifold.safetensors`` and ``analysis/manifold.json``).

Example::

    result = fit_run_manifold(Path("runs/quick"), variant="both", k=8, m=5)
    result["path"], result["leave_one_block_out"]["summary_interior"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torsion
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.manifold.file import Manifold, save_manifold
from torsion.manifold.fit import fit_a, fit_b, leave_one_block_out
from torsion.manifold.knots import Knots, knots_from_run, structural_bins
from torsion.selection import eligible_layers
from torsion.store import RunDir, atomic_write_json

VARIANTS = ("a", "b", "both")
MANIFOLD_FILE = "manifold.safetensors"


def fit_manifold(knots: Knots, *, variant: str = "both", layers: Sequence[int] | None = None, k: int = 8,
                 smoothing: float = 0.0, meta: dict[str, Any] | None = None,
                 knot_weights: Sequence[float] | None = None) -> tuple[Manifold, dict[str, Any] | None]:
    """Fit spline A and/or B on ``layers`` (default: the eligible window); B also returns its leave-one-block-out table.

    ``knot_weights`` ``[n_knots]`` (aligned with ``knots.bins``) weigh the knots in a smoothing
    spline (``smoothing > 0``); the file records them as ``knot_weights``.
    """
    if knot_weights is not None and smoothing == 0:
        raise TorsionError("soft knots are down-weighted in a smoothing spline; pass --smoothing > 0 "
                           "(or --structural drop)")
    if variant not in VARIANTS:
        raise TorsionError(f"unknown manifold variant {variant!r}; choose a, b or both")
    n_layers, d_model = knots.centroids.shape[1], knots.centroids.shape[2]
    chosen = list(layers) if layers is not None else list(eligible_layers(n_layers))
    weighted = {"smoothing": smoothing, "knot_weights": knot_weights}
    a = fit_a(knots, chosen, k=k, **weighted) if variant in ("a", "both") else {}
    b = fit_b(knots, chosen, k=k, n_layers=n_layers, **weighted) if variant in ("b", "both") else None
    table = None
    if b is not None and len(b.layers) >= 3:
        table = leave_one_block_out(knots, a or fit_a(knots, chosen, k=k, **weighted), b)
    full_meta = {**(meta or {}), "d_model": d_model, "n_layers": n_layers, "layer_indexing": LAYER_INDEXING,
                 "k": k, "smoothing": smoothing, "variants": [v for v in ("a", "b") if variant in (v, "both")],
                 "layers": chosen, "knots": knots.summary(), "coherence": None,
                 "knot_weights": None if knot_weights is None else [float(w) for w in knot_weights], "torsion_version": torsion.__version__}
    return Manifold(a, b, full_meta), table


STRUCTURAL = ("drop", "soft", "ignore")
SOFT_WEIGHT = 0.25  # a soft knot's weight in the smoothing spline (its residual counts 1/16 as much)


def stability_exclusions(run: RunDir, *, component: str, layers: Sequence[int] | None,
                         structural: str) -> dict[str, Any]:
    """What ``analysis/stability.json`` (when present) says about the knots: the bins to drop and why.

    ``structural="drop"`` leaves out every bin flagged structural at a fitted block (any block when
    ``layers`` is None); ``"soft"`` keeps it with weight :data:`SOFT_WEIGHT` in the smoothing splines
    (B's surface; A's spline only with more knots than its degree + 1, which interpolates otherwise);
    ``"ignore"`` records the flags and keeps the bins.
    """
    import json

    if structural not in STRUCTURAL:
        raise TorsionError(f"unknown --structural {structural!r}; choose drop, soft or ignore")
    path = run.analysis_path("stability")
    if not path.is_file():
        return {"file": None, "mode": structural, "structural": {}, "dropped": {}, "soft": {}}
    try:
        entries = json.loads(path.read_text())["entries"]
        flagged = structural_bins(entries, component=component, layers=layers)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TorsionError(f"{path} is damaged ({type(error).__name__}); rerun `torsion analyze stability "
                           f"{run.root}` or delete it") from None
    return {"file": str(path), "mode": structural, "structural": flagged,
            "dropped": flagged if structural == "drop" else {}, "soft": flagged if structural == "soft" else {},
            "soft_weight": SOFT_WEIGHT if structural == "soft" else None}


def fit_run_manifold(run_dir: Path, *, variant: str = "both", layers: Sequence[int] | None = None, k: int = 8,
                     m: int = 5, smoothing: float = 0.0, component: str = "resid",
                     structural: str = "drop") -> dict[str, Any]:
    """Knots from the run's train rows, splines, ``RUN_DIR/manifold.safetensors`` and ``analysis/manifold.json``.

    When the run has ``analysis/stability.json``, a bin it flags structural is dropped as a knot
    (``structural="drop"``), down-weighted (``"soft"``, needs ``smoothing > 0``) or kept (``"ignore"``);
    both files record which bins and why (``stability``).
    """
    if not (Path(run_dir) / "manifest.json").is_file():
        raise TorsionError(f"{run_dir} is not a run directory (no manifest.json); pass the output of `torsion run`")
    run = RunDir(run_dir)
    model = run.manifest().get("model", {})
    stability = stability_exclusions(run, component=component, layers=layers, structural=structural)
    knots = knots_from_run(run, m=m, component=component, exclude=stability["dropped"])
    meta = {"model_id": model.get("model_id"), "weights_sha256": model.get("weights_sha256"),
            "run_dir": str(run.root), "component": component, "m": m, "stability": stability}
    weights = ([SOFT_WEIGHT if name in stability["soft"] else 1.0 for name in knots.bins]
               if stability["soft"] and any(name in stability["soft"] for name in knots.bins) else None)
    manifold, table = fit_manifold(knots, variant=variant, layers=layers, k=k, smoothing=smoothing, meta=meta,
                                   knot_weights=weights)
    path = save_manifold(run.root / MANIFOLD_FILE, manifold)
    result = {"file": MANIFOLD_FILE, "model_id": meta["model_id"], "component": component, "k": k, "m": m,
              "smoothing": smoothing, "layers": manifold.meta["layers"], "variants": manifold.meta["variants"],
              "knots": knots.summary(), "stability": stability,
              "knot_weights": manifold.meta["knot_weights"], "layer_indexing": LAYER_INDEXING,
              "leave_one_block_out": table}
    atomic_write_json(run.analysis_path("manifold"), result)
    return {**result, "path": str(path)}


DEFAULT_SWEEP = (-0.5, -0.25, 0.0, 1.0, 1.25, 1.5)


def run_coherence(run_dir: Path, lm: Any, *, variant: str = "a", ts: Sequence[float] = DEFAULT_SWEEP,
                  layers: Sequence[int] | None = None, n_prompts: int = 8, max_new_tokens: int = 32) -> dict[str, Any]:
    """Endpoint sweep of a fitted manifold; records the last coherent t in the file and ``analysis/manifold.json``.

    Generation prompts: the run's first ``n_prompts`` train-split prompts, labelled by the run's
    own judge; KL and perplexity: the first ``n_prompts`` of the neutral search-probe half (as
    the strength search uses).
    """
    import json

    from torsion.generate import GenerationSettings
    from torsion.manifold.coherence import coherence_sweep, last_coherent_t
    from torsion.manifold.file import load_manifold
    from torsion.runs import labelled_prompts, neutral_halves, run_judge
    from torsion.steering.spline_a import SplineA
    from torsion.steering.spline_b import SplineB

    run = RunDir(run_dir)
    path = run.root / MANIFOLD_FILE
    manifold = load_manifold(path)
    cls = {"a": SplineA, "b": SplineB}.get(variant)
    if cls is None:
        raise TorsionError(f"coherence sweeps one variant; choose a or b, not {variant!r}")
    method = cls.from_manifold(manifold, layers)
    method.validate(lm)
    prompts, _ = labelled_prompts(run)
    train = [p.prompt for p in prompts if p.split == "train"][:n_prompts]
    probe = [p.prompt for p in neutral_halves(run)[0]][:n_prompts]
    sweep = coherence_sweep(lm, method, ts, kl_prompts=probe, texts=probe, prompts=train,
                            settings=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=8),
                            judge=run_judge(run))
    bins = [b["t"] for b in manifold.meta["knots"]["bins"]]
    sweep["last_coherent_t"] = last_coherent_t(sweep["rows"], (min(bins), max(bins)))
    sweep.update(variant=variant, layers=list(method.layers))
    save_manifold(path, manifold.with_coherence(sweep))
    table_path = run.analysis_path("manifold")
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    atomic_write_json(table_path, {**table, "coherence": sweep})
    return sweep
