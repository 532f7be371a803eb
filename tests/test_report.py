import base64
import json
import math
import re
import tempfile
import textwrap

import pytest

from torsion.report import SECTIONS, build_report
from torsion.report.figures import rotation_angle_figure, split_half_figure
from torsion.report.html import angle, interval, number, p_value
from torsion.stats import wilson_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = '<script>alert("x")</script>'


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _manifest():
    return {
        "torsion_version": "0.1.0",
        "config": {"profile": "smoke", "model": "tiny/llama-4", "sources": ["alpha", "beta"], "seed": 7},
        "model": {"spec": "tiny/llama-4", "model_id": "tiny/llama-4", "weights_sha256": "ab" * 32,
                  "n_layers": 4, "d_model": 16},
        "dataset_sha256": "cd" * 32, "seed": 7, "versions": {"torch": "2.13.0"},
        "stages": {"prompts": {"done": True, "seconds": 0.01}, "generate": {"done": True, "seconds": 12.34},
                   "capture": {"done": True, "seconds": 1.0}, "vectors": {"done": True, "seconds": 2.0},
                   "rotation": {"done": True, "seconds": 3.0}},
        "generation": {"max_new_tokens": 8, "temperature": 0.0},
    }


# source alpha: 5 strong_refuse, 5 strong_comply, 1 degenerate, 1 judge_error (train)
# source beta: 1 weak_refuse, 2 weak_comply (holdout)
LABELLED = ([("alpha", "train", "strong_refuse", 1.0)] * 5 + [("alpha", "train", "strong_comply", -1.0)] * 5
            + [("alpha", "train", "degenerate", 2.0), ("alpha", "train", "judge_error", None)]
            + [("beta", "holdout", "weak_refuse", 0.5)] + [("beta", "holdout", "weak_comply", -0.5)] * 2)


def _prompts_and_responses():
    prompts, responses = [], []
    for i, (source, split, label, score) in enumerate(LABELLED):
        prompts.append({"id": f"p{i}", "prompt": f"prompt {i} <b>bold</b>", "category": "c", "source": source,
                        "split": split, "prompt_hash": f"{i:064x}"})
        text = SCRIPT if label == "strong_comply" else f"response {i}"
        responses.append({"id": f"p{i}", "response": text, "label": label, "score": score, "judge": "rules-v1",
                          "reasons": ["refusal_start"] if score == 1.0 else []})
    return prompts, responses


def _component(mean, pairs, ci, null, p, same, corrected_mean, sigma, differs, reliable):
    return {
        "pair_angles_deg": pairs, "mean_deg": mean, "depth_sigma_deg": sigma,
        "prompt_bootstrap": {"B": 50, "mean_ci95": ci, "pair_ci95": [[a - 1.0, a + 1.0] for a in pairs]},
        "dispersion_bootstrap": {"B": 50, "mean_ci95": [86.2, 88.4], "note": "resamples per-pair angles"},
        "null": {"P": 20, "statistic": "mean adjacent angle (deg)", "mean_deg": null[0], "p2_5": null[1],
                 "p97_5": null[2], "p_value": p},
        "split_half": {"n_splits": 5, "same_layer_angle_deg": same, "same_layer_cos": [0.9, 0.8, 0.7, 0.6],
                       "corrected_cos": [0.1, None, 0.0], "corrected_angle_deg": [84.3, None, 90.0],
                       "mean_corrected_angle_deg": corrected_mean, "reliable_pairs": 2},
        "differs_from_null": differs, "reliable": reliable, "verdict": f"verdict for mean {mean} <i>",
    }


def _rotation():
    return {
        "schema_version": 1, "analysis": "rotation",
        "conventions": {"layer_indexing": "block", "axis": "md", "angle": "degrees of signed cosine",
                        "pairs": "(l, l+1)"},
        "seed": 7, "n_refused": 6, "n_complied": 7, "d_model": 16, "n_layers": 4,
        "random_reference": {"mean_deg": 90.0, "sd_deg": 57.2958 / 4},
        "components": {
            "resid": _component(87.3, [86.0, 87.3, 88.6], [86.9, 87.8], [84.1, 80.2, 88.0], 0.004975,
                                [20.0, 30.0, 40.0, 50.0], 85.04, 1.3, True, True),
            "attn": _component(91.25, [90.0, 91.0, 92.75], [89.0, 93.5], [91.0, 88.0, 94.0], math.nan,
                               [80.0, 85.0, 95.0, 100.0], None, None, False, False),
        },
    }


