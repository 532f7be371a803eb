"""Report sections and figures for orthogonal motion, hedge geometry and the learning-curve floor.

Everything is drawn from ``analysis/motion.json``, ``analysis/hedge.json`` and
``analysis/stability.json`` alone (no model). Figures use matplotlib's object API (no pyplot,
no backend set at import). Importing this module registers the sections in
:data:`torsion.report.html.SECTIONS`.

Example::

    motion = json.loads((run_dir / "analysis" / "motion.json").read_text())
    motion_figure(motion, run_dir / "analysis" / "motion.png")
"""

from __future__ import annotations

import io
import math
from html import escape
from pathlib import Path
from typing import Any

from torsion.report.html import SECTIONS, angle, embedded_png, interval, number, p_value, table
from torsion.store import atomic_write_bytes

DPI = 110
AXES = (("steered_axis", "against the steered block's axis v̂_s", "-"),
        ("readout_axis", "against the readout block's axis v̂_r", "--"))


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def motion_figure(result: dict[str, Any], path: Path, *, position: str = "generated") -> Path:
    """Orthogonal fraction against ``α`` with its basic 95% band, per readout block, against both axes.

    The dotted line is the fraction of a random direction, ``sqrt(1 − 1/d)``, the control.
    """
    alphas = sorted(result["alphas"], key=float)
    blocks = [str(b) for b in result["readout_blocks"]]
    shown = sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]}, key=int)
    figure = _new_figure(6.4, 3.8)
    ax = figure.subplots()
    colours = ("#1f4e79", "#c55a11", "#548235")
    for colour, block in zip(colours, shown):
        for key, label, style in AXES:
            xs, ys, los, his = [], [], [], []
            for alpha in alphas:
                stats = result["alphas"][alpha]["blocks"][block].get(position, {}).get(f"orthogonal_fraction_{key}")
                if stats:
                    xs.append(float(alpha))
                    ys.append(stats["estimate"])
                    los.append(stats["ci95_basic"][0])
                    his.append(stats["ci95_basic"][1])
            if xs:
                ax.plot(xs, ys, style, color=colour, marker="o", ms=3, label=f"block {block}, {label}")
                ax.fill_between(xs, los, his, color=colour, alpha=0.12, lw=0)
    d_model = result.get("d_model")
    if d_model:
        ax.axhline(math.sqrt(1 - 1 / d_model), color="black", ls=":", lw=0.8, label="random direction")
    ax.set_xlabel("α (flat method, MD vectors)")
    ax.set_ylabel("orthogonal fraction ‖u − (u·v̂)v̂‖ / ‖u‖")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6.5, loc="lower left")
    ax.set_title(f"orthogonal motion at the {position} position, steered blocks {result['steered_blocks']}",
                 fontsize=9)
    return _save(figure, path)


def motion_section(result: dict[str, Any], run_dir: Path) -> str:
    """The write-up's orthogonal-motion numbers at the last readout block, with the figure."""
    block = str(result["readout_blocks"][-1])
    rows = []
    for alpha in sorted(result["alphas"], key=float):
        arm = result["alphas"][alpha]
        for position in ("generated", "last"):
            stats = arm["blocks"][block].get(position, {})
            if "u_norm" not in stats:
                rows.append([escape(alpha), position, *["n/a"] * 6])
                continue
            rows.append([escape(alpha), position, number(stats["u_norm"]["estimate"], ".2f"),
                         number(stats["u_dot_steered_axis"]["estimate"], "+.2f"),
                         f"{number(stats['orthogonal_fraction_steered_axis']['estimate'], '.3f')} "
                         f"{interval(stats['orthogonal_fraction_steered_axis']['ci95_basic'])}",
                         f"{number(stats['orthogonal_fraction_readout_axis']['estimate'], '.3f')} "
                         f"{interval(stats['orthogonal_fraction_readout_axis']['ci95_basic'])}",
                         angle(stats.get("compliance_destination_deg"), "no complied steered response"),
                         number(arm["rates"]["complied"]["rate"], ".2f")])
    figure = motion_figure(result, run_dir / "analysis" / "motion.png")
    return ("<h2>Orthogonal motion</h2>"
            f"<p>u(α) = mean steered − mean unsteered resid over {result['n_prompts']} held-out prompts; "
            f"readout block {escape(block)}; basic bootstrap 95% intervals (B = {result['B']}). A random "
            "direction's orthogonal fraction is about 1: a fraction near 1 says the model moved sideways, not "
            "along the push.</p>"
            + table(["α", "position", "‖u‖", "u·v̂_s", "fraction vs v̂_s [95%]", "fraction vs v̂_r [95%]",
                     "compliance destination", "complied rate"], rows, numeric_from=2)
            + embedded_png(figure, "orthogonal fraction against α (bands: basic 95% intervals)"))


