"""Steering hooks (methods.md, "Steering"): addition, dense steering, directional ablation.

Every hook lives in a context manager that removes it in ``finally``: on leaving the ``with``
block, normally or by an exception, the model computes exactly what it computed before.
Steering hooks are prepended, so they run before any other forward hook on the module:
observers (Hugging Face's ``output_hidden_states`` recorder, which transformers installs
permanently on first use, and torsion's capture hooks) see the steered value. Nested contexts
apply the innermost first. Layer ``l`` is decoder block ``l``; vectors are ``[n_layers, d_model]`` (a
:class:`~torsion.vectors.SteeringVector` or a plain tensor). Weight orthogonalisation, the
weight-space twin of :func:`ablate_direction`, is in :mod:`torsion.orthogonalize`.

Example::

    with add_steering(lm, refusal_axis, layers=[10, 12], alpha=4.0) as record:
        rows = lm.model.generate(**inputs, max_new_tokens=32)
    record.alpha, record.applied_norms        # raw α and ‖α_l v_l‖ per layer, for the output file
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torsion.capture import output_tensor
from torsion.conventions import LAYER_INDEXING, check_blocks
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings, generate_batch
from torsion.models import LoadedModel

POSITIONS = ("last", "all")
PHASES = ("prefill", "generation", "both")
WRITES = ("embed", "attn", "mlp")  # the writes into the residual stream that ablation edits


@dataclass
class SteeringRecord:
    """What :func:`add_steering` applies, for the output file, and how often it applied it.

    ``alpha`` is the raw ``α_l`` and ``applied_norms`` is ``‖α_l v_l‖`` (float64 arithmetic),
    both aligned with ``layers``. ``additions[i]`` counts the forward passes in which layer
    ``layers[i]`` was steered.
    """

    layers: tuple[int, ...]
    alpha: tuple[float, ...]
    applied_norms: tuple[float, ...]
    component: str
    positions: str
    phase: str
    first_k: int | None
    additions: list[int] = field(default_factory=list)

    def conventions(self) -> dict[str, Any]:
        """The fields every steered output records (methods.md: raw α and applied norm)."""
        return {"layers": list(self.layers), "alpha": list(self.alpha),
                "applied_norm": list(self.applied_norms), "component": self.component,
                "positions": self.positions, "phase": self.phase, "first_k": self.first_k,
                "layer_indexing": LAYER_INDEXING}


def directions_of(vectors: object) -> Tensor:
    """The ``[n_layers, d_model]`` tensor of a ``SteeringVector`` (duck-typed) or of a plain tensor."""
    directions = getattr(vectors, "directions", vectors)
    if not isinstance(directions, Tensor):
        raise TorsionError(f"expected a SteeringVector or a tensor, got {type(vectors).__name__}; "
                           "pass vectors as a SteeringVector or an [n_layers, d_model] tensor")
    return directions.detach()


def _check_width(lm: LoadedModel, directions: Tensor) -> None:
    if directions.shape[-1] != lm.d_model:
        raise TorsionError(f"vector has d_model={directions.shape[-1]} but the model has {lm.d_model}; "
                           "use a vector computed for this model")


def _check_layers(lm: LoadedModel, layers: int | Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(check_blocks(layers, lm.n_layers))
    if len(set(chosen)) != len(chosen):
        raise TorsionError(f"layers {list(chosen)} repeat a layer; list each layer once")
    return chosen


def _check_alpha(alpha: float | Sequence[float], layers: tuple[int, ...], what: str = "alpha") -> tuple[float, ...]:
    """One value per layer from one value or one per layer; ``what`` names them in errors (alpha, weight)."""
    values = (float(alpha),) if isinstance(alpha, Real) else tuple(map(float, alpha))
    if len(values) == 1:
        values = values * len(layers)
    if len(values) != len(layers):
        raise TorsionError(f"got {len(values)} {what} values for {len(layers)} layers; "
                           f"pass one {what} or one per layer")
    for layer, value in zip(layers, values):
        if not math.isfinite(value):
            raise TorsionError(f"{what} for layer {layer} is {value}; pass a finite number")
    return values


def forward_is_prefill(args: tuple, kwargs: dict) -> tuple[bool, Tensor]:
    """The phase rule of a decoder forward (its pre-hook ``args``, ``kwargs``), and its input tokens
    ``[batch, seq]`` (or embeddings ``[batch, seq, d_model]``): prefill when it processes more than
    one token or its KV cache is empty (or absent), else a generation step (:class:`_PhaseTracker`)."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = args[0] if args else kwargs["inputs_embeds"]
    cache = kwargs.get("past_key_values")
    cached = cache.get_seq_length() if cache is not None else 0
    return tokens.shape[1] > 1 or cached == 0, tokens


