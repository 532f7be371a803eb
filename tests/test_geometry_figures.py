"""The geometry figures are drawn by report/ from the analysis JSON, and nothing sets a global backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

PROBE = r"""
import inspect, json, sys
import matplotlib
calls = []
matplotlib.use = lambda *a, **k: calls.append(inspect.stack()[1].filename)
import torsion.analysis.categories, torsion.analysis.propagation, torsion.analysis.random_control
import torsion.analysis.rotation, torsion.replay
from torsion.report.geometry_figures import categories_figure, propagation_figure, random_control_figure
out = sys.argv[1]
propagation_figure({"sources": [1], "rows": [
    {"source": 1, "layer": l, **{f"{m}_{s}": 0.5 for m in ("cos_dh_axis", "cos_dh_source", "norm_ratio")
                                  for s in ("component", "resid")}} for l in (1, 2, 3)],
    "conventions": {"component": "resid", "alpha": -1.0, "positions": "all"}}, f"{out}/p.png")
random_control_figure({"layers": {"2": {arm: {"kl_base_to_steered": {"random": [0.1, 0.2], "steering": 0.05}}
                                        for arm in ("+alpha", "-alpha")}}, "n_random": 2, "seed": 0,
                       "conventions": {"vector": "md/resid", "positions": "last"}}, f"{out}/r.png")
summary = {"matrix_deg": [[0, 60], [60, 0]], "names": ["a", "b"], "mean_deg": 60.0, "sd_deg": None}
categories_figure({"vector_pairwise": summary, "comply_activation": {"mean_deg": None},
                   "conventions": {"layers": [1]}}, f"{out}/c.png")
mine = [c for c in calls if "geometry_figures" in c or "/analysis/" in c or c.endswith("replay.py")]
print(json.dumps({"set_backend_from": mine}))
"""


def test_geometry_figures_draw_without_touching_the_global_backend(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MPLBACKEND": ""}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == '{"set_backend_from": []}'
    for name in ("p", "r", "c"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
