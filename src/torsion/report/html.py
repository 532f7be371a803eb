"""``report.html``: one self-contained page per run, in the write-up's order.

Sections render what the run directory holds and say what it does not. Each analysis file
has a section renderer keyed by its ``analysis`` name; an unknown analysis is listed with a
link to its JSON.

Example::

    build_report(Path("runs/qwen2.5-coder-0.5b-quick"))
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Callable

from torsion.judge.base import LABELS, is_complied, is_refused
from torsion.report.figures import reliability_figure, rotation_figure
from torsion.stats import wilson_interval
from torsion.store import RunDir, atomic_write_bytes, atomic_write_text, read_jsonl

ORDER = ("rotation", "propagation", "random_control", "categories", "asymmetry")

CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}td,th{padding:3px 9px;border-bottom:1px solid #eee}
th{text-align:left;background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666;font-size:13px}.verdict{background:#f3f7fb;border-left:3px solid #1f4e79;padding:.4em .8em;margin:.4em 0}
img{max-width:100%}pre{white-space:pre-wrap;background:#fafafa;padding:.5em;font-size:12px;border:1px solid #eee}
.missing{color:#a33}
"""


def _number(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span title="not available: too few samples or not computed">n/a</span>'
    return f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(run: RunDir, name: str, png: bytes) -> str:
    atomic_write_bytes(run.root / "analysis" / f"{name}.png", png)
    return f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _header(run: RunDir, manifest: dict) -> str:
    model, config = manifest.get("model", {}), manifest.get("config", {})
    sha = model.get("weights_sha256") or ""
    rows = [["model", escape(str(model.get("model_id", config.get("model", "?"))))],
            ["weights sha256", escape(sha[:16] + "…" if sha else "n/a")],
            ["profile", escape(str(config.get("profile", "?")))],
            ["prompts", str(manifest.get("n_prompts", "?"))], ["seed", str(manifest.get("seed", "?"))],
            ["torsion", escape(str(manifest.get("torsion_version", "?")))]]
    stages = manifest.get("stages", {})
    stage_rows = [[escape(name), _number(info.get("seconds"), 1, " s")] for name, info in stages.items()]
    return (f"<h1>torsion report</h1><p class=meta>{escape(str(run.root))}</p>"
            + _table(["", ""], rows, numeric_from=2) + "<h3>Time per stage</h3>"
            + _table(["stage", "time"], stage_rows))


def _behaviour(run: RunDir) -> str:
    if not (run.prompts_path.is_file() and run.responses_path.is_file()):
        return '<h2>Behaviour</h2><p class="missing">No responses yet: the generate stage has not run.</p>'
    prompts = {row["id"]: row for row in read_jsonl(run.prompts_path)}
    responses = read_jsonl(run.responses_path)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in responses:
        prompt = prompts.get(row["id"], {})
        groups.setdefault((prompt.get("source", "?"), prompt.get("split", "?")), []).append(row)
    rows = []
    for (source, split), group in sorted(groups.items()):
        counts = [sum(r["label"] == label for r in group) for label in LABELS]
        refused = sum(is_refused(r["score"]) for r in group)
        judged = refused + sum(is_complied(r["score"]) for r in group)
        lo, hi = wilson_interval(refused, judged)
        rate = refused / judged if judged else math.nan
        rows.append([escape(source), escape(split), *map(str, counts),
                     f"{_number(100 * rate)}% [{_number(100 * lo)}, {_number(100 * hi)}]"])
    examples = []
    for label in LABELS:
        sample = [r for r in responses if r["label"] == label][:2]
        for row in sample:
            prompt = prompts.get(row["id"], {}).get("prompt", "")
            examples.append(f"<p><b>{escape(label)}</b> ({escape(', '.join(row.get('reasons', [])))})</p>"
                            f"<pre>{escape(prompt[:300])}\n→ {escape(row['response'][:400])}</pre>")
    return ("<h2>Behaviour</h2><p>Refusal rate = refused / (refused + complied), Wilson 95% interval; "
            "degenerate and judge_error rows are counted but never enter a rate or a vector fit.</p>"
            + _table(["source", "split", *LABELS, "refusal rate"], rows, numeric_from=2)
            + "<details><summary>Example responses</summary>" + "".join(examples) + "</details>")


def _rotation(run: RunDir, result: dict) -> str:
    reference = result["random_reference"]
    rows = []
    for name, c in result["components"].items():
        boot, null, split = c["prompt_bootstrap"], c["null"], c["split_half"]
        lo, hi = boot.get("mean_ci95_basic", boot["mean_ci95"])
        median_same = sorted(split["same_layer_angle_deg"])[len(split["same_layer_angle_deg"]) // 2]
        rows.append([name, f"{_number(c['mean_deg'])}° [{_number(lo)}, {_number(hi)}]",
                     f"{_number(boot['mean_ci95'][0])}–{_number(boot['mean_ci95'][1])}",
                     f"{_number(c['depth_sigma_deg'])}°",
                     f"{_number(null['mean_deg'])}° [{_number(null['p2_5'])}, {_number(null['p97_5'])}]",
                     f"{null['p_value']:.3g}", f"{_number(median_same)}°",
                     f"{_number(split['mean_corrected_angle_deg'])}°",
                     f"{_number(c['dispersion_bootstrap']['mean_ci95'][0], 2)}–{_number(c['dispersion_bootstrap']['mean_ci95'][1], 2)}"])
    verdicts = "".join(f'<p class="verdict">{escape(c["verdict"])}</p>' for c in result["components"].values())
    return (f"<h2>Axis rotation</h2><p>Angle between adjacent layers' refusal axes (MD, train split, "
            f"{result['n_refused']} refused / {result['n_complied']} complied). Two unrelated directions in "
            f"d = {result['d_model']} sit at {reference['mean_deg']:.0f}° ± {reference['sd_deg']:.2f}°.</p>"
            + _table(["component", "mean angle [bias-corrected 95% CI]", "percentile CI", "depth σ",
                      "shuffled null [2.5, 97.5]", "p", "split-half same-layer (median)",
                      "reliability-corrected", "dispersion bootstrap (ignores prompt sampling)"], rows)
            + verdicts + _image(run, "rotation", rotation_figure(result))
            + "<p>Split-half reliability per layer (90° = pure noise):</p>"
            + _image(run, "reliability", reliability_figure(result)))


def _generic(run: RunDir, result: dict) -> str:
    name = result.get("analysis", "analysis")
    figure = run.root / "analysis" / f"{name}.png"
    image = (f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}">'
             if figure.is_file() else "")
    return (f"<h2>{escape(name.replace('_', ' ').capitalize())}</h2>"
            f'<p>Full results: <a href="analysis/{escape(name)}.json">analysis/{escape(name)}.json</a>; '
            f"conventions: {escape(json.dumps(result.get('conventions', {})))}</p>{image}")


SECTIONS: dict[str, Callable[[RunDir, dict], str]] = {"rotation": _rotation}


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from whatever the run directory holds."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    parts = [_header(run, manifest), _behaviour(run)]
    analyses = {}
    for path in sorted((run.root / "analysis").glob("*.json")):
        result = json.loads(path.read_text())
        analyses[result.get("analysis", path.stem)] = result
    for name in sorted(analyses, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        parts.append(SECTIONS.get(name, _generic)(run, analyses[name]))
    missing = [s for s in ("prompts", "generate", "capture", "vectors", "rotation")
               if not manifest.get("stages", {}).get(s, {}).get("done")]
    if missing:
        parts.append(f'<p class="missing">Stages not finished: {escape(", ".join(missing))}.</p>')
    parts.append("<hr><p class=meta>Conventions: layer l = decoder block l (Hugging Face hidden_states[l+1]); "
                 "angles from the signed cosine; every KL names its direction.</p>")
    html = f"<!doctype html><meta charset=utf-8><title>torsion report</title><style>{CSS}</style>{''.join(parts)}"
    atomic_write_text(run.report_path, html)
    return run.report_path
