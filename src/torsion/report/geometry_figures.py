"""Figures for the propagation, random-control and category-geometry analyses, drawn from their JSON.

Each function takes the analysis result (``analysis/<name>.json`` as loaded) and writes a PNG
atomically. Nothing global is touched: figures are :class:`matplotlib.figure.Figure` objects
rendered straight to PNG bytes, with no pyplot state and no ``matplotlib.use``.

Example::

    result = json.loads((run_dir / "analysis" / "propagation.json").read_text())
    propagation_figure(result, run_dir / "analysis" / "propagation.png")
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from torsion.store import atomic_write_bytes

DPI = 120


def save_png(figure: Figure, path: Path) -> Path:
    """Render ``figure`` as PNG and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def propagation_figure(result: dict[str, Any], path: Path) -> Path:
    """``cos(Δh_l, v_l)``, ``cos(Δh_l, v_s)`` and ``norm_ratio`` against block, one line per source.

    Solid lines are the component output, dotted the residual stream.
    """
    panels = (("cos_dh_axis", "cos(Δh_l, v_l)"), ("cos_dh_source", "cos(Δh_l, v_s)"), ("norm_ratio", "norm_ratio"))
    figure = Figure(figsize=(13, 3.8))
    axes = figure.subplots(1, 3)
    for ax, (metric, title) in zip(axes, panels):
        for index, source in enumerate(result["sources"]):
            rows = [r for r in result["rows"] if r["source"] == source]
            layers = [r["layer"] for r in rows]
            ax.plot(layers, [r[f"{metric}_component"] for r in rows], ".-", color=f"C{index}", label=f"src={source}")
            ax.plot(layers, [r[f"{metric}_resid"] for r in rows], ".:", color=f"C{index}")
        ax.axhline(0 if metric != "norm_ratio" else 1, color="grey", lw=0.5)
        ax.set(title=title, xlabel="block (layer)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    conventions = result["conventions"]
    figure.suptitle(f"propagation: {conventions['component']} injection, α={conventions['alpha']}, "
                    f"positions={conventions['positions']}, dotted = residual stream", fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)


def random_control_figure(result: dict[str, Any], path: Path) -> Path:
    """Per layer, the random directions' ``kl_base_to_steered`` as dots and the steering KL as a red bar."""
    layers = list(result["layers"])
    figure = Figure(figsize=(11, 0.6 * len(layers) + 2))
    axes = figure.subplots(1, 2, sharey=True)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, result["n_random"])  # a fixed layout, not a result
    for ax, arm in zip(axes, ("+alpha", "-alpha")):
        for row, layer in enumerate(layers):
            summary = result["layers"][layer][arm]["kl_base_to_steered"]
            ax.scatter(summary["random"], row + jitter, s=8, color="grey", alpha=0.6,
                       label="random (norm-matched)" if row == 0 else None)
            ax.plot([summary["steering"]] * 2, [row - 0.3, row + 0.3], color="red", lw=2,
                    label="steering" if row == 0 else None)
        ax.set(xscale="log", title=f"{arm}: first-token kl_base_to_steered", xlabel="KL (nats)")
    axes[0].set(yticks=range(len(layers)), yticklabels=[f"layer {layer}" for layer in layers])
    axes[0].legend(fontsize=7)
    conventions = result["conventions"]
    figure.suptitle(f"random-direction control: {conventions['vector']}, positions={conventions['positions']}, "
                    f"N={result['n_random']}, seed={result['seed']}", fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)


def categories_figure(result: dict[str, Any], path: Path) -> Path:
    """Heatmaps of the pairwise angles: category vectors, and comply activations where measured."""
    panels = [("category vectors", result["vector_pairwise"])]
    if result["comply_activation"].get("matrix_deg") is not None:
        panels.append(("complied mean activations", result["comply_activation"]))
    figure = Figure(figsize=(5.5 * len(panels), 4.8))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for ax, (title, summary) in zip(axes[0], panels):
        image = ax.imshow(summary["matrix_deg"], vmin=0, vmax=180, cmap="viridis")
        ticks = range(len(summary["names"]))
        ax.set_xticks(ticks, summary["names"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(ticks, summary["names"], fontsize=7)
        sd = "n/a" if summary["sd_deg"] is None else f"{summary['sd_deg']:.1f}°"
        ax.set_title(f"{title}: mean {summary['mean_deg']:.1f}°, σ {sd}", fontsize=9)
        figure.colorbar(image, ax=ax, label="angle (deg)")
    figure.suptitle(f"category geometry, layers {result['conventions']['layers']}", fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)
