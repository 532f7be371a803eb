"""Causal propagation of an injected steering step (methods.md, "Causal propagation").

At each source block ``s``, ``Δ = α v_s`` is added to a component output; at every block
``l ≥ s`` the change at the last token, ``Δh_l = h_l(steered) − h_l(base)``, is compared with
that layer's own axis ``v_l`` and with ``v_s``, for the component output and the residual
stream. The fast path caches what every block received in the base pass and restarts the
forward at block ``s``; the reference path runs the whole steered forward
(:func:`~torsion.capture.capture_batch` under :func:`~torsion.steer.add_steering`).

Example::

    result = propagate(lm, prompts, axis, sources=[12, 15, 18, 21], alpha=-1.0)
    print(propagation_table(result))
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from torsion.capture import capture_batch, encode, output_tensor, recording
from torsion.conventions import LAYER_INDEXING
from torsion.data import read_prompts_jsonl, sample
from torsion.errors import TorsionError
from torsion.geometry import cosine
from torsion.models import LoadedModel
from torsion.steer import add_steering
from torsion.store import RunDir, atomic_write_bytes, atomic_write_json
from torsion.vectors import SteeringVector, load_vectors

SCHEMA_VERSION = 1
FAST_PATH_TOLERANCE = 1e-4  # relative, methods.md


def back_half_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` blocks evenly spaced over the back half, ``n_layers // 2 … n_layers - 1``."""
    start = n_layers // 2
    count = min(k, n_layers - start)
    return sorted({round(start + i * (n_layers - 1 - start) / max(count - 1, 1)) for i in range(count)})


@dataclass
class BlockInputs:
    """What decoder blocks received in one base forward: positional and keyword arguments per block.

    ``args[l][0]`` is the hidden state entering block ``l``, ``[batch, seq, d_model]``; the
    rest (attention mask, position ids and embeddings) is replayed as given. ``last_output`` is
    the last block's output.
    """

    args: dict[int, tuple] = field(default_factory=dict)
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_output: Tensor | None = None

    def hidden(self, layer: int) -> Tensor:
        """The hidden state entering block ``layer``, ``[batch, seq, d_model]``."""
        return self.args[layer][0]

    def output(self, layer: int) -> Tensor:
        """The base output of block ``layer``, ``[batch, seq, d_model]``."""
        return self.hidden(layer + 1) if layer + 1 in self.args else self.last_output


