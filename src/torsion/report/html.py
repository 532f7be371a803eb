"""``report.html``: one self-contained page per run directory, in the write-up's order.

The page renders whatever the run directory holds and says what it does not. Figures are
inline base64 PNG (also written to ``analysis/<name>.png``), the CSS is inline, and nothing
is fetched from elsewhere. Every value read from a file is escaped.

Each ``analysis/*.json`` file is rendered by ``SECTIONS[result["analysis"]]``, a function
``(result, run_dir) -> html``, in the order of ``ORDER``; a file with no renderer is listed
under "Other analyses" with a link. Adding a section is one function and one registry entry.

Example::

    build_report(Path("runs/smoke"))                  # -> runs/smoke/report.html
    SECTIONS["propagation"] = propagation_section     # a new section
"""

from __future__ import annotations

import base64
import json
import math
import statistics
from collections.abc import Callable, Iterable
from html import escape
from itertools import repeat
from pathlib import Path
from typing import Any
from urllib.parse import quote

from torsion.errors import TorsionError
from torsion.judge.base import LABELS
from torsion.judge.correction import FP_ECHO, FP_REFUSE, Corrected, corrected_row, refusal_rate
from torsion.report.figures import rotation_angle_figure, split_half_figure
from torsion.review.decisions import read_decisions
from torsion.store import RunDir, atomic_write_text, read_jsonl

Section = Callable[[dict[str, Any], Path], str]

ORDER = ("review", "rotation", "propagation", "random_control", "categories", "arditi", "optimize", "front", "asymmetry",
         "motion", "hedge", "stability", "methods")
# what the main pipeline writes, and the stage that writes it
EXPECTED_FILES = {"prompts.jsonl": "prompts", "responses.jsonl": "generate", "activations.safetensors": "capture",
                  "vectors.safetensors": "vectors", "analysis/rotation.json": "rotation"}
EXAMPLES_PER_LABEL = 2
EXAMPLE_CHARS = 600
SHORT_SHA = 12
NOT_RECORDED = "not recorded in manifest.json"
NOT_COMPUTED = "not computed: missing, null or NaN in the result file"

CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#e4e4e7;--accent:#1f4e79}
body{font:15px/1.55 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);max-width:1080px;
margin:2rem auto;padding:0 1.2rem}h1{font-size:1.5rem;margin:0 0 .3rem}h3{font-size:1rem;margin:1.3rem 0 .3rem}
h2{font-size:1.2rem;margin-top:2.2rem;padding-bottom:.2rem;border-bottom:1px solid var(--line)}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:13px}th{background:#f6f7f9}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);vertical-align:top;text-align:left}
th.n,td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.note{font-size:12.5px;background:#fbfcfe;border-left:3px solid var(--accent)}.missing{color:#a33}
.muted,figcaption,footer{color:var(--muted);font-size:13px}.na{border-bottom:1px dotted;cursor:help}
.warn{background:#fff6e5;border-left:3px solid #d08a00;padding:.5rem .8rem;margin:.6rem 0}
figure{margin:1.2rem 0}img{max-width:100%;height:auto}footer{margin-top:3rem;border-top:1px solid var(--line)}
pre{white-space:pre-wrap;word-break:break-word;background:#fafafa;border:1px solid var(--line);padding:.5rem;
font-size:12px}
"""


# ----- formatting: every number on the page goes through these -----

def not_available(why: str) -> str:
    """``n/a`` with a tooltip saying why; used wherever a number is missing or not finite."""
    return f'<span class="na" title="{escape(why)}">n/a</span>'


def number(value: Any, spec: str = ".1f", unit: str = "", why: str = NOT_COMPUTED) -> str:
    """``value`` formatted with ``spec`` and ``unit``; ``n/a`` for None, NaN, inf or a non-number."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:{spec}}{unit}" if finite else not_available(why)


def angle(value: Any, why: str = NOT_COMPUTED) -> str:
    """An angle in degrees to 0.1°."""
    return number(value, ".1f", "°", why)


def p_value(value: Any, why: str = NOT_COMPUTED) -> str:
    """A p-value to 3 significant figures."""
    return number(value, ".3g", why=why)


def interval(bounds: Any, why: str = NOT_COMPUTED) -> str:
    """``[lo, hi]`` to one decimal (the unit is in the column header)."""
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        return not_available(why)
    return f"[{number(bounds[0], why=why)}, {number(bounds[1], why=why)}]"


def table(header: list[str] | None, rows: Iterable[list[str]], numeric_from: int = 1,
          notes: Iterable[str] | None = None) -> str:
    """A table whose columns from ``numeric_from`` on are right-aligned numbers.

    Header strings are escaped (None: no header row); cells are HTML already (escape text
    before passing it). A note, when given, is a full-width row under its row.
    """
    def align(i: int) -> str:
        return ' class="n"' if i >= numeric_from else ""

    head = "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header or []))
    body = ""
    for cells, note in zip(rows, repeat(None) if notes is None else notes):
        body += "<tr>" + "".join(f"<td{align(i)}>{cell}</td>" for i, cell in enumerate(cells)) + "</tr>"
        if note is not None:
            body += f'<tr><td class="note" colspan="{len(cells)}">{note}</td></tr>'
    return f'<div class="scroll"><table>{f"<tr>{head}</tr>" if head else ""}{body}</table></div>'


def embedded_png(path: Path, caption: str) -> str:
    """The PNG at ``path`` as an inline ``<img>`` with a caption."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _text(value: Any, why: str = NOT_RECORDED) -> str:
    return not_available(why) if value is None or value == "" else escape(str(value))


# ----- header -----

def _header(run_dir: Path, manifest: dict[str, Any], n_prompts: int | None) -> str:
    model, config = manifest.get("model", {}), manifest.get("config", {})
    model_id = model.get("model_id") or config.get("model")
    weights = model.get("weights_sha256")
    dataset = manifest.get("dataset_sha256")
    rows = [["model", _text(model_id)],
            ["weights sha256", _text(weights[:SHORT_SHA] + "…" if weights else None)],
            ["profile", _text(config.get("profile"))],
            ["prompts", _text(n_prompts, "no prompts.jsonl and no n_prompts in manifest.json")],
            ["seed", _text(manifest.get("seed", config.get("seed")))],
            ["torsion", _text(manifest.get("torsion_version"))],
            ["layers × d_model", _text(f"{model['n_layers']} × {model['d_model']}"
                                       if "n_layers" in model and "d_model" in model else None)],
            ["dataset sha256", _text(dataset[:SHORT_SHA] + "…" if dataset else None)]]
    rows += [[group, escape(" · ".join(f"{key} {value}" for key, value in manifest[group].items()))]
             for group in ("versions", "generation") if manifest.get(group)]
    stages = [[escape(name), "yes" if info.get("done") else "no",
               number(info.get("seconds"), why="no time recorded")]
              for name, info in manifest.get("stages", {}).items()]
    return (f"<h1>torsion report: {_text(model_id)}</h1><p class=muted>run directory {escape(run_dir.name)}</p>"
            + table(None, rows, numeric_from=2)
            + "<h3>Time per stage</h3>"
            + (table(["stage", "done", "time (s)"], stages, numeric_from=2) if stages
               else f"<p class=missing>{escape(NOT_RECORDED)}: no stage has run.</p>"))


# ----- behaviour -----

def _label_rows(groups: dict[str, list[dict[str, Any]]], behaviour: dict[int, Corrected]) -> list[list[str]]:
    rows = []
    for name, group in groups.items():
        rate = refusal_rate(behaviour[id(r)] for r in group)
        why = "no judged responses in this group"
        rows.append([escape(name), str(len(group)), *(str(sum(r.get("label") == label for r in group))
                                                      for label in LABELS),
                     *(str(sum(behaviour[id(r)].correction == c for r in group)) for c in (FP_REFUSE, FP_ECHO)),
                     number(None if rate["rate"] is None else 100 * rate["rate"], why=why),
                     interval(None if rate["ci95"] is None else [100 * v for v in rate["ci95"]], why=why)])
    return rows


def _corrected(prompts: dict[str, dict[str, Any]], responses: list[dict[str, Any]],
               decisions: dict[str, str]) -> dict[int, Corrected]:
    """Each row's behaviour after correction and review, keyed by ``id(row)``; a malformed row counts as
    not judged (the report shows what the run holds and never fails on it)."""
    behaviour = {}
    for r in responses:
        try:
            behaviour[id(r)] = corrected_row(r, str(prompts.get(r.get("id"), {}).get("prompt", "")),
                                             decisions.get(r.get("id")))
        except (KeyError, ValueError, TypeError):
            behaviour[id(r)] = Corrected(str(r.get("label")), None, None)
    return behaviour


def _clip(text: Any) -> str:
    text = str(text)
    hidden = len(text) - EXAMPLE_CHARS
    return text if hidden <= 0 else f"{text[:EXAMPLE_CHARS]} … [{hidden} more characters]"


def _examples(responses: list[dict[str, Any]], prompts: dict[str, dict[str, Any]]) -> str:
    blocks = []
    for label in LABELS:
        for row in [r for r in responses if r.get("label") == label][:EXAMPLES_PER_LABEL]:
            prompt = prompts.get(row.get("id"), {})
            reasons = ", ".join(map(str, row.get("reasons") or [])) or "no reasons recorded"
            blocks.append(f"<h3>{escape(label)} <span class=muted>{escape(str(row.get('id')))} · "
                          f"{escape(str(row.get('judge')))} · {escape(reasons)}</span></h3>"
                          f"<pre>{escape(_clip(prompt.get('prompt', '(prompt not in prompts.jsonl)')))}</pre>"
                          f"<pre>{escape(_clip(row.get('response', '')))}</pre>")
    return "<details><summary>Example responses (up to {} per label)</summary>{}</details>".format(
        EXAMPLES_PER_LABEL, "".join(blocks))


def _behaviour(prompts: dict[str, dict[str, Any]], responses: list[dict[str, Any]], decisions: dict[str, str]) -> str:
    if not responses:
        return ("<h2>Behaviour</h2><p class=missing>No judged responses: responses.jsonl is missing or empty "
                "(the generate stage has not run).</p>")
    by_source: dict[str, list[dict[str, Any]]] = {"all": list(responses)}
    by_split: dict[str, list[dict[str, Any]]] = {"all": list(responses)}
    for row in responses:
        prompt = prompts.get(row.get("id"), {})
        by_source.setdefault(str(prompt.get("source", "unknown")), []).append(row)
        by_split.setdefault(str(prompt.get("split", "unknown")), []).append(row)
    header = ["n", *LABELS, FP_REFUSE, FP_ECHO, "refusal rate (%)", "Wilson 95% CI (%)"]
    behaviour = _corrected(prompts, responses, decisions)
    return ("<h2>Behaviour</h2><p>Refusal rate = refused / judged: refused means score +0.5 or +1 after "
            "false-positive correction and human review (an fp_refuse counts as refused); judged is every "
            "response but judge_error, degenerate included. Class columns are the judge's labels; "
            "fp_refuse / fp_echo count the complies the correction changed. Intervals are Wilson 95%.</p>"
            + table(["source", *header], _label_rows(by_source, behaviour))
            + table(["split", *header], _label_rows(by_split, behaviour))
            + _examples(responses, prompts))


# ----- axis rotation -----

def _median(values: Iterable[Any]) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _rotation_rows(components: dict[str, Any], reference: str, basic: bool) -> list[list[str]]:
    rows = []
    for name, c in components.items():
        boot, null, split = c["prompt_bootstrap"], c["null"], c["split_half"]
        basic_ci = [interval(boot.get("mean_ci95_basic"), why="not in this rotation.json")] if basic else []
        rows.append([escape(name), f"{angle(c['mean_deg'])} {interval(boot['mean_ci95'])}", *basic_ci,
                     angle(c["depth_sigma_deg"], "needs at least two layer pairs"),
                     f"{angle(null['mean_deg'])} {interval([null['p2_5'], null['p97_5']])}",
                     p_value(null["p_value"]), angle(_median(split["same_layer_angle_deg"])),
                     angle(split["mean_corrected_angle_deg"], "no layer pair has both split-half reliabilities > 0"),
                     reference])
    return rows


def _rotation_warnings(components: dict[str, Any], reliable_below_deg: Any = None) -> str:
    null_like = [name for name, c in components.items() if c.get("differs_from_null") is False]
    noisy = [name for name, c in components.items() if c.get("reliable") is False]
    warnings = []
    if null_like:
        warnings.append(f"{', '.join(null_like)}: indistinguishable from the shuffled-label null, so at this "
                        "sample size the angle does not measure a refusal axis.")
    if noisy:
        threshold = (f": median split-half same-layer angle ≥ {reliable_below_deg:g}°"
                     if isinstance(reliable_below_deg, (int, float)) else "")
        warnings.append(f"{', '.join(noisy)}: noise-dominated (large split-half same-layer angles{threshold}).")
    return "".join(f"<p class=warn>{escape(text)}</p>" for text in warnings)


def rotation_section(result: dict[str, Any], run_dir: Path) -> str:
    """The "Axis rotation" section from ``analysis/rotation.json`` (schema_version 1).

    Writes ``analysis/rotation_angles.png`` and ``analysis/rotation_split_half.png``.
    """
    components = result["components"]
    reference = f"{angle(result['random_reference']['mean_deg'])} ± {angle(result['random_reference']['sd_deg'])}"
    if not components:
        return "<h2>Axis rotation</h2><p class=missing>analysis/rotation.json holds no components.</p>"
    conventions = result.get("conventions", {})
    first = next(iter(components.values()))
    basic = any("mean_ci95_basic" in c["prompt_bootstrap"] for c in components.values())
    header = ["component", "mean angle [prompt-bootstrap percentile 95% CI]",
              *(["prompt-bootstrap basic 95% CI (clipped to 0–180°)"] if basic else []),
              "depth σ", "shuffled-label null mean [2.5, 97.5]", "p", "split-half same-layer angle (median)",
              "reliability-corrected angle (mean)", "random reference"]
    setup = ", ".join(f"{label} {_text(value, 'not recorded')}" for label, value in (
        ("axis", conventions.get("axis")), ("position", conventions.get("position")),
        ("split", conventions.get("split")), ("seed", result.get("seed")),
        ("prompt bootstrap B =", first["prompt_bootstrap"].get("B")),
        ("shuffled-label null P =", first["null"].get("P")), ("split halves", first["split_half"].get("n_splits"))))
    dispersion = [[escape(name), angle(c["mean_deg"]), interval(c["dispersion_bootstrap"]["mean_ci95"]),
                   _text(c["dispersion_bootstrap"].get("B"), "not recorded")] for name, c in components.items()]
    angles_png = rotation_angle_figure(result, run_dir / "analysis" / "rotation_angles.png")
    split_png = split_half_figure(result, run_dir / "analysis" / "rotation_split_half.png")
    return (
        "<h2>Axis rotation</h2><p>Angle between adjacent layers' refusal axes, θ<sub>l</sub> = "
        f"angle(v<sub>l</sub>, v<sub>l+1</sub>), on {_text(result.get('n_refused'))} refused / "
        f"{_text(result.get('n_complied'))} complied prompts ({setup}). Two unrelated directions in "
        f"d = {_text(result.get('d_model'))} sit at {reference}.</p>"
        + _rotation_warnings(components,
                             result.get("parameters", {}).get("reliable_median_split_half_angle_below_deg"))
        + table(header, _rotation_rows(components, reference, basic),
                notes=[escape(str(c.get("verdict", "no verdict recorded"))) for c in components.values()])
        + "<h3>Dispersion bootstrap (ignores prompt sampling)</h3><p class=muted>The write-up's interval: it "
          "resamples the per-pair angles, so it reflects spread over depth, not the uncertainty from drawing "
          "other prompts. The prompt-bootstrap interval above is the one to quote.</p>"
        + table(["component", "mean angle", "dispersion bootstrap (ignores prompt sampling) 95% CI", "B"],
                dispersion)
        + embedded_png(angles_png, "Adjacent-pair angle per layer pair with its prompt-bootstrap 95% band; grey: "
                                   "shuffled-label null of the mean angle (2.5–97.5%); dashed: random directions "
                                   "(±1 sd); dotted: split-half same-layer angle per layer.")
        + embedded_png(split_png, "Split-half same-layer angle per layer: near 0° the axis is stable across "
                                  "halves of the prompts, near 90° it is noise."))


SECTIONS: dict[str, Section] = {"rotation": rotation_section}


# ----- the page -----

def _read_analyses(analysis_dir: Path) -> tuple[list[tuple[str, Path, dict[str, Any]]], list[str]]:
    """Parsed ``analysis/*.json`` as (name, path, result), and notes on files that could not be read."""
    analyses, unreadable = [], []
    for path in sorted(analysis_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            unreadable.append(f"analysis/{path.name} is not valid JSON ({error})")
            continue
        if isinstance(result, dict):
            analyses.append((str(result.get("analysis") or path.stem), path, result))
        else:
            unreadable.append(f"analysis/{path.name} does not hold a JSON object")
    return analyses, unreadable


def _section(name: str, path: Path, result: dict[str, Any], run_dir: Path) -> str:
    try:
        return SECTIONS[name](result, run_dir)
    except KeyError as error:
        version = _text(result.get("schema_version"), "not recorded")
        return (f"<h2>{escape(name)}</h2><p class=missing>analysis/{escape(path.name)} lacks the key "
                f"{escape(str(error))} (schema_version {version}); rerun the {escape(name)} stage with this "
                "torsion version.</p>")


def _other(entries: list[tuple[str, Path]], unreadable: list[str]) -> str:
    if not entries and not unreadable:
        return ""
    items = [f'<li>{escape(name)}: <a href="analysis/{escape(quote(path.name))}">analysis/{escape(path.name)}</a>'
             "</li>" for name, path in entries] + [f"<li class=missing>{escape(note)}</li>" for note in unreadable]
    return f"<h2>Other analyses</h2><ul>{''.join(items)}</ul>"


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically from whatever the run directory holds; return its path."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    prompt_rows = read_jsonl(run.prompts_path)
    prompts = {row.get("id"): row for row in prompt_rows}
    n_prompts = len(prompt_rows) if run.prompts_path.is_file() else manifest.get("n_prompts")
    analyses, unreadable = _read_analyses(run.root / "analysis")
    rank = {name: i for i, name in enumerate(ORDER)}
    rendered = sorted((a for a in analyses if a[0] in SECTIONS), key=lambda a: (rank.get(a[0], len(ORDER)), a[0]))
    missing = [f"{name} (the {stage} stage has not run)"
               for name, stage in EXPECTED_FILES.items() if not (run.root / name).is_file()]
    missing += [f"stage {name} started but not finished"
                for name, info in manifest.get("stages", {}).items() if not info.get("done")]
    parts = [_header(run.root, manifest, n_prompts)]
    if missing:
        parts.append(f"<p class=warn>Not in this run yet: {escape('; '.join(missing))}.</p>")
    try:
        decisions = read_decisions(run.root)
    except TorsionError as error:  # the report shows what it can; the behaviour table then ignores review
        decisions = {}
        parts.append(f"<p class=warn>{escape(str(error))}</p>")
    parts.append(_behaviour(prompts, read_jsonl(run.responses_path), decisions))
    if not any(name == "rotation" for name, _, _ in analyses):
        parts.append("<h2>Axis rotation</h2><p class=missing>analysis/rotation.json is missing "
                     "(the rotation stage has not run).</p>")
    parts += [_section(name, path, result, run.root) for name, path, result in rendered]
    parts.append(_other([(name, path) for name, path, _ in analyses if name not in SECTIONS], unreadable))
    parts.append("<footer>Conventions: layer l = decoder block l; angles from the signed cosine. "
                 "Angles are in degrees to 0.1°, p-values to 3 significant figures; n/a marks a value that "
                 "was not computed (hover for why).</footer>")
    title = escape(str(manifest.get("model", {}).get("model_id") or run.root.name))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>torsion report: {title}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    atomic_write_text(run.report_path, page)
    return run.report_path
