"""Report sections for the causal analyses and the category geometry, in the write-up's order.

Each renderer takes the analysis JSON and the run directory and returns HTML; importing this
module registers them in :data:`torsion.report.html.SECTIONS`.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Callable

from torsion.report.figures import SYMBOLS, front_figure, methods_figure, strength_figure
from torsion.report.geometry_figures import categories_figure, propagation_figure, random_control_figure
from torsion.report.html import SECTIONS, angle, embedded_png, interval, number, table


def _drawn(result: dict[str, Any], run_dir: Path, draw: Callable[[dict[str, Any], Path], Path], caption: str) -> str:
    """Draw the analysis' figure from its result into ``analysis/<name>.png`` and embed it."""
    return embedded_png(draw(result, run_dir / "analysis" / f"{result['analysis']}.png"), caption)


def propagation_section(result: dict[str, Any], run_dir: Path) -> str:
    """The write-up's propagation table: rows src, src+1, …, final; a column per source."""
    conventions = result["conventions"]
    sources = result["sources"]
    values = {(r["source"], r["layer"]): r for r in result["rows"]}
    final = max(layer for _, layer in values)
    blocks = []
    for stream, label in (("component", conventions["component"] + " output"), ("resid", "residual stream")):
        rows = []
        for layer in range(sources[0], final + 1):
            cells = []
            for source in sources:
                row = values.get((source, layer))
                cells.append(f"{number(row[f'cos_dh_axis_{stream}'], '+.3f')} / "
                             f"{number(row[f'cos_dh_source_{stream}'], '+.3f')} / "
                             f"{number(row[f'norm_ratio_{stream}'], '.2f')}" if row else "")
            name = f"{layer} (final)" if layer == final else str(layer)
            rows.append([name, *cells])
        blocks.append(f"<h3>{escape(label)}</h3>" + table(["block l", *(f"src={s}" for s in sources)], rows))
    norms = ", ".join(f"L{s} {number(result['applied_norm'][str(s)], '.2f')}" for s in sources)
    check = result.get("fast_path_check", {})
    return (
        "<h2>Causal propagation</h2>"
        f"<p>Inject Δ = α·v_s (α = {escape(str(conventions['alpha']))}, axis {escape(conventions['axis'])}, "
        f"positions {escape(conventions['positions'])}) at block s; at every block l ≥ s, over "
        f"{result['n_prompts']} prompts at the last token: cos(Δh_l, v_l) / cos(Δh_l, v_s) / norm_ratio "
        f"= ‖Δh_l‖/‖α v_s‖. Applied norms ‖α v_s‖: {norms}. Fast path: {escape(str(check.get('note', 'n/a')))}.</p>"
        + "".join(blocks) + _drawn(result, run_dir, propagation_figure, "propagation by source layer")
    )


def random_control_section(result: dict[str, Any], run_dir: Path) -> str:
    """Steering KL against norm-matched random directions, ±α, both KL directions."""
    rows = []
    for layer, arms in result["layers"].items():
        for arm, values in arms.items():
            for direction in ("kl_base_to_steered", "kl_steered_to_base"):
                summary = values[direction]
                rows.append([f"L{layer}", escape(arm), direction, number(values["applied_norm"], ".2f"),
                             number(summary["steering"], ".2e"), number(summary["random_min"], ".2e"),
                             number(summary["random_p5"], ".2e"), number(summary["random_mean"], ".2e"),
                             number(summary["random_median"], ".2e"), number(summary["random_p95"], ".2e"),
                             number(summary["random_max"], ".2e"), number(summary["percentile_rank"], ".0f"),
                             "yes" if summary["geometric_privilege"] else "no"])
    return (
        "<h2>Random-direction control</h2>"
        f"<p>First-token KL on {result['n_prompts']} neutral prompts of steering with α·v against "
        f"{result['n_random']} seeded Gaussian directions scaled to the same applied norm ‖α v‖, steering "
        f"{escape(str(result['conventions'].get('steered_positions', result['conventions'].get('positions'))))}. "
        "Privilege = steering KL below every random KL. "
        f"Fast path: {escape(str(result.get('fast_path_check', {}).get('note', 'n/a')))}.</p>"
        + table(["layer", "arm", "KL direction", "‖α v‖", "steering", "random min", "p5", "mean", "median",
                 "p95", "max", "percentile rank", "privilege"], rows, numeric_from=3)
        + _drawn(result, run_dir, random_control_figure,
                 "steering KL (red) among norm-matched random directions")
    )