def hedge_figure(result: dict[str, Any], path: Path) -> Path:
    """Per readout block with geometry: the hedge at ``(t, bow)`` on the refuse (0) → comply (1) segment.

    Error bars are the basic 95% intervals; the grey band is the on-line null's 95th percentile
    of ``bow``, the control.
    """
    blocks = [(b, r) for b, r in result["blocks"].items() if r.get("geometry") == "ok"]
    figure = _new_figure(6.4, 3.4)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 0], color="black", lw=1.5)
    ax.annotate("refuse a", (0, 0), textcoords="offset points", xytext=(-10, -14), fontsize=8)
    ax.annotate("comply b", (1, 0), textcoords="offset points", xytext=(-10, -14), fontsize=8)
    for index, (block, entry) in enumerate(blocks):
        t, bow = entry["t"], entry["bow"]
        x_err = [[t["estimate"] - t["ci95_basic"][0]], [t["ci95_basic"][1] - t["estimate"]]]
        y_err = [[bow["estimate"] - bow["ci95_basic"][0]], [bow["ci95_basic"][1] - bow["estimate"]]]
        ax.errorbar([t["estimate"]], [bow["estimate"]], xerr=x_err, yerr=y_err, fmt="o", ms=4, capsize=2,
                    label=f"block {block}: p = {entry['bow_null']['p_value']:.3g}")
        ax.axhspan(0, entry["bow_null"]["p95"], color="black", alpha=0.04 if index else 0.08, lw=0)
    ax.set_xlabel("t (position along a → b)")
    ax.set_ylabel("bow (distance from the line / ‖b − a‖)")
    if blocks:
        ax.legend(fontsize=7)
    ax.set_title("hedge centroid on the refuse → comply segment (grey: on-line null, 95th pct)", fontsize=9)
    return _save(figure, path)


def hedge_section(result: dict[str, Any], run_dir: Path) -> str:
    rows = []
    for block, entry in result["blocks"].items():
        counts = entry["counts"]
        count_text = f"{counts['refused']} / {counts['strong_comply']} / {counts['hedge']}"
        if entry.get("geometry") != "ok":
            rows.append([escape(block), count_text, "n/a", "n/a", "n/a",
                         escape(entry.get("note") or f"below m = {entry['m']}: about {entry['prompts_needed']} prompts needed")])
            continue
        rows.append([escape(block), count_text,
                     f"{number(entry['t']['estimate'], '.2f')} {interval(entry['t']['ci95_basic'])}",
                     f"{number(entry['bow']['estimate'], '.2f')} {interval(entry['bow']['ci95_basic'])}",
                     p_value(entry["bow_null"]["p_value"]),
                     f"wobble a/b/h {', '.join(f'{v:.1f}°' for v in entry['centroid_wobble_deg'].values())}"])
    figure = hedge_figure(result, run_dir / "analysis" / "hedge.png")
    causal = result.get("causal_test", {})
    if causal.get("run"):
        hedge, random = causal["hedge_direction"], causal["random"]
        changes, weak = hedge["rate_change"], random["rate_change"]["weak_comply"]
        causal = {"note": f"steering along h − a at block {causal['block']} (‖Δ‖ = {causal['applied_norm']:.2f}) "
                          f"moves weak_comply by {changes['weak_comply']:+.2f} and strong_comply by "
                          f"{changes['strong_comply']:+.2f} (consistency {hedge['consistency']['share']}); "
                          f"{random['n']} random directions: weak_comply {weak['mean']:+.2f} "
                          f"(range {weak['min']:+.2f}…{weak['max']:+.2f})"}
    return ("<h2>Hedge geometry</h2>"
            f"<p>Steered decoding-time states pooled over α = {escape(', '.join(result['pooled_over_alphas']))}, "
            "grouped by the judge's label: a = refused, b = strong comply, h = hedge (weak comply). "
            f"Null: on-line pseudo-hedges, P = {result['P']}, one-sided p. "
            f"Causal hedge test: {escape(causal.get('note', 'not recorded'))}.</p>"
            + table(["block", "n a / b / h", "t [95%]", "bow [95%]", "p (bow > on-line null)", "note"], rows,
                    numeric_from=1)
            + embedded_png(figure, "the hedge's t and bow with basic 95% intervals"))