@contextmanager
def recording_block_inputs(lm: LoadedModel, first: int) -> Iterator[BlockInputs]:
    """Record the inputs of blocks ``first … L-1`` during the forwards run inside the ``with``."""
    inputs = BlockInputs()

    def make_hook(layer: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not args:
                raise TorsionError(f"block {layer} got its hidden state as a keyword; the fast path cannot "
                                   "replay it, pass fast=False")
            if kwargs.get("past_key_values") is not None:
                raise TorsionError("the base forward ran with a KV cache, which a replay would extend; "
                                   "run it with use_cache=False")
            inputs.args[layer], inputs.kwargs[layer] = args, kwargs
        return hook

    def record_last_output(_module: torch.nn.Module, _args: tuple, output: Any) -> None:
        inputs.last_output = output_tensor(output)

    handles = [lm.layout.blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True)
               for layer in range(first, lm.n_layers)]
    handles.append(lm.layout.blocks[-1].register_forward_hook(record_last_output))
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _repeat_batch(value: Any, batch: int, repeat: int) -> Any:
    """Tile batch-leading tensors (``ndim ≥ 2``, ``shape[0] == batch``) ``repeat`` times, direction-major."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == batch and repeat > 1:
        return value.repeat(repeat, *([1] * (value.ndim - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat_batch(v, batch, repeat) for v in value)
    return value


def run_blocks(lm: LoadedModel, inputs: BlockInputs, start: int, hidden: Tensor, *, repeat: int = 1) -> Tensor:
    """Run blocks ``start … L-1`` from ``hidden`` with the recorded arguments; the last block's output.

    Args:
        hidden: ``[repeat * batch, seq, d_model]``; row ``i * batch + b`` is copy ``i`` of prompt ``b``.
        repeat: how many copies of the recorded batch ``hidden`` holds.

    Returns:
        ``[repeat * batch, seq, d_model]``, before the final norm (``hidden`` itself when ``start = L``).
    """
    batch = hidden.shape[0] // repeat
    for layer in range(start, lm.n_layers):
        args = _repeat_batch(inputs.args[layer][1:], batch, repeat)
        kwargs = {k: _repeat_batch(v, batch, repeat) for k, v in inputs.kwargs[layer].items()}
        hidden = output_tensor(lm.layout.blocks[layer](hidden, *args, **kwargs))
    return hidden


def relative_gap(a: Tensor, b: Tensor) -> float:
    """``max |a − b| / max |b|``: the relative tolerance the fast paths are held to."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


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
              batch_size: int = 8, fast: bool = True) -> dict[str, Any]:
    """Inject ``α · axis[s]`` at each source block and measure ``Δh_l`` at the last token for ``l ≥ s``.

    Args:
        axis: ``[n_layers, d_model]``, the per-layer axis of ``component``; row ``s`` is injected.
        resid_axis: ``[n_layers, d_model]``, the axis the residual-stream ``Δh_l`` is compared with
            (default: ``axis``).
        positions: ``all`` or ``last``, the positions the injection covers.
        fast: restart the forward at block ``s`` from cached inputs (checked once against the base pass).

    Returns:
        The JSON-ready result: conventions, ``applied_norm`` per source, one row per ``(source, layer)``.
    """
    if not prompts:
        raise TorsionError("no prompts to propagate over; pass at least one prompt")
    if resid_axis is None:
        resid_axis, resid_axis_name = axis, axis_name
    for name, vectors in (("axis", axis), ("resid_axis", resid_axis)):
        if vectors.shape != (lm.n_layers, lm.d_model):
            raise TorsionError(f"{name} has shape {list(vectors.shape)}; pass [{lm.n_layers}, {lm.d_model}], "
                               "one direction per block of this model")
    sources = sorted({int(s) for s in sources})
    if not sources or not 0 <= sources[0] <= sources[-1] < lm.n_layers:
        raise TorsionError(f"sources {sources} must be non-empty blocks in 0..{lm.n_layers - 1}")
    streams = {"component": component, "resid": "resid"}
    components = tuple(dict.fromkeys(streams.values()))
    applied = {s: float(torch.linalg.vector_norm(axis[s].double() * alpha)) for s in sources}
    deltas: dict[int, dict[str, list[Tensor]]] = {s: {c: [] for c in components} for s in sources}
    fast_gap: float | None = None
    fast_requested = fast
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        base, inputs = _base_pass(lm, batch, components, sources[0])
        if fast and fast_gap is None:  # one unsteered replay from the earliest source checks the fast path
            replay = _replayed_states(lm, inputs, components, sources[0])
            fast_gap = max(relative_gap(replay[c], base[c][:, sources[0]:]) for c in components)
            fast = fast_gap <= FAST_PATH_TOLERANCE
        for s in sources:
            with add_steering(lm, axis, layers=[s], alpha=alpha, component=component, positions=positions):
                if fast:
                    steered = _replayed_states(lm, inputs, components, s)
                else:
                    full = capture_batch(lm, batch, components=components, positions=("last",))
                    steered = {c: full[c]["last"][:, s:] for c in components}
            for c in components:
                deltas[s][c].append(steered[c].double() - base[c][:, s:].double())
    rows = []
    for s in sources:
        stream_axes = {"component": axis, "resid": resid_axis}
        metrics = {stream: _propagation_metrics(torch.cat(deltas[s][c]), stream_axes[stream][s:], axis[s], applied[s])
                   for stream, c in streams.items()}
        for offset, layer in enumerate(range(s, lm.n_layers)):
            rows.append({"source": s, "layer": layer, **{f"{name}_{stream}": float(values[offset])
                                                         for stream, by_name in metrics.items()
                                                         for name, values in by_name.items()}})
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "propagation",
        "conventions": {"layer_indexing": LAYER_INDEXING, "component": component, "positions": positions,
                        "measured_at": "last token", "axis": axis_name, "resid_axis": resid_axis_name,
                        "alpha": alpha, "cosine": "signed",
                        "cos_dh_axis": "mean over prompts of cos(Δh_l, v_l)",
                        "norm_ratio": "mean over prompts of ‖Δh_l‖ / ‖α v_s‖"},
        "sources": sources, "applied_norm": {str(s): applied[s] for s in sources}, "rows": rows,
        "n_prompts": len(prompts), "fast_path": fast,
        "fast_path_check": fast_path_check(fast_requested, fast, fast_gap, FAST_PATH_TOLERANCE,
                                           fallback="the full steered forward"),
    }


