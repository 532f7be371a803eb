"""The report's figures, drawn on plain :class:`matplotlib.figure.Figure` objects (no pyplot, no
global backend: importing this module changes nothing for a notebook) and written atomically as PNG.
Only ``torsion.report`` draws: analyses write JSON, and the report builder turns it into figures.

The rotation figures read ``analysis/rotation.json`` (``torsion.analysis.rotation.analyze_rotation``);
layer ``l`` is decoder block ``l`` and the pair ``(l, l+1)`` is drawn at ``x = l + 0.5``. The
strength figure reads an ``analysis/optimize_<study>.json`` (:mod:`torsion.optimize`), the methods
figure ``analysis/methods.json`` (:mod:`torsion.analysis.methods`).

Example::

    rotation = json.loads((run_dir / "analysis" / "rotation.json").read_text())
    rotation_angle_figure(rotation, run_dir / "analysis" / "rotation_angles.png")
    split_half_figure(rotation, run_dir / "analysis" / "rotation_split_half.png")
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from torsion.store import atomic_write_bytes

COLOURS = {"resid": "#1f4e79", "attn": "#c55a11", "mlp": "#548235"}
DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _random_reference(ax: Any, reference: dict[str, float]) -> None:
    """Two unrelated directions: a dashed line at the mean and a faint ±1 sd band."""
    mean, sd = reference["mean_deg"], reference["sd_deg"]
    ax.axhline(mean, color="black", ls="--", lw=0.8, label=f"random directions {mean:.0f}° ± {sd:.1f}°")
    ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.07, lw=0)


def rotation_angle_figure(rotation: dict[str, Any], path: Path) -> Path:
    """Per component: adjacent-pair angle vs layer pair, with its controls; written to ``path``.

    Each panel shows ``angle(v_l, v_{l+1})`` with its prompt-bootstrap 95% band, the
    shuffled-label null's 2.5–97.5 percentile band (grey), the random-direction reference
    (dashed, ±1 sd) and the split-half same-layer angle ``angle(v_l^A, v_l^B)`` per layer.
    """
    components = rotation["components"]
    figure = Figure(figsize=(4.2 * len(components), 3.4))
    axes = figure.subplots(1, len(components), sharey=True, squeeze=False)
    for ax, (name, result) in zip(axes[0], components.items()):
        colour = COLOURS.get(name, "black")
        angles = result["pair_angles_deg"]
        pair_x = [layer + 0.5 for layer in range(len(angles))]
        null = result["null"]
        if _finite(null["p2_5"]) and _finite(null["p97_5"]):
            ax.axhspan(null["p2_5"], null["p97_5"], color="grey", alpha=0.3, lw=0,
                       label="shuffled-label null of the mean, 2.5–97.5%")
        if _finite(result["mean_deg"]):
            ax.axhline(result["mean_deg"], color=colour, lw=0.8, alpha=0.7, label="mean over pairs")
        _random_reference(ax, rotation["random_reference"])
        band = result["prompt_bootstrap"]["pair_ci95"]
        ax.fill_between(pair_x, [lo for lo, _ in band], [hi for _, hi in band], color=colour, alpha=0.25, lw=0,
                        label="prompt bootstrap 95%")
        ax.plot(pair_x, angles, color=colour, marker="o", ms=3, label=r"angle($v_l$, $v_{l+1}$)")
        same = result["split_half"]["same_layer_angle_deg"]
        ax.plot(range(len(same)), same, color=colour, ls=":", marker="x", ms=3, lw=1.2,
                label=r"split-half angle($v_l^A$, $v_l^B$)")
        ax.set_title(f"{name}: null p = {null['p_value']:.3g}" if _finite(null["p_value"]) else name, fontsize=10)
        ax.set_xlabel("layer l (pair (l, l+1) drawn at l + 0.5)")
        ax.set_ylim(0, 180)
        ax.set_yticks(range(0, 181, 30))
        ax.grid(alpha=0.2)
    axes[0][0].set_ylabel("angle (degrees)")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=3, fontsize=8, frameon=False)
    return _save(figure, path)


def split_half_figure(rotation: dict[str, Any], path: Path) -> Path:
    """Split-half same-layer angle per layer, one line per component; written to ``path``.

    Near 0° the vector is stable across halves of the prompts; near the random reference it
    is noise at this sample size.
    """
    figure = Figure(figsize=(6.0, 3.2))
    ax = figure.subplots()
    for name, result in rotation["components"].items():
        same = result["split_half"]["same_layer_angle_deg"]
        ax.plot(range(len(same)), same, marker="o", ms=3, color=COLOURS.get(name, "black"), label=name)
    _random_reference(ax, rotation["random_reference"])
    ax.set_xlabel("layer l (decoder block)")
    ax.set_ylabel(r"angle($v_l^A$, $v_l^B$) (degrees)")
    ax.set_ylim(0, 180)
    ax.set_yticks(range(0, 181, 30))
    ax.grid(alpha=0.2)
    ax.legend(fontsize=8)
    return _save(figure, path)


CLASS_COLOURS = {"strong_comply": "#c00000", "weak_comply": "#f4a582", "weak_refuse": "#92c5de",
                 "strong_refuse": "#1f4e79", "degenerate": "#7f7f7f"}


SYMBOLS = {"alpha": "α", "beta": "β", "t": "t"}


def strength_figure(result: dict[str, Any], path: Path) -> Path:
    """Rate of each class vs the strength (complete trials, in-sample) and ``kl_base_to_steered`` vs strength.

    The frozen strength's held-out rates, when evaluated, are drawn as hollow markers.
    """
    strength = result.get("strength_name", "alpha")  # files written before steering methods searched alpha
    symbol, chosen = SYMBOLS.get(strength, strength), result[strength]
    label = f"{symbol} ({result.get('method', {}).get('name', 'flat')} steering)"
    trials = sorted((t for t in result["trials"] if t["state"] == "COMPLETE" and "rates" in t),
                    key=lambda t: t[strength])
    figure = Figure(figsize=(10, 3.6))
    rates_ax, kl_ax = figure.subplots(1, 2)
    alphas = [t[strength] for t in trials]
    for name, colour in CLASS_COLOURS.items():
        rates_ax.plot(alphas, [100 * t["rates"][name]["rate"] for t in trials], marker="o", ms=3, color=colour,
                      label=name.replace("_", " "))
        held = result.get("held_out", {}).get("rates", {}).get(name)
        if held and held["rate"] is not None:
            rates_ax.plot([chosen], [100 * held["rate"]], marker="o", ms=8, mfc="none", color=colour)
    rates_ax.axvline(chosen, color="black", lw=0.8, ls="--")
    rates_ax.set_xlabel(label)
    rates_ax.set_ylabel("% of judged responses")
    rates_ax.set_title(f"{result['study']}: rates vs {symbol} (hollow: held-out at the chosen {symbol})", fontsize=10)
    rates_ax.set_ylim(-2, 102)
    rates_ax.grid(alpha=0.2)
    rates_ax.legend(fontsize=7, frameon=False)
    positive = [(t[strength], t["kl_base_to_steered"]) for t in trials if t["kl_base_to_steered"] > 0]
    kl_ax.semilogy([a for a, _ in positive], [kl for _, kl in positive], marker="o", ms=3, color="black",
                   label=f"{symbol} with KL 0 not drawn" if len(positive) < len(trials) else None)
    if len(positive) < len(trials):
        kl_ax.legend(fontsize=7, frameon=False)
    kl_ax.axvline(chosen, color="black", lw=0.8, ls="--")
    kl_ax.set_xlabel(label)
    kl_ax.set_ylabel("first-token KL base→steered (neutral)")
    kl_ax.grid(alpha=0.2, which="both")
    return _save(figure, path)


METHOD_PANELS = (("refused", "refused (refusal rate)"), ("genuine_strong_comply", "genuine strong comply"))


def methods_figure(result: dict[str, Any], path: Path) -> Path:
    """Held-out rate against first-token KL (probe half, base→steered), one curve per method.

    Left: refusal rate; right: genuine compliance. Each curve is the method's fixed strength grid;
    hollow markers are the strengths the searches chose (their held-out rates and probe KL). The
    x axis is symlog, so KL 0 (no steering) is drawn.
    """
    figure = Figure(figsize=(10, 3.8))
    axes = figure.subplots(1, 2, sharey=True)
    kls = [p["kl_base_to_steered"] for c in result["curves"].values() for p in c["points"]]
    linthresh = min([k for k in kls if k > 0], default=1e-3)  # the linear part near KL 0 ends at the smallest KL
    cycle = [f"C{i}" for i in range(10)]
    for ax, (rate, title) in zip(axes, METHOD_PANELS):
        for index, (method, curve) in enumerate(result["curves"].items()):
            colour = cycle[index % len(cycle)]
            points = [p for p in sorted(curve["points"], key=lambda p: p["kl_base_to_steered"])
                      if p[rate]["rate"] is not None]
            ax.plot([p["kl_base_to_steered"] for p in points], [100 * p[rate]["rate"] for p in points],
                    marker="o", ms=3, color=colour, label=method)
            for row in result["methods"]:
                if row["method"] == method and row["held_out"][rate]["rate"] is not None:
                    ax.plot([row["kl_base_to_steered"]], [100 * row["held_out"][rate]["rate"]], marker="o", ms=8,
                            mfc="none", color=colour)
        baseline = result["baseline_held_out"][rate]["rate"]
        if baseline is not None:
            ax.axhline(100 * baseline, color="black", lw=0.8, ls=":", label="unsteered (run's responses)")
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlabel("first-token KL base→steered (neutral probe half)")
        ax.set_title(f"held-out {title}", fontsize=10)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.2, which="both")
    axes[0].set_ylabel("% of judged held-out responses")
    axes[1].legend(fontsize=7, frameon=False)
    return _save(figure, path)


def front_figure(result: dict[str, Any], path: Path) -> Path:
    """A refusal/KL front (``analysis/front_<study>.json``): held-out refusal rate (Wilson 95% bars) against
    held-out KL on the left, the same points' train objectives on the right; numbers label front indices.
    KL axes are symlog, so KL 0 is drawn."""
    figure = Figure(figsize=(10, 3.8))
    held_ax, train_ax = figure.subplots(1, 2, sharey=True)
    points = result["points"]
    panels = [(train_ax, "train (search)", [(p["train"]["kl"], p["train"]["refusal_rate"], None) for p in points])]
    held = [p["heldout"] for p in points if p.get("heldout")]
    if len(held) == len(points):
        panels.append((held_ax, "held-out", [(h["kl_base_to_steered"], h["refusal_rate"], h["refusal_ci"])
                                             for h in held]))
    else:
        held_ax.text(0.5, 0.5, "not evaluated on the holdout yet", ha="center", va="center",
                     transform=held_ax.transAxes)
    kls = [kl for _, _, values in panels for kl, _, _ in values if kl > 0]
    for ax, title, values in panels:
        order = sorted(range(len(values)), key=lambda i: values[i][0])
        ax.plot([values[i][0] for i in order], [100 * values[i][1] for i in order], marker="o", ms=4,
                color=COLOURS["resid"], drawstyle="steps-post")
        for i, (kl, rate, ci) in enumerate(values):
            if ci is not None and ci[0] is not None:
                ax.plot([kl, kl], [100 * ci[0], 100 * ci[1]], color=COLOURS["resid"], lw=0.8, alpha=0.6)
            ax.annotate(str(i), (kl, 100 * rate), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xscale("symlog", linthresh=min(kls, default=1e-3))
        ax.set_xlabel("first-token KL base→steered (neutral)")
        ax.set_title(f"{result['study']}: {title} front", fontsize=10)
        ax.grid(alpha=0.2, which="both")
    baseline = (result.get("baseline") or {}).get("refusal_rate")
    if baseline is not None:
        held_ax.axhline(100 * baseline, color="black", lw=0.8, ls=":", label="base model (held-out)")
        held_ax.legend(fontsize=7, frameon=False)
    held_ax.set_ylabel("refusal rate, % of judged")
    held_ax.set_ylim(-2, 102)
    return _save(figure, path)