def _full_run(tmp_path):
    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps(_manifest()))
    prompts, responses = _prompts_and_responses()
    _jsonl(run / "prompts.jsonl", prompts)
    _jsonl(run / "responses.jsonl", responses)
    (run / "analysis" / "rotation.json").write_text(json.dumps(_rotation()))  # NaN is written as NaN
    (run / "analysis" / "learning_curve.json").write_text(json.dumps({"analysis": "learning_curve", "schema_version": 1}))
    (run / "analysis" / "future_v2.json").write_text(json.dumps({"analysis": "future_analysis"}))
    (run / "analysis" / "broken.json").write_text("{not json")
    return run


def _visible_text(html):
    return re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]+"', "", html))


def test_formatting_helpers():
    assert angle(87.25) == "87.2°" and angle(87.26) == "87.3°"
    assert p_value(0.004975) == "0.00498" and p_value(1.0) == "1"
    assert interval([86.94, 87.76]) == "[86.9, 87.8]"
    for missing in (None, math.nan, math.inf, "x", True):
        assert number(missing, why="because") == '<span class="na" title="because">n/a</span>'
    assert "n/a" in interval(None) and "n/a" in interval([1.0, math.nan])


def test_full_report_numbers_escaping_and_figures(tmp_path):
    run = _full_run(tmp_path)
    path = build_report(run)
    assert path == run / "report.html"
    html = path.read_text()
    text = _visible_text(html)

    # header
    assert "tiny/llama-4" in html and "abababababab…" in html and "smoke" in html
    assert "<tr><td>prompts</td><td>15</td></tr>" in html
    assert "12.3" in html and "0.1.0" in html
    # behaviour: alpha refused 5 of 11 judged (methods.md: refused / judged, the degenerate response in the
    # denominator, the judge error not); Wilson by hand: p = 5/11, z² = 3.8416, centre = (p + z²/22)/(1 + z²/11)
    # = 0.46632, half = 1.96·sqrt(p(1-p)/11 + z²/484)/1.34924 = 0.25360 -> [21.3, 72.0]
    assert wilson_interval(5, 11) == pytest.approx((0.21272, 0.71992), abs=1e-4)
    alpha = re.search(r"<tr><td>alpha</td>(.*?)</tr>", html).group(1)
    # n, the six judge classes, fp_refuse, fp_echo, rate, interval
    assert re.findall(r'<td class="n">([^<]*)</td>', alpha) == ["12", "5", "0", "0", "5", "1", "1", "0", "0", "45.5",
                                                                "[21.3, 72.0]"]
    beta = re.search(r"<tr><td>beta</td>(.*?)</tr>", html).group(1)
    assert "33.3" in beta  # 1 refused / 3 judged
    # escaping: responses, prompts and verdicts
    assert SCRIPT not in html and "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "verdict for mean 87.3 &lt;i&gt;" in html

    # rotation table
    resid = re.search(r"<tr><td>resid</td>(.*?)</tr>", html).group(1)
    cells = re.findall(r'<td class="n">(.*?)</td>', resid)
    assert cells == ["87.3° [86.9, 87.8]", "1.3°", "84.1° [80.2, 88.0]", "0.00498", "35.0°", "85.0°",
                     "90.0° ± 14.3°"]
    attn = re.search(r"<tr><td>attn</td>(.*?)</tr>", html).group(1)
    assert "91.2° [89.0, 93.5]" in attn  # 91.25 is exact in binary; format rounds half to even
    assert attn.count('class="na"') == 3  # depth σ, p, corrected angle
    assert 'title="no layer pair has both split-half reliabilities &gt; 0"' in attn
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "attn: indistinguishable from the shuffled-label null" in html
    assert "dispersion bootstrap (ignores prompt sampling)" in html and "[86.2, 88.4]" in html

    # figures: inline and on disk, the same bytes
    for name in ("rotation_angles", "rotation_split_half"):
        png = (run / "analysis" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC)
        assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained

    # other analyses, in order, with links; unreadable files are named, not fatal
    other = html[html.index("<h2>Other analyses</h2>"):]
    assert '<a href="analysis/learning_curve.json">' in other and '<a href="analysis/future_v2.json">' in other
    assert "future_analysis:" in other and "broken.json is not valid JSON" in other
    assert html.index("<h2>Behaviour</h2>") < html.index("<h2>Axis rotation</h2>") < html.index("Other analyses")
    assert "layer l = decoder block l; angles from the signed cosine" in html
    assert "Not in this run yet" in html and "activations.safetensors (the capture stage has not run)" in html
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