@dataclass
class _PhaseTracker:
    """Decides once per decoder forward whether the steering hooks add.

    Rule: a forward is *prefill* when it processes more than one token or its KV cache is
    empty (or absent); otherwise it is a *generation step*, numbered 0, 1, … since the last
    prefill. Limits: a chunked prefill counts every chunk as prefill (with ``positions="last"``
    each chunk's last token is steered); speculative decoding, which feeds several tokens per
    step, counts those steps as prefill; a hand-made one-token forward on a filled cache counts
    as a generation step.
    """

    phase: str
    first_k: int | None
    active: bool = True
    next_step: int = 0

    def before_forward(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if forward_is_prefill(args, kwargs)[0]:
            self.next_step = 0
            self.active = self.phase != "generation"
            return
        step, self.next_step = self.next_step, self.next_step + 1
        self.active = self.phase != "prefill" and (self.first_k is None or step < self.first_k)


@contextmanager
def add_steering(lm: LoadedModel, vectors: object, *, layers: int | Sequence[int],
                 alpha: float | Sequence[float], component: str = "resid", positions: str = "last",
                 phase: str = "both", first_k: int | None = None) -> Iterator[SteeringRecord]:
    """Add ``α_l · v_l`` to the output of ``component`` at each block in ``layers``.

    Args:
        vectors: ``[n_layers, d_model]``; row ``l`` steers block ``l``.
        layers: block indices, ``0 … n_layers-1``.
        alpha: one ``α`` for every layer, or one per layer (aligned with ``layers``).
        component: ``resid`` (block output), ``attn`` or ``mlp`` (what is added to the residual).
        positions: ``last`` (the final prompt token in prefill, each new token in generation;
            batches must be left-padded, as :func:`torsion.capture.encode` does) or ``all``.
        phase: ``prefill``, ``generation`` or ``both``; see :class:`_PhaseTracker` for the rule.
        first_k: steer only the first ``k`` generation steps (the forwards that feed generated
            tokens ``0 … k-1``); prefill is still steered unless ``phase="generation"``.

    Yields:
        A :class:`SteeringRecord` with raw ``α``, applied norms and addition counts.
    """
    chosen = _check_layers(lm, layers)
    alphas = _check_alpha(alpha, chosen)
    if positions not in POSITIONS:
        raise TorsionError(f"unknown positions {positions!r}; choose last or all")
    if phase not in PHASES:
        raise TorsionError(f"unknown phase {phase!r}; choose prefill, generation or both")
    if first_k is not None and (first_k < 0 or phase == "prefill"):
        raise TorsionError(f"first_k={first_k} needs k >= 0 and phase generation or both; fix one of them")
    directions = directions_of(vectors)
    if directions.ndim != 2:
        raise TorsionError(f"vectors have shape {list(directions.shape)}; pass [n_layers, d_model], "
                           "one direction per block")
    _check_width(lm, directions)
    if directions.shape[0] <= max(chosen):
        raise TorsionError(f"vector has {directions.shape[0]} layers but layer {max(chosen)} is steered; "
                           "use a vector with one direction per block of this model")
    rows = directions[list(chosen)].double()
    if not torch.isfinite(rows).all():
        raise TorsionError("vector has non-finite values at a steered layer; recompute the vector")
    deltas = rows * torch.tensor(alphas, dtype=torch.float64)[:, None]  # [len(layers), d_model]
    record = SteeringRecord(chosen, alphas, tuple(torch.linalg.vector_norm(deltas, dim=1).tolist()),
                            component, positions, phase, first_k, [0] * len(chosen))
    tracker = _PhaseTracker(phase, first_k)

    def make_hook(index: int, delta: Tensor):
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            if not tracker.active:
                return None
            hidden = output_tensor(output)
            step = delta.to(hidden)
            if positions == "all" or hidden.shape[1] == 1:
                steered = hidden + step
            else:
                steered = hidden.clone()
                steered[:, -1] += step
            record.additions[index] += 1
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook

    handles: list[RemovableHandle] = []
    try:
        handles.append(lm.layout.decoder.register_forward_pre_hook(tracker.before_forward, with_kwargs=True))
        for index, (layer, delta) in enumerate(zip(chosen, deltas)):
            module = lm.layout.component_module(component, layer)
            weight = next(module.parameters(), None)
            if weight is not None:
                delta = delta.to(device=weight.device, dtype=weight.dtype)
            handles.append(module.register_forward_hook(make_hook(index, delta), prepend=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def dense_steering(lm: LoadedModel, vectors: object, *, alpha: float | Sequence[float] | None = None,
                   applied_norm: float | None = None, component: str = "resid", positions: str = "last",
                   phase: str = "both", first_k: int | None = None) -> AbstractContextManager[SteeringRecord]:
    """Steer every block with its own vector: :func:`add_steering` over ``layers = 0 … L-1``.

    Give exactly one of ``alpha`` (one, or one per layer) or ``applied_norm``: the same
    ``‖α_l v_l‖`` at every layer, i.e. ``α_l = applied_norm / ‖v_l‖`` (``α_l = 0`` where
    ``v_l = 0``). ``vectors`` is ``[n_layers, d_model]`` with ``n_layers`` equal to the model's.
    Returns the :func:`add_steering` context manager.
    """
    directions = directions_of(vectors)
    if directions.ndim != 2 or directions.shape[0] != lm.n_layers:
        raise TorsionError(f"dense steering needs one direction per block, [{lm.n_layers}, d_model], got "
                           f"{list(directions.shape)}; use a vector computed for every layer of this model")
    if (alpha is None) == (applied_norm is None):
        raise TorsionError("dense_steering takes exactly one of alpha or applied_norm; pass one of them")
    if applied_norm is not None:
        if not math.isfinite(applied_norm) or applied_norm < 0:
            raise TorsionError(f"applied_norm={applied_norm} must be finite and >= 0; "
                               "negate the vector to steer the other way")
        norms = torch.linalg.vector_norm(directions.double(), dim=1)
        alpha = torch.where(norms > 0, applied_norm / norms.clamp_min(1e-300), 0.0).tolist()
    return add_steering(lm, directions, layers=range(lm.n_layers), alpha=alpha, component=component,
                        positions=positions, phase=phase, first_k=first_k)


def unit_directions(lm: LoadedModel, direction: object) -> Tensor:
    """Unit directions ``v̂_l``, ``[n_layers, d_model]`` float32, from ``[d_model]`` or ``[n_layers, d_model]``.

    A single ``[d_model]`` direction is used at every block. Zero or non-finite directions are
    refused: ``v̂`` is undefined for them.
    """
    directions = directions_of(direction).double()
    _check_width(lm, directions)
    if directions.ndim == 1:
        directions = directions.expand(lm.n_layers, -1)
    if directions.ndim != 2 or directions.shape[0] != lm.n_layers:
        raise TorsionError(f"direction has shape {list(directions.shape)}; pass [d_model] or "
                           f"[{lm.n_layers}, d_model] (one per block of this model)")
    norms = torch.linalg.vector_norm(directions, dim=1, keepdim=True)
    bad = ~(torch.isfinite(norms[:, 0]) & (norms[:, 0] > 0))
    if bad.any():
        raise TorsionError(f"direction at layer {int(bad.nonzero()[0])} is zero or non-finite; "
                           "ablate a finite non-zero direction")
    return (directions / norms).float()


@contextmanager
def ablate_direction(lm: LoadedModel, direction: object, weight: float | Sequence[float] = 1.0, *,
                     writes: Sequence[str] = WRITES) -> Iterator[Tensor]:
    """Directional ablation ``h' = h − w_l (h·v̂) v̂`` at every write into the residual stream.

    The writes are the embedding module's output and every ``attn`` and ``mlp`` component
    output (for Gemma 2/3 the post-norm modules, whose outputs are what is added). Block ``l``'s
    writes use ``v̂_l``; the embedding uses layer 0's ``v̂_0``. Gemma's ``sqrt(d_model)``
    embedding scale commutes with this linear projection, so where it is applied does not matter.

    Args:
        direction: ``[d_model]`` (every layer) or ``[n_layers, d_model]``.
        weight: the share ``w_l`` of the component removed at block ``l``'s writes (the
            embedding uses ``w_0``): one value for every block or one per block. 1 (the
            default) is full ablation; a write whose weight is 0 gets no hook at all.
        writes: which writes are ablated, a subset of ``("embed", "attn", "mlp")`` (default all).

    Yields:
        The unit directions ``[n_layers, d_model]``.
    """
    units = unit_directions(lm, direction)
    weights = _check_alpha(weight, tuple(range(lm.n_layers)), what="weight")

    def make_hook(unit: Tensor, w: float):
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            hidden = output_tensor(output)
            u = unit.to(hidden)
            removed = (hidden @ u) if w == 1.0 else (hidden @ u) * w
            ablated = hidden - removed[..., None] * u
            return (ablated, *output[1:]) if isinstance(output, tuple) else ablated
        return hook

    unknown = set(writes) - set(WRITES)
    if unknown:
        raise TorsionError(f"unknown residual write(s) {sorted(unknown)}; choose from {', '.join(WRITES)}")
    hooked = [(lm.layout.embed, units[0], weights[0])] if "embed" in writes else []
    hooked += [(getattr(lm.layout, name)[layer], units[layer], weights[layer]) for layer in range(lm.n_layers)
               for name in ("attn", "mlp") if name in writes]
    handles: list[RemovableHandle] = []
    try:
        for module, unit, w in hooked:
            if w != 0.0:
                handles.append(module.register_forward_hook(make_hook(unit, w), prepend=True))
        yield units
    finally:
        for handle in handles:
            handle.remove()


def generate_steered(lm: LoadedModel, prompts: Sequence[str], *, vectors: object, layers: int | Sequence[int],
                     alpha: float | Sequence[float], component: str = "resid", positions: str = "last",
                     max_new_tokens: int = 48, batch_size: int | str = "auto") -> list[dict[str, Any]]:
    """Greedy steered generation; one row per prompt, in order.

    Each row has ``prompt``, ``response`` and the steering conventions of
    :meth:`SteeringRecord.conventions` (``alpha`` and ``applied_norm`` per layer, ``layers``,
    ``component``, ``positions``, ...). Generation is :func:`torsion.generate.generate_batch`
    (chat-templated, left-padded length buckets) inside :func:`add_steering`.
    """
    if isinstance(batch_size, int) and batch_size < 1:  # "auto" and other values: GenerationSettings checks
        raise TorsionError(f"batch_size = {batch_size}; pass at least 1 prompt per batch")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    with add_steering(lm, vectors, layers=layers, alpha=alpha, component=component,
                      positions=positions) as record:
        responses = generate_batch(lm, prompts, settings)
    return [{"prompt": p, "response": r, **record.conventions()} for p, r in zip(prompts, responses)]