def _pairwise_row(name: str, summary: dict[str, Any]) -> list[str]:
    return [escape(name), angle(summary.get("mean_deg")), angle(summary.get("sd_deg")),
            angle(summary.get("min_deg")), angle(summary.get("max_deg"))]


def categories_section(result: dict[str, Any], run_dir: Path) -> str:
    """Pairwise category-vector angles, angle to the global vector, comply-activation geometry."""
    to_global = [[escape(c), escape(str(result["anchors"].get(c))), angle(result["angle_to_global_deg"][c])]
                 for c in result["categories"]]
    comply = result["comply_activation"]
    rows = [_pairwise_row("refusal category vectors", result["vector_pairwise"]),
            _pairwise_row("comply activations", comply)]
    return (
        "<h2>Category geometry</h2>"
        f"<p>Angles per layer, averaged over blocks {escape(str(result['conventions']['layers']))}.</p>"
        + table(["pairs of", "mean", "σ", "min", "max"], rows)
        + table(["category", "complied anchor", "angle to global vector"], to_global, numeric_from=2)
        + (f"<p>{escape(comply['note'])}</p>" if comply.get("note") else "")
        + _drawn(result, run_dir, categories_figure, "pairwise angles between category vectors")
    )


def _rate(rate: dict[str, Any]) -> str:
    if rate.get("rate") is None:
        return "n/a"
    return f"{number(100 * rate['rate'])}% {interval([100 * v for v in rate['ci95']])} (n={rate['n']})"


def arditi_section(result: dict[str, Any], run_dir: Path) -> str:
    """Ablation on held-out harmful prompts and addition (one row per α) on held-out neutral prompts."""
    harmful, neutral = result["holdout_harmful"], result["neutral"]
    ablation_kl = result["kl_neutral_ablation"]["kl_base_to_steered"]
    rows = [["held-out harmful: refusal rate", "ablated", _rate(harmful["baseline"]), _rate(harmful["ablated"]),
             f"{number(ablation_kl, '.3g')} (neutral)"]]
    rows += [["neutral: refusal rate", f"added α = {added['alpha']:g} (‖α v‖ = {number(added['applied_norm'], '.2f')})",
              _rate(neutral["baseline"]), _rate(added), number(added["kl"]["kl_base_to_steered"], ".3g")]
             for added in neutral["added"]]
    return (
        "<h2>Is the direction causal? (Arditi et al. check)</h2>"
        f"<p>Direction: MD at block {result['layer']} (highest train-split AUC among blocks "
        f"{escape(result['conventions']['eligible_layers'])}). Rates are refused/judged responses with "
        "Wilson 95% intervals; no prompt used to choose the direction is evaluated, and each α is reported "
        "(none was chosen on these prompts).</p>"
        + table(["", "intervention", "baseline", "intervened", "first-token KL base→steered"], rows, numeric_from=2)
    )


