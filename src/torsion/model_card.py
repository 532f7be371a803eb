"""Bake one point of a refusal/KL front into the weights and write its model card
(``torsion orthogonalize --from-study RUN_DIR/STUDY --pick RULE --out DIR``).

The point is picked by :func:`torsion.pareto.pick_index` on the front's held-out objectives
(``analysis/front_<study>.json``, :mod:`torsion.optimize_multi`); its ``weighted-ablation`` method
(strength 1) is rebuilt from the direction source the point searched (the run's vector, or the
study's harm directions file), checked against the hashes the study recorded,
and baked by :func:`torsion.orthogonalize.orthogonalize_method`. ``DIR/README.md`` records the
numbers (train and held-out), the per-block weights, the prompts' hashes and how it was made.

Example::

    export_front_point(Path("runs/quick/multi-weighted-ablation-comply"), "refusal<=0.05", Path("out/abl"))
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torsion import __version__
from torsion.errors import TorsionError
from torsion.models import LoadedModel, load_model
from torsion.optimize_multi import HARM_KEY, load_front, point_source
from torsion.orthogonalize import orthogonalize_method, save_model_dir
from torsion.pareto import pick_index
from torsion.steering.registry import get_method
from torsion.store import RunDir, atomic_write_text
from torsion.vectors import load_vectors


def front_method(run: RunDir, front: dict[str, Any], point: dict[str, Any], lm: LoadedModel):
    """The point's ``weighted-ablation`` method on its direction source; one line if the run or model changed."""
    theirs, ours = front.get("weights_sha256"), lm.weights_sha256
    if theirs and ours and theirs != ours:
        raise TorsionError(f"the study searched model weights {theirs[:12]} but {lm.model_id} has {ours[:12]}; "
                           "pass the run's own model (--model)")
    if point_source(point["params"]) == "harm":
        recorded = front["direction_sources"]["harm"]
        path, key, expected = run.root / recorded["file"], HARM_KEY, recorded["sha256"]
        if not path.is_file():
            raise TorsionError(f"{path} is missing; rerun `torsion optimize {run.root} --method weighted-ablation "
                               f"--multi --study {front['study']}` (it rewrites the file and reuses the trials)")
    else:
        path, key, expected = run.vectors_path, front["vector_key"], front["vector_sha256"]
    vector = load_vectors(path, d_model=lm.d_model)[key]
    if hashlib.sha256(vector.directions.numpy().tobytes()).hexdigest() != expected:
        raise TorsionError(f"{path} changed since the study ran (vector {key}); run the search again")
    return get_method("weighted-ablation", directions=vector.directions, **point["method_params"])


def export_front_point(study_path: Path, rule: str, out: Path, *, model: str | None = None,
                       dtype: str = "float32", device: str = "cpu") -> Path:
    """Pick, bake and save the point; return ``out``."""
    run_dir, front = load_front(study_path)
    points = front["points"]
    index = pick_index([(p["heldout"]["refusal_rate"], p["heldout"]["kl_base_to_steered"]) for p in points], rule)
    run = RunDir(run_dir)
    spec = model or run.manifest().get("model", {}).get("spec") or "embedded:qwen2.5-coder-0.5b"
    lm = load_model(spec, dtype=dtype, device=device)
    method = front_method(run, front, points[index], lm)
    weights = method.block_weights(lm, 1.0)
    edited = orthogonalize_method(lm, method, 1.0, inplace=True)
    save_model_dir(edited, out)
    atomic_write_text(Path(out) / "README.md", model_card(front, index, rule, spec, weights))
    return Path(out)


