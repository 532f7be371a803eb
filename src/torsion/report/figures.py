"""Figures for the report, drawn with matplotlib's Agg backend and saved as PNG.

Example::

    png = rotation_figure(rotation_json)        # bytes
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"resid": "#1f4e79", "attn": "#c55a11", "mlp": "#548235"}


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def rotation_figure(rotation: dict[str, Any]) -> bytes:
    """Per component: adjacent-pair angle with its bias-corrected CI band, the shuffled-label
    null band, the random-direction reference, and the split-half same-layer angle."""
    components = rotation["components"]
    reference = rotation["random_reference"]
    figure, axes = plt.subplots(1, len(components), figsize=(4.6 * len(components), 3.6), sharey=True,
                                squeeze=False)
    for ax, (name, result) in zip(axes[0], components.items()):
        pairs = list(range(len(result["pair_angles_deg"])))
        colour = COLOURS.get(name, "black")
        ci = result["prompt_bootstrap"].get("pair_ci95_basic", result["prompt_bootstrap"]["pair_ci95"])
        ax.fill_between(pairs, [c[0] for c in ci], [c[1] for c in ci], color=colour, alpha=0.25, lw=0)
        ax.plot(pairs, result["pair_angles_deg"], color=colour, marker="o", ms=3, label="angle(v_l, v_l+1)")
        null = result["null"]
        ax.axhspan(null["p2_5"], null["p97_5"], color="grey", alpha=0.18, lw=0, label="shuffled-label null 95%")
        ax.axhline(reference["mean_deg"], color="black", ls="--", lw=0.8, label="random directions")
        ax.axhspan(reference["mean_deg"] - 2 * reference["sd_deg"], reference["mean_deg"] + 2 * reference["sd_deg"],
                   color="black", alpha=0.06, lw=0)
        same = result["split_half"]["same_layer_angle_deg"]
        ax.plot([p + 0.5 for p in pairs], [(a + b) / 2 for a, b in zip(same[:-1], same[1:])], color=colour,
                ls=":", lw=1.2, label="split-half same-layer angle")
        ax.set_title(f"{name}: mean {result['mean_deg']:.1f}°, null p = {null['p_value']:.3g}", fontsize=9)
        ax.set_xlabel("layer pair (l, l+1)")
        ax.set_ylim(0, 180)
        ax.grid(alpha=0.2)
    axes[0][0].set_ylabel("angle (degrees)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _png(figure)


def reliability_figure(rotation: dict[str, Any]) -> bytes:
    """Split-half same-layer angle per layer, per component (large = noise-dominated)."""
    figure, ax = plt.subplots(figsize=(6.0, 3.2))
    for name, result in rotation["components"].items():
        same = result["split_half"]["same_layer_angle_deg"]
        ax.plot(range(len(same)), same, marker="o", ms=3, color=COLOURS.get(name, "black"), label=name)
    ax.axhline(90, color="black", ls="--", lw=0.8)
    ax.set_xlabel("layer (block)")
    ax.set_ylabel("angle(v_l^A, v_l^B) (degrees)")
    ax.set_ylim(0, 180)
    ax.grid(alpha=0.2)
    ax.legend(fontsize=8)
    return _png(figure)