def test_sections_render_in_write_up_order(tmp_path, monkeypatch):
    run = _full_run(tmp_path)
    (run / "analysis" / "categories.json").write_text(json.dumps({"analysis": "categories"}))
    (run / "analysis" / "propagation.json").write_text(json.dumps({"analysis": "propagation"}))
    monkeypatch.setitem(SECTIONS, "categories", lambda result, run_dir: "<h2>Categories</h2>")
    monkeypatch.setitem(SECTIONS, "propagation", lambda result, run_dir: f"<h2>Propagation {run_dir.name}</h2>")
    html = build_report(run).read_text()
    assert html.index("<h2>Axis rotation") < html.index("<h2>Propagation run</h2>") < html.index("<h2>Categories")
    assert "analysis/propagation.json" not in html[html.index("<h2>Other analyses"):]
    assert "analysis/learning_curve.json" in html[html.index("<h2>Other analyses"):]


def test_rotation_file_missing_a_key_is_reported_not_fatal(tmp_path):
    run = _full_run(tmp_path)
    rotation = _rotation()
    del rotation["components"]["resid"]["null"]
    (run / "analysis" / "rotation.json").write_text(json.dumps(rotation))
    html = build_report(run).read_text()
    assert "analysis/rotation.json lacks the key &#x27;null&#x27;" in html and "schema_version 1" in html


def test_manifest_and_prompts_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": {"profile": "smoke"},
                                                   "stages": {"prompts": {"done": True, "seconds": 0.5}}}))
    prompts, _ = _prompts_and_responses()
    _jsonl(run / "prompts.jsonl", prompts)
    html = build_report(run).read_text()
    assert "responses.jsonl (the generate stage has not run)" in html
    assert "analysis/rotation.json (the rotation stage has not run)" in html
    assert "No judged responses" in html and "analysis/rotation.json is missing" in html
    assert 'title="not recorded in manifest.json">n/a' in html  # model, weights, seed, torsion version
    assert "<tr><td>prompts</td><td>15</td></tr>" in html and "<img" not in html


def test_empty_run_directory_renders(tmp_path):
    html = build_report(tmp_path / "empty").read_text()
    assert "prompts.jsonl (the prompts stage has not run)" in html and "no stage has run" in html


def test_figures_return_their_paths(tmp_path):
    rotation = _rotation()
    for draw, name in ((rotation_angle_figure, "a.png"), (split_half_figure, "b.png")):
        path = draw(rotation, tmp_path / "analysis" / name)
        assert path == tmp_path / "analysis" / name and path.read_bytes().startswith(PNG_MAGIC)


def test_importing_torsion_sets_no_global_state():
    """A notebook's matplotlib backend and Optuna's log level survive importing torsion and drawing a figure."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import matplotlib, optuna, sys
        matplotlib.use("svg")
        optuna.logging.set_verbosity(optuna.logging.DEBUG)
        import torsion.optimize, torsion.search, torsion.analysis.asymmetry
        assert "torsion.report.figures" not in sys.modules  # analyses write data; only the report draws
        import torsion.report, torsion.report.figures
        from pathlib import Path
        torsion.report.figures.strength_figure({"trials": [], "study": "s", "alpha": 0.0}, Path(sys.argv[1]))
        assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
        assert Path(sys.argv[1]).read_bytes().startswith(bytes([0x89]) + b"PNG")
    """)
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", code, f"{folder}/figure.png"], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_importing_every_torsion_module_sets_no_global_state():
    """Every module under torsion, imported in a fresh interpreter, leaves matplotlib's backend, torch's and
    numpy's global RNG state and Optuna's verbosity as they were, and never imports pyplot."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import matplotlib, numpy, optuna, torch
        matplotlib.use("svg")
        optuna.logging.set_verbosity(optuna.logging.DEBUG)
        torch.manual_seed(1234)
        numpy.random.seed(99)
        rng, np_rng = torch.random.get_rng_state().clone(), numpy.random.get_state()[1].copy()
        import torsion
        imported, missing = [], []
        for info in pkgutil.walk_packages(torsion.__path__, "torsion."):
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except ModuleNotFoundError as error:  # an optional dependency of this environment
                if (error.name or "").startswith("torsion"):
                    raise
                missing.append(f"{info.name} ({error.name})")
        assert len(imported) > 60, imported
        assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules, "some torsion module imports pyplot"
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG, optuna.logging.get_verbosity()
        assert torch.equal(torch.random.get_rng_state(), rng), "torch's global RNG state changed"
        assert (numpy.random.get_state()[1] == np_rng).all(), "numpy's global RNG state changed"
        print(len(imported), "modules;", "missing optional:", missing)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