def fast_path_check(requested: bool, used: bool, gap: float | None, tolerance: float, *,
                    fallback: str) -> dict[str, Any]:
    """The record of whether a fast path (a replay from cached block inputs) was used, and why not."""
    if not requested:
        note = f"{fallback} (fast path not requested)"
    elif used:
        note = "replayed the blocks from cached block inputs; an unsteered replay matched the base pass"
    else:
        note = (f"fell back to {fallback}: an unsteered replay differed from the base pass by {gap:.2e} "
                "(relative), so this model's blocks cannot be replayed safely")
    return {"requested": requested, "used": used, "max_relative_gap": gap, "tolerance": tolerance, "note": note}


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


def plot_propagation(result: dict[str, Any], path: Path) -> Path:
    """Figure: ``cos(Δh_l, v_l)``, ``cos(Δh_l, v_s)`` and ``norm_ratio`` against block, one line per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (("cos_dh_axis", "cos(Δh_l, v_l)"), ("cos_dh_source", "cos(Δh_l, v_s)"), ("norm_ratio", "norm_ratio"))
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, title) in zip(axes, panels):
        for index, source in enumerate(result["sources"]):
            rows = [r for r in result["rows"] if r["source"] == source]
            layers = [r["layer"] for r in rows]
            ax.plot(layers, [r[f"{metric}_component"] for r in rows], ".-", color=f"C{index}", label=f"src={source}")
            ax.plot(layers, [r[f"{metric}_resid"] for r in rows], ".:", color=f"C{index}")
        ax.axhline(0 if metric != "norm_ratio" else 1, color="grey", lw=0.5)
        ax.set(title=title, xlabel="block (layer)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    conventions = result["conventions"]
    figure.suptitle(f"propagation: {conventions['component']} injection, α={conventions['alpha']}, "
                    f"positions={conventions['positions']}, dotted = residual stream", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def run_vector(vectors: dict[str, SteeringVector], key: str) -> Tensor:
    """``vectors[key].directions`` ``[n_layers, d_model]``, or an error naming the keys there are."""
    if key not in vectors:
        raise TorsionError(f"the run has no vector {key!r} (it has {', '.join(sorted(vectors))}); "
                           "pick a method and component the run fitted")
    return vectors[key].directions


def split_prompts(run: RunDir, split: str, n_prompts: int | None, seed: int) -> list[str]:
    """Up to ``n_prompts`` prompts of ``split`` from ``prompts.jsonl``: :func:`torsion.data.sample`'s seeded sample."""
    prompts = [p for p in read_prompts_jsonl(run.prompts_path) if p.split == split]
    if not prompts:
        raise TorsionError(f"{run.prompts_path} has no {split!r} prompts; run the pipeline's prompts stage "
                           "or choose split='train' or 'holdout'")
    return [p.prompt for p in sample(prompts, n_prompts, seed=seed)]


def run_propagation(run_dir: str | Path, lm: LoadedModel, *, sources: Sequence[int] | None = None,
                    alpha: float = -1.0, component: str = "resid", positions: str = "all", method: str = "md",
                    split: str = "train", n_prompts: int | None = 16, seed: int | None = None,
                    batch_size: int = 8, fast: bool = True) -> dict[str, Any]:
    """Propagation on a run directory: writes ``analysis/propagation.json`` and ``.png``.

    The axis is the run's ``<method>/<component>`` vector, the residual stream is compared with
    ``<method>/resid``; prompts are a seeded sample of ``split`` (``seed`` defaults to the run's).
    ``sources`` defaults to :func:`back_half_layers`.
    """
    run = RunDir(run_dir)
    vectors = load_vectors(run.vectors_path, d_model=lm.d_model)
    seed = int(run.manifest().get("seed", 0)) if seed is None else seed
    sources = back_half_layers(lm.n_layers) if sources is None else sources
    axis_name, resid_name = f"{method}/{component}", f"{method}/resid"
    result = propagate(lm, split_prompts(run, split, n_prompts, seed), run_vector(vectors, axis_name),
                       sources=sources, alpha=alpha, component=component, positions=positions,
                       resid_axis=run_vector(vectors, resid_name), axis_name=axis_name,
                       resid_axis_name=resid_name, batch_size=batch_size, fast=fast)
    result["conventions"].update(prompts=f"{split} split, seeded sample stratified by category", split=split)
    result["seed"] = seed
    path = run.analysis_path("propagation")
    atomic_write_json(path, result)
    plot_propagation(result, path.with_suffix(".png"))
    return result