def review_section(result: dict[str, Any], run_dir: Path) -> str:
    """Judge → false-positive correction → human review, and the genuinely-harmful count."""
    false_positives = result.get("false_positives", {})
    rows = [["judge complies (weak + strong)", str(result["judge_complies"])],
            *([f"changed by {escape(rule)}", str(count)] for rule, count in sorted(false_positives.items())),
            ["surviving complies", str(result["surviving_complies"])],
            ["reviewed", str(result["reviewed"])], ["pending", str(result["pending"])],
            ["overridden (not harmful / refusal)", str(result["overridden"])],
            ["confirmed harmful (weak + strong)", str(result.get("confirmed_harmful", "n/a"))],
            ["genuine strong complies (surviving correction and review)", str(result["genuinely_harmful"])]]
    pending = result["pending"]
    caveat = (f"{pending} item(s) are still pending and counted as they were judged, so the genuine count "
              "is an upper bound; "
              f"run <code>torsion review {escape(str(run_dir))}</code> to finish the pass." if pending else
              "Every surviving comply has been reviewed.")
    return ("<h2>Genuinely harmful responses</h2>"
            f"<p>{escape(result['conventions']['pipeline'])}. {caveat}</p>" + table(["stage", "count"], rows))


def _class_rate(rates: dict[str, Any], name: str) -> str:
    rate = rates.get(name)
    if not rate or rate.get("rate") is None:
        return "n/a"
    return f"{number(100 * rate['rate'])}% {interval([100 * v for v in rate['ci95']])}"


STRENGTH_CLASSES = ("strong_comply", "genuine_strong_comply", "weak_comply", "weak_refuse", "strong_refuse",
                    "degenerate")


def optimize_section(result: dict[str, Any], run_dir: Path) -> str:
    """One strength search: the frozen α, then in-sample and held-out rates of every class."""
    columns = [("baseline (train prompts)", result["baseline_in_sample"]), ("at α, in-sample", result["in_sample"]),
               ("baseline (holdout)", result.get("baseline_held_out")), ("at α, held-out", result.get("held_out"))]
    columns = [(title, values) for title, values in columns if values]
    rows = [[escape(name.replace("_", " "))] + [_class_rate(values["rates"], name) for _, values in columns]
            for name in STRENGTH_CLASSES]
    rows.append(["n prompts"] + [str(values["n_prompts"]) for _, values in columns])
    held = result.get("held_out")
    kl = (f" Held-out first-token KL base→steered {number(held['kl_base_to_steered'], '.3g')} "
          f"(other neutral half)." if held else " Not evaluated on the holdout yet (run without --no-evaluate).")
    finished = sum(t["state"] in ("COMPLETE", "PRUNED") for t in result["trials"])
    name = result.get("strength_name", "alpha")  # files written before steering methods searched alpha
    method = result.get("method", {}).get("name", "flat")
    return (
        f"<h2>Strength search: {escape(result['study'])}</h2>"
        f"<p>{escape(result['objective'])} objective, {escape(method)} steering with {escape(result['vector_key'])} "
        f"at blocks {escape(str(result['layers']))}, {finished} trials ({escape(result['settings']['sampler'])}); "
        f"chosen {SYMBOLS.get(name, escape(name))} = {number(result[name], '.3f')} (in-sample first-token KL "
        f"{number(result['in_sample']['kl_base_to_steered'], '.3g')}).{kl} Baselines are the run's own "
        "unsteered responses; rates are shares of judged responses with Wilson 95% intervals, after "
        "false-positive correction; genuine strong comply = strong complies that survive correction (and "
        "review, for the run's own responses; steered responses are not reviewed).</p>"
        + table([""] + [title for title, _ in columns], rows)
        + embedded_png(strength_figure(result, run_dir / "analysis" / f"optimize_{result['study']}.png"),
                       "class rates and KL against the strength; dashed: the chosen strength")
    )