def stability_figure(result: dict[str, Any], path: Path, *, component: str = "resid") -> Path:
    """Learning curves of the global MD vector (three blocks) and every knot (middle block), with fitted curves.

    The dashed line is the structural threshold, the control for the fitted floors.
    """
    entries = [e for e in result["entries"] if e["component"] == component]
    n_blocks = 1 + max((e["block"] for e in entries), default=0)
    chosen = {n_blocks // 4, n_blocks // 2, (3 * n_blocks) // 4}
    shown = [e for e in entries if (e["kind"] == "global" and e["block"] in chosen)
             or (e["kind"] == "bin" and e["block"] == n_blocks // 2)]
    figure = _new_figure(6.4, 3.8)
    ax = figure.subplots()
    shown_sizes = slice(None, -1) if _reference(result) == "pool" else slice(None)  # pool: n = N is 0 by construction
    for entry in shown:
        sizes, curve = entry["sizes"][shown_sizes], entry["instability_deg"][shown_sizes]
        line = ax.plot(sizes, curve, "o", ms=3, label=f"{entry['kind']} {entry['name']} block {entry['block']}")[0]
        if entry["k"] is not None:
            fitted = [entry["k"] / n ** entry["a"] + entry["floor_deg"] for n in sizes]
            ax.plot(sizes, fitted, "-", color=line.get_color(), lw=1)
            ax.axhline(entry["floor_deg"], color=line.get_color(), lw=0.6, ls=":")
    ax.axhline(result["threshold_deg"], color="black", ls="--", lw=0.8, label="structural threshold")
    if any(len(entry["sizes"]) > 1 for entry in shown):
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no pool large enough for a curve", ha="center", transform=ax.transAxes)
    ax.set_xlabel("pool size n")
    ax.set_ylabel("instability (deg)")
    ax.legend(fontsize=6.5)
    ax.set_title(f"learning curves k/n^a + floor ({component}; dotted: fitted floors)", fontsize=9)
    return _save(figure, path)


def _reference(result: dict[str, Any]) -> str:
    """The stability file's reference (``parameters.reference``; files written before it are ``pool``)."""
    return str((result.get("parameters") or {}).get("reference", "pool"))


def stability_section(result: dict[str, Any], run_dir: Path) -> str:
    rows = [[escape(s["kind"]), escape(s["name"]), escape(s["component"]), str(s["n_pool"]),
             number(s["median_floor_deg"], ".1f"), escape(", ".join(map(str, s["structural_blocks"])) or "none")]
            for s in result["summary"]]
    figure = stability_figure(result, run_dir / "analysis" / "stability.png")
    skipped = "; ".join(result["skipped"]) or "none"
    return ("<h2>Learning-curve floor</h2>"
            + (f"<p>Instability = mean angle of subsample estimates to the full pool's (methods.md; B = {result['B']}, "
               if _reference(result) == "pool" else
               "<p>Instability = mean angle between two disjoint subsamples of n rows each (reference split, a "
               "deviation from methods.md's full-pool reference, which forces the curve to 0 at n = N and so "
               f"hides any floor; B = {result['B']}, ")
            + f"{result['n_sizes']} sizes from m = {result['m']}); a floor whose lower CI exceeds "
            f"{result['threshold_deg']:.0f}° is structural and a spline should not trust that knot. "
            f"Skipped: {escape(skipped)}.</p>"
            + table(["kind", "name", "component", "N", "median floor (deg)", "structural blocks"], rows,
                    numeric_from=3)
            + embedded_png(figure, "learning curves with fitted k/n^a + floor"))


SECTIONS.update(motion=motion_section, hedge=hedge_section, stability=stability_section)