def _rate(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _kl(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(front: dict[str, Any], index: int, rule: str, model_spec: str, weights: list[float]) -> str:
    """The README.md of an exported point (markdown)."""
    point, base = front["points"][index], front.get("baseline", {})
    held, train, mp = point["heldout"], point["train"], point["method_params"]
    ci = held.get("refusal_ci") or [None, None]
    source = "per-block directions" if mp["direction_index"] is None else \
        f"one direction, block {mp['direction_index']:.3f} (adjacent blocks interpolated)"
    if point_source(point["params"]) == "harm":
        harm = front["direction_sources"]["harm"]
        what = (f"the harm direction (harmful minus harmless means of {harm['n_harmful']} train-split harmful and "
                f"{harm['n_harmless']} neutral prompts, projected off the harmless mean; `{harm['file']}`, sha256 "
                f"`{harm['sha256'][:16]}`)")
    else:
        what = f"the run's `{front['vector_key']}` vector (sha256 `{front['vector_sha256'][:16]}`)"
    lines = [
        f"# {model_spec} with refusals removed (torsion weighted ablation, front point {index})",
        "",
        f"Base model: `{model_spec}` (weights sha256 `{front.get('weights_sha256')}`). Edited by torsion "
        f"{__version__}: `torsion orthogonalize --from-study RUN_DIR/{front['study']} --pick '{rule}'`.",
        "",
        "## What was changed",
        "",
        f"Directional ablation of {what}, "
        f"baked into the weights: block l's {mp['components'].replace('+', ' and ')} output projections "
        "lose the share w_l of the direction, `W <- W - w_l v v^T W` (the embedding with w_0 when attn+mlp). "
        f"Direction: {source}. Kernel: peak {mp['peak_weight']:.3f} at block {mp['peak_position']:.2f}, "
        f"width {mp['width']:.2f} blocks, floor {mp['floor']:.3f} (0 beyond the width).",
        "",
        "Per-block weights w_l: " + ", ".join(f"{w:.3f}" for w in weights),
        "",
        "## Numbers",
        "",
        f"Study `{front['study']}`: {front['n_trials']} trials ({front['sampler']}), {len(front['points'])} points on the "
        f"Pareto front of train refusal rate against probe KL; this is point {index} (trial {point['trial']}), "
        f"picked by `{rule}` on the held-out objectives. Judge: {front.get('judge')}.",
        "",
        "| | refusal rate | Wilson 95% | genuine compliance | degenerate | KL base→edited | KL edited→base "
        "| MCQ accuracy | perplexity ratio | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| held-out, edited | {_rate(held['refusal_rate'])} | {_rate(ci[0])}–{_rate(ci[1])} | "
        f"{_rate(held['genuine_rate'])} | {_rate(held['degenerate_rate'])} | {held['kl_base_to_steered']:.4f} | "
        f"{held['kl_steered_to_base']:.4f} | {_rate(held['mcq_accuracy'])} | {held['perplexity_ratio']:.3f} | "
        f"{held['n']} |",
        f"| held-out, base model | {_rate(base.get('refusal_rate'))} | "
        f"{_rate((base.get('refusal_ci') or [None])[0])}–{_rate((base.get('refusal_ci') or [None, None])[1])} | "
        f"{_rate(base.get('genuine_rate'))} | {_rate(base.get('degenerate_rate'))} | 0 | 0 | "
        f"{_rate(base.get('mcq_accuracy'))} | 1 | {base.get('n')} |",
        f"| train (search) | {_rate(train['refusal_rate'])} | | | {_rate(train['degenerate_rate'])} | "
        f"{train['kl']:.4f} | {train['kl_steered_to_base']:.4f} | | | {train['n']} |",
        "",
        "Refusal rate: refused / judged after false-positive correction. KL: first-token KL on neutral prompts "
        "(train: the probe half; held-out: the other half). Perplexity ratio: edited / base on the held-out "
        f"neutral texts. Front hypervolume against reference {front['reference_point']}: train "
        f"{front['hypervolume_train']:.4f}, held-out {front['hypervolume_heldout']:.4f}.",
        "",
        "## Prompts (sha256 of each set's prompt ids, one per line)",
        "",
        *[f"- {name.removesuffix('_ids_sha256')}: `{value}` ({front['prompts']['n'].get(name.removesuffix('_ids_sha256'))} "
          "prompts)" for name, value in sorted(front["prompts"].items()) if name.endswith("_ids_sha256")],
        "",
        "The held-out prompts chose nothing: the direction was fit on train rows (harm: and the neutral probe "
        "half), the kernel on train prompts "
        "and the probe half; the held-out harmful prompts and neutral half were used once, to evaluate the front.",
        "",
    ]
    return "\n".join(lines)
