"""Causal propagation of an injected steering step (methods.md, "Causal propagation").

At each source block ``s`` a steering method is applied to that block alone (default ``flat``:
``Δ = α v_s`` added to a component output; any method with layers, :mod:`torsion.steering`); at every block
``l ≥ s`` the change at the last token, ``Δh_l = h_l(steered) − h_l(base)``, is compared with
that layer's own axis ``v_l`` and with ``v_s``, for the component output and the residual
stream. The fast path caches what every block received in the base pass and restarts the
forward at block ``s``; the reference path runs the whole steered forward
(:func:`~torsion.capture.capture_batch` under the method's ``apply``). ``norm_ratio`` divides by the
method's applied norm (replacement methods: the mean ``‖h' − h‖`` at the steered tokens).

Example::

    result = propagate(lm, prompts, axis, sources=[12, 15, 18, 21], alpha=-1.0)
    print(propagation_table(result))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from torsion.analysis.common import back_half_layers, run_vector, split_prompts
from torsion.capture import capture_batch, encode, recording
from torsion.conventions import LAYER_INDEXING, check_blocks
from torsion.errors import TorsionError
from torsion.geometry import cosine
from torsion.models import LoadedModel
from torsion.replay import (FAST_PATH_TOLERANCE, BlockInputs, fast_path_check, recording_block_inputs,
                            relative_gap, run_blocks)
from torsion.steering.base import MethodRecord, SteeringMethod, at_block, matched_norm
from torsion.steering.flat import Flat
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import load_vectors

__all__ = ["back_half_layers", "propagate", "propagation_table", "run_propagation"]

SCHEMA_VERSION = 1


@torch.inference_mode()
def _base_pass(lm: LoadedModel, prompts: Sequence[str], components: tuple[str, ...],
               first: int) -> tuple[dict[str, Tensor], BlockInputs]:
    """Base states ``{component: [batch, n_layers, d_model]}`` at the last token, and block inputs."""
    with recording(lm, components, ("last",), 1) as store, recording_block_inputs(lm, first) as inputs:
        lm.layout.decoder(**encode(lm, prompts), use_cache=False)
    return {c: torch.stack(store[c]["last"], dim=1) for c in components}, inputs


@torch.inference_mode()
def _replayed_states(lm: LoadedModel, inputs: BlockInputs, components: tuple[str, ...],
                     source: int) -> dict[str, Tensor]:
    """States at the last token of blocks ``source … L-1`` from a replay, ``{c: [batch, L - source, d_model]}``."""
    with recording(lm, components, ("last",), 1) as store:
        run_blocks(lm, inputs, source, inputs.hidden(source))
    return {c: torch.stack(store[c]["last"][source:], dim=1) for c in components}


def _full_states(lm: LoadedModel, prompts: Sequence[str], components: tuple[str, ...],
                 source: int) -> dict[str, Tensor]:
    """States at the last token of blocks ``source … L-1`` from one full forward (steered if steering is on)."""
    full = capture_batch(lm, prompts, components=components, positions=("last",))
    return {c: full[c]["last"][:, source:] for c in components}


def _propagation_metrics(deltas: Tensor, axis: Tensor, source_vector: Tensor, applied_norm: float) -> dict[str, Tensor]:
    """The three methods.md metrics per downstream block, each ``[n_down]``.

    Args:
        deltas: ``Δh_l`` at the last token, ``[n_prompts, n_down, d_model]`` for ``l = s … L-1``.
        axis: ``v_l``, ``[n_down, d_model]``.
        source_vector: ``v_s``, ``[d_model]``.
        applied_norm: ``‖α v_s‖``.
    """
    deltas = deltas.double()
    return {"cos_dh_axis": cosine(deltas, axis.double().expand_as(deltas)).mean(0),
            "cos_dh_source": cosine(deltas, source_vector.double().expand_as(deltas)).mean(0),
            "norm_ratio": torch.linalg.vector_norm(deltas, dim=-1).mean(0) / applied_norm}


def propagate(lm: LoadedModel, prompts: Sequence[str], axis: Tensor, *, sources: Sequence[int],
              alpha: float = -1.0, component: str = "resid", positions: str = "all",
              resid_axis: Tensor | None = None, axis_name: str = "axis", resid_axis_name: str = "resid_axis",
              batch_size: int = 8, fast: bool = True, method: SteeringMethod | None = None) -> dict[str, Any]:
    """Inject ``method`` at strength ``alpha`` at each source block and measure ``Δh_l`` at the last token for ``l ≥ s``.

    Args:
        axis: ``[n_layers, d_model]``, the per-layer axis of ``component``; the default method
            (``flat``) injects ``α · axis[s]``, and ``cos_dh_source`` compares with ``axis[s]``.
        resid_axis: ``[n_layers, d_model]``, the axis the residual-stream ``Δh_l`` is compared with
            (default: ``axis``).
        positions: ``all`` or ``last``, the positions the default method's injection covers.
        method: any steering method with layers (:func:`torsion.steering.base.at_block` puts it on
            block ``s`` alone); ``alpha`` is its one strength (``t`` for the splines).
        fast: restart the forward at block ``s`` from cached inputs. On the first batch an
            unsteered replay is checked against the base pass and the first source's steered replay
            against the full steered forward; either off by more than ``FAST_PATH_TOLERANCE``
            (relative) switches to the full forward for every source and batch.

    Returns:
        The JSON-ready result: conventions, ``applied_norm`` per source (the record's applied norm,
        or its mean ``‖h' − h‖`` for replacement methods: the ``norm_ratio`` denominator), one row
        per ``(source, layer)``.
    """
    if not prompts:
        raise TorsionError("no prompts to propagate over; pass at least one prompt")
    if resid_axis is None:
        resid_axis, resid_axis_name = axis, axis_name
    for name, vectors in (("axis", axis), ("resid_axis", resid_axis)):
        if vectors.shape != (lm.n_layers, lm.d_model):
            raise TorsionError(f"{name} has shape {list(vectors.shape)}; pass [{lm.n_layers}, {lm.d_model}], "
                               "one direction per block of this model")
    sources = sorted(set(check_blocks(sources, lm.n_layers, what="source layer")))
    if positions not in ("all", "last"):
        raise TorsionError(f"unknown positions {positions!r}; choose all or last")
    method = method or Flat(axis, layers=(sources[0],), component=component, positions=positions)
    at_source = {s: at_block(method, s) for s in sources}
    streams = {"component": component, "resid": "resid"}
    components = tuple(dict.fromkeys(streams.values()))
    records: dict[int, list[MethodRecord]] = {s: [] for s in sources}
    deltas: dict[int, dict[str, list[Tensor]]] = {s: {c: [] for c in components} for s in sources}
    gaps: dict[str, float] = {}  # the first batch's checks of the fast path
    fast_requested = fast
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        base, inputs = _base_pass(lm, batch, components, sources[0])
        check = fast and not gaps
        if check:  # an unsteered replay from the earliest source against the base pass
            replay = _replayed_states(lm, inputs, components, sources[0])
            gaps["unsteered"] = max(relative_gap(replay[c], base[c][:, sources[0]:]) for c in components)
            fast = gaps["unsteered"] <= FAST_PATH_TOLERANCE
        for s in sources:
            steered_check = check and fast and s == sources[0]
            with at_source[s].apply(lm, alpha) as record:
                replayed = _replayed_states(lm, inputs, components, s) if fast else None
                full = None if fast and not steered_check else _full_states(lm, batch, components, s)
            records[s].append(record)
            if steered_check:  # one steered replay against the full steered forward (methods.md)
                gaps["steered"] = max(relative_gap(replayed[c], full[c]) for c in components)
                fast = gaps["steered"] <= FAST_PATH_TOLERANCE
            steered = full if full is not None else replayed
            for c in components:
                deltas[s][c].append(steered[c].double() - base[c][:, s:].double())
    applied = {s: matched_norm(records[s]) for s in sources}
    rows = []
    for s in sources:
        stream_axes = {"component": axis, "resid": resid_axis}
        metrics = {stream: _propagation_metrics(torch.cat(deltas[s][c]), stream_axes[stream][s:], axis[s], applied[s])
                   for stream, c in streams.items()}
        for offset, layer in enumerate(range(s, lm.n_layers)):
            rows.append({"source": s, "layer": layer, **{f"{name}_{stream}": float(values[offset])
                                                         for stream, by_name in metrics.items()
                                                         for name, values in by_name.items()}})
    denominator = "mean ‖h' − h‖ at the steered tokens" if method.replacement else "‖α v_s‖ (the applied norm)"
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "propagation",
        "conventions": {"layer_indexing": LAYER_INDEXING, "component": component, "positions": positions,
                        "measured_at": "last token", "axis": axis_name, "resid_axis": resid_axis_name,
                        "alpha": alpha, "method": method.name, "strength_name": method.strength_name,
                        "cosine": "signed", "cos_dh_axis": "mean over prompts of cos(Δh_l, v_l)",
                        "norm_ratio": f"mean over prompts of ‖Δh_l‖ / {denominator}"},
        "method": {"name": method.name, "strength": alpha,
                   "params": {k: v for k, v in method.params().items() if k != "layers"}},
        "sources": sources, "applied_norm": {str(s): applied[s] for s in sources}, "rows": rows,
        "n_prompts": len(prompts), "fast_path": fast,
        "fast_path_check": fast_path_check(fast_requested, fast, gaps, fallback="the full steered forward"),
    }


def propagation_table(result: dict[str, Any], *, stream: str = "component", metric: str = "cos_dh_axis",
                      norm_source: int | None = None) -> str:
    """The write-up's table as Markdown: rows ``src``, ``src + 1``, then each later block; a column per source.

    ``metric`` is ``cos_dh_axis``, ``cos_dh_source`` or ``norm_ratio``; the last column is
    ``norm_ratio`` of ``norm_source`` (default: the first source). A block at or before a
    source reads ``n/a`` in that source's column.
    """
    sources = result["sources"]
    norm_source = sources[0] if norm_source is None else norm_source
    values = {(r["source"], r["layer"]): r for r in result["rows"]}
    final = max(layer for _, layer in values)

    def cell(source: int, layer: int, name: str) -> str:
        row = values.get((source, layer))
        return "n/a" if row is None else format(row[f"{name}_{stream}"], ".3f" if name == "norm_ratio" else "+.3f")

    header = ["Downstream layer", *(f"src={s}" for s in sources), f"norm_ratio (src={norm_source})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for offset, label in ((0, "src (injection)"), (1, "src + 1")):
        cells = [cell(s, s + offset, metric) for s in sources] + [cell(norm_source, norm_source + offset, "norm_ratio")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for layer in range(sources[0] + 2, final + 1):
        label = f"{layer} (final)" if layer == final else str(layer)
        cells = [cell(s, layer, metric) if layer > s else "n/a" for s in sources]
        cells.append(cell(norm_source, layer, "norm_ratio") if layer > norm_source else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_propagation(run_dir: str | Path, lm: LoadedModel, *, sources: Sequence[int] | None = None,
                    alpha: float = -1.0, component: str = "resid", positions: str = "all", method: str = "md",
                    split: str = "train", n_prompts: int | None = 16, seed: int | None = None,
                    batch_size: int = 8, fast: bool = True, steering: str = "flat",
                    steering_params: dict[str, Any] | None = None,
                    manifold: str | Path | None = None) -> dict[str, Any]:
    """Propagation on a run directory: writes ``analysis/propagation.json`` (the report draws its figure).

    The axis is the run's ``<method>/<component>`` vector, the residual stream is compared with
    ``<method>/resid``; prompts are a seeded sample of ``split`` (``seed`` defaults to the run's).
    ``sources`` defaults to :func:`back_half_layers`. ``steering`` names the injected steering
    method (default ``flat`` on the axis), built from the run by
    :func:`torsion.steering.from_run.run_method` with ``steering_params`` and ``manifold``.
    """
    from torsion.steering.from_run import run_method

    run = RunDir(run_dir)
    vectors = load_vectors(run.vectors_path, d_model=lm.d_model)
    seed = int(run.manifest().get("seed", 0)) if seed is None else seed
    sources = back_half_layers(lm.n_layers) if sources is None else sources
    sources = sorted(set(check_blocks(sources, lm.n_layers, what="source layer")))
    axis_name, resid_name = f"{method}/{component}", f"{method}/resid"
    axis = run_vector(vectors, axis_name)
    injected, record = run_method(run, lm, steering, vectors=axis, layers=sources, component=component,
                                  positions=positions, params=steering_params, manifold=manifold)
    result = propagate(lm, split_prompts(run, split, n_prompts, seed), axis,
                       sources=sources, alpha=alpha, component=component, positions=positions,
                       resid_axis=run_vector(vectors, resid_name), axis_name=axis_name,
                       resid_axis_name=resid_name, batch_size=batch_size, fast=fast, method=injected)
    result["conventions"].update(prompts=f"{split} split, seeded sample stratified by category", split=split)
    result["method"].update(tensors_sha256=record["tensors_sha256"], given_params={
        key: "tensor" if isinstance(value, Tensor) else value for key, value in record["given_params"].items()})
    result["seed"] = seed
    path = run.analysis_path("propagation")
    atomic_write_json(path, result)
    return result