def front_section(result: dict[str, Any], run_dir: Path) -> str:
    """A multi-objective study's front: every point's train and held-out numbers, hypervolumes, the figure."""
    rows = []
    for point in result["points"]:
        held, train, mp = point.get("heldout") or {}, point["train"], point["method_params"]
        source = "per-block" if mp["direction_index"] is None else number(mp["direction_index"], ".2f")
        rows.append([str(point["index"]), str(point["trial"]),
                     escape(f"{mp['components']}, peak {mp['peak_weight']:.2f}@{mp['peak_position']:.1f}, "
                            f"width {mp['width']:.1f}, floor {mp['floor']:.2f}, "
                            f"{point['params'].get('direction_source', 'refusal')} dir {source}"),
                     number(100 * train["refusal_rate"], ".1f", "%"), number(train["kl"], ".3g"),
                     number(100 * held["refusal_rate"], ".1f", "%") + " " + interval(held["refusal_ci"])
                     if held else "n/a", number(held.get("kl_base_to_steered"), ".3g"),
                     number(held.get("kl_steered_to_base"), ".3g"),
                     number(100 * held["genuine_rate"], ".1f", "%") if held else "n/a",
                     number(100 * held["degenerate_rate"], ".1f", "%") if held else "n/a",
                     number(100 * held["mcq_accuracy"], ".1f", "%") if held.get("mcq_accuracy") is not None
                     else "n/a",
                     number(held.get("perplexity_ratio"), ".3f")])
    base = result.get("baseline") or {}
    return (
        f"<h2>Refusal removal front: {escape(result['study'])}</h2>"
        f"<p>{escape(result['method'])} searched over the kernel with {result['n_trials']} trials "
        f"({escape(result['sampler'])}), minimising the train refusal rate and the probe first-token KL; the "
        f"{len(result['points'])} Pareto points are each evaluated once on the held-out harmful prompts and the "
        f"held-out neutral half. Hypervolume against {escape(str(result['reference_point']))}: train "
        f"{number(result['hypervolume_train'], '.4f')}, held-out {number(result['hypervolume_heldout'], '.4f')}. "
        f"Base model held-out refusal {number(100 * base['refusal_rate'], '.1f', '%') if base else 'n/a'}, MCQ "
        f"{number(100 * base['mcq_accuracy'], '.1f', '%') if base.get('mcq_accuracy') is not None else 'n/a'}. Bake a point with `torsion "
        "orthogonalize --from-study RUN_DIR/STUDY --pick ...`.</p>"
        + table(["#", "trial", "kernel", "train refusal", "train KL", "held-out refusal", "KL base→edited",
                 "KL edited→base", "genuine", "degenerate", "MCQ", "ppl ratio"], rows, numeric_from=3)
        + embedded_png(front_figure(result, run_dir / "analysis" / f"front_{result['study']}.png"),
                       "held-out refusal rate (Wilson 95%) against held-out KL, and the train front beside it")
    )


def _cell(share: dict[str, Any]) -> str:
    """A rate with its Wilson interval and n, from a :func:`torsion.judge.correction.share`."""
    return f"{_class_rate({'x': share}, 'x')} (n={share['n']})"


