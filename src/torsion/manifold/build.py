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
from torsion.manifold.knots import Knots, knots_from_run
from torsion.selection import eligible_layers
from torsion.store import RunDir, atomic_write_json

VARIANTS = ("a", "b", "both")
MANIFOLD_FILE = "manifold.safetensors"


def fit_manifold(knots: Knots, *, variant: str = "both", layers: Sequence[int] | None = None, k: int = 8,
                 smoothing: float = 0.0, meta: dict[str, Any] | None = None) -> tuple[Manifold, dict[str, Any] | None]:
    """Fit spline A and/or B on ``layers`` (default: the eligible window); B also returns its leave-one-block-out table."""
    if variant not in VARIANTS:
        raise TorsionError(f"unknown manifold variant {variant!r}; choose a, b or both")
    n_layers, d_model = knots.centroids.shape[1], knots.centroids.shape[2]
    chosen = list(layers) if layers is not None else list(eligible_layers(n_layers))
    a = fit_a(knots, chosen, k=k, smoothing=smoothing) if variant in ("a", "both") else {}
    b = fit_b(knots, chosen, k=k, n_layers=n_layers, smoothing=smoothing) if variant in ("b", "both") else None
    table = None
    if b is not None and len(b.layers) >= 3:
        table = leave_one_block_out(knots, a or fit_a(knots, chosen, k=k, smoothing=smoothing), b)
    full_meta = {**(meta or {}), "d_model": d_model, "n_layers": n_layers, "layer_indexing": LAYER_INDEXING,
                 "k": k, "smoothing": smoothing, "variants": [v for v in ("a", "b") if variant in (v, "both")],
                 "layers": chosen, "knots": knots.summary(), "coherence": None, "torsion_version": torsion.__version__}
    return Manifold(a, b, full_meta), table


def fit_run_manifold(run_dir: Path, *, variant: str = "both", layers: Sequence[int] | None = None, k: int = 8,
                     m: int = 5, smoothing: float = 0.0, component: str = "resid") -> dict[str, Any]:
    """Knots from the run's train rows, splines, ``RUN_DIR/manifold.safetensors`` and ``analysis/manifold.json``."""
    if not (Path(run_dir) / "manifest.json").is_file():
        raise TorsionError(f"{run_dir} is not a run directory (no manifest.json); pass the output of `torsion run`")
    run = RunDir(run_dir)
    model = run.manifest().get("model", {})
    knots = knots_from_run(run, m=m, component=component)
    meta = {"model_id": model.get("model_id"), "weights_sha256": model.get("weights_sha256"),
            "run_dir": str(run.root), "component": component, "m": m}
    manifold, table = fit_manifold(knots, variant=variant, layers=layers, k=k, smoothing=smoothing, meta=meta)
    path = save_manifold(run.root / MANIFOLD_FILE, manifold)
    result = {"file": MANIFOLD_FILE, "model_id": meta["model_id"], "component": component, "k": k, "m": m,
              "smoothing": smoothing, "layers": manifold.meta["layers"], "variants": manifold.meta["variants"],
              "knots": knots.summary(), "layer_indexing": LAYER_INDEXING, "leave_one_block_out": table}
    atomic_write_json(run.analysis_path("manifold"), result)
    return {**result, "path": str(path)}