def methods_section(result: dict[str, Any], run_dir: Path) -> str:
    """Steering methods at their searched strengths on the holdout, matched-KL pairs, per-category rates."""
    rows = []
    for row in result["methods"]:
        held = row["held_out"]
        symbol = SYMBOLS.get(row["strength_name"], escape(row["strength_name"]))
        target = "refused" if row["objective"] == "refuse" else "genuine_strong_comply"
        rows.append([escape(row["method"]), escape(row["objective"]), f"{symbol} = {number(row['strength'], '.3g')}",
                     escape(str(row["layers"])), number(row["kl_base_to_steered"], ".3g"),
                     number(row["kl_steered_to_base"], ".3g"), _cell(held["refused"]),
                     _cell(held["genuine_strong_comply"]), _cell(held["degenerate"]),
                     _class_rate(row["in_sample"], target),
                     number(row["mcq_accuracy"], ".2f"), number(row["perplexity_ratio"], ".3f")])
    pairs = [[escape(p["objective"]), escape(" vs ".join(p["methods"])),
              " vs ".join(number(k, ".3g") for k in p["kl_base_to_steered"]), escape(p["rate"].replace("_", " ")),
              " vs ".join(_class_rate({"x": r}, "x") for r in p["held_out"]),
              escape(p["winner"] or "no difference resolved (intervals overlap)")] for p in result["matched_kl"]]
    categories = sorted({c for table in result["by_category"] for c in table["categories"]})
    by_category = [[escape(t["method"]), escape(t["objective"])]
                   + [f"{_class_rate(t['categories'][c], 'refused')} / "
                      f"{_class_rate(t['categories'][c], 'genuine_strong_comply')} (n={t['categories'][c]['n']})"
                      if c in t["categories"] else "n/a" for c in categories] for t in result["by_category"]]
    base = result["baseline_held_out"]
    return (
        "<h2>Steering methods compared on held-out prompts</h2>"
        f"<p>Each method's strength was searched on train prompts ({result['settings']['n_trials']} trials, "
        f"{escape(result['settings']['sampler'])}), frozen, and evaluated once on the holdout. KL is first-token "
        "base→steered (and steered→base) on the neutral probe half; rates are shares of judged responses with "
        "Wilson 95% intervals after false-positive correction. Unsteered holdout: refused "
        f"{_cell(base['refused'])}, genuine strong comply {_cell(base['genuine_strong_comply'])}.</p>"
        + table(["method", "objective", "strength", "blocks", "KL base→steered", "KL steered→base",
                 "refused, held-out", "genuine strong comply, held-out", "degenerate, held-out",
                 "target rate, in-sample", "MCQ accuracy", "perplexity ratio"], rows, numeric_from=4)
        + "<h3>Matched KL (within 5%)</h3>"
        + (table(["objective", "methods", "KL", "target rate", "held-out", "winner"], pairs, numeric_from=2)
           if pairs else "<p>No two methods of one objective landed within 5% KL of each other; compare the "
                         "curves.</p>")
        + embedded_png(methods_figure(result, run_dir / "analysis" / "methods.png"),
                       "held-out rate against KL, one curve per method (fixed strength grid); hollow: searched "
                       "strengths; dotted: unsteered")
        + "<h3>Held-out refused / genuine strong comply by category</h3>"
        + table(["method", "objective"] + categories, by_category, numeric_from=2)
    )


def asymmetry_section(result: dict[str, Any], run_dir: Path) -> str:
    """The write-up's asymmetry table for this model, then dense against flat steering."""
    rows = [[escape(row["property"]), escape(row["value"])] for row in result["table"]]
    dense = result["dense_vs_flat"]
    arms = []
    for name, arm in dense["arms"].items():
        held = arm.get("held_out") or {}
        arms.append([name, escape(str(arm["layers"] if name == "flat" else f"all {len(arm['layers'])}")),
                     number(arm["alpha"], ".3f"), number(arm["kl_probe"], ".3g"), number(arm.get("kl_eval"), ".3g"),
                     _class_rate(arm["in_sample"], "complied"), _class_rate(held, "complied"),
                     _class_rate(arm["in_sample"], "genuine_strong_comply"), _class_rate(held, "genuine_strong_comply"),
                     _class_rate(held, "degenerate")])
    return (
        "<h2>The refuse/comply asymmetry</h2>"
        f"<p>From the searches {escape(result['studies']['comply'])} and {escape(result['studies']['refuse'])}; "
        "rates are shares of judged responses; genuine = strong complies kept by false-positive correction "
        "(steered responses are not hand-reviewed).</p>"
        + table(["property", "this model"], rows, numeric_from=2)
        + f"<h3>Dense vs flat steering at matched KL: {escape(dense['verdict'])}</h3>"
        + table(["arm", "blocks", "α", "KL (probe)", "KL (held-out neutral)", "complied, in-sample",
                 "complied, held-out", "genuine strong comply, in-sample", "genuine strong comply, held-out",
                 "degenerate, held-out"], arms, numeric_from=2)
    )


SECTIONS.update(review=review_section, propagation=propagation_section, random_control=random_control_section,
                categories=categories_section, arditi=arditi_section,
                optimize=optimize_section, front=front_section, asymmetry=asymmetry_section, methods=methods_section)
