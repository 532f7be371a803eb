"""Random-direction control (methods.md, "Random-direction control").

At one block and component, the first-token KL on neutral prompts of steering with ``α v``
is compared with ``N`` random directions of **the same applied norm** ``‖α v‖`` (defect 1 of
the original code scaled the two arms differently). Both KL directions are reported, for
``+α`` and ``−α``; the ``−α`` arm negates the random directions too.

Steering covers ``positions="last"`` (the default: only the final prompt token, the position
whose next-token distribution the first-token KL reads) or ``positions="all"`` (every prompt
token); the result records which.

The naive path loops :func:`~torsion.metrics.first_token_kl` over the directions. The fast
path runs each prompt batch's base forward once, keeps what every block from the steered one
on received, and replays only those blocks for many directions at once (directions tiled along
the batch axis), with the final norm and LM head at the last position only. With ``last``
only the final token is replayed, on the prefix's KV cache from the base pass.

Example::

    result = random_control(lm, neutral_prompts, axis, layers=[12, 18], alpha=1.0)
    result["layers"]["12"]["+alpha"]["geometric_privilege"]
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from torsion.analysis.common import back_half_layers, run_vector
from torsion.capture import encode, output_tensor
from torsion.conventions import LAYER_INDEXING, check_blocks
from torsion.data import load_source, sample
from torsion.errors import TorsionError
from torsion.metrics import SteerFactory, first_token_kl, kl_divergences, next_token_logprobs
from torsion.models import LoadedModel
from torsion.replay import (FAST_PATH_TOLERANCE, BlockInputs, fast_path_check, last_token_inputs,
                            recording_block_inputs, relative_gap, replay_rows, run_blocks)
from torsion.steer import add_steering
from torsion.steering.base import MethodRecord, SteeringMethod, at_block, matched_norm
from torsion.steering.flat import Flat
from torsion.store import RunDir, atomic_write_json
from torsion.vectors import load_vectors

SCHEMA_VERSION = 1
KL_DIRECTIONS = ("kl_base_to_steered", "kl_steered_to_base")
# rows per LM-head matmul in the fast path: on CPU a [256, d_model] x [d_model, 152k] matmul runs
# at ~3x the rate of a [16, ...] one; its float32 logits take 155 MB for Qwen's vocabulary
HEAD_ROWS = 256
REPLAYED_TOKENS = {"last": "the final prompt token, on the prefix's KV cache from the base pass",
                   "all": "every prompt token"}
STEERED_POSITIONS = {"last": "the final prompt token only (the position the first-token KL reads)",
                     "all": "every prompt token"}


def random_directions(d_model: int, n: int, applied_norm: float, *, seed: int) -> Tensor:
    """``n`` Gaussian directions from ``torch.Generator().manual_seed(seed)``, each scaled to ``applied_norm``.

    Returns:
        ``[n, d_model]`` float32; drawn and normalised in float64.
    """
    draws = torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (draws / torch.linalg.vector_norm(draws, dim=1, keepdim=True) * applied_norm).float()


def summarize_kls(steering_kl: float, random_kls: Sequence[float]) -> dict[str, Any]:
    """The steering KL against the random KLs of one arm and one KL direction.

    ``percentile_rank`` is the percent of random directions with a strictly lower KL (0 when the
    steering KL is below them all); ``geometric_privilege`` is ``steering_kl < min(random_kls)``.
    Percentiles interpolate linearly (numpy's default).
    """
    values = np.asarray(random_kls, dtype=np.float64)
    if values.size == 0:
        raise TorsionError("no random KLs to compare with; use n_random >= 1")
    return {"steering": float(steering_kl), "random_min": float(values.min()),
            "random_p5": float(np.percentile(values, 5)), "random_mean": float(values.mean()),
            "random_median": float(np.median(values)), "random_p95": float(np.percentile(values, 95)),
            "random_max": float(values.max()), "percentile_rank": float(100.0 * (values < steering_kl).mean()),
            "geometric_privilege": bool(steering_kl < values.min()), "random": values.tolist()}


def naive_kls(lm: LoadedModel, prompts: Sequence[str], layer: int, steps: Tensor, *, component: str = "resid",
              positions: str = "all", batch_size: int = 16) -> dict[str, Tensor]:
    """First-token KL of adding each row of ``steps`` ``[n_steps, d_model]`` at ``layer``, one direction at a time.

    Returns:
        ``{kl_base_to_steered: [n_steps], kl_steered_to_base: [n_steps]}``, means over prompts.
    """
    (layer,) = check_blocks(layer, lm.n_layers)
    out: dict[str, list[float]] = {name: [] for name in KL_DIRECTIONS}
    for step in steps:
        kl = first_token_kl(lm, prompts, _steering(lm, layer, step, component=component, positions=positions),
                            batch_size=batch_size)
        for name in KL_DIRECTIONS:
            out[name].append(kl[name])
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


def _steering(lm: LoadedModel, layer: int, step: Tensor, *, component: str, positions: str) -> SteerFactory:
    """A steering factory adding ``step`` ``[d_model]`` at ``layer`` (the naive loop's one direction)."""
    vectors = torch.zeros(lm.n_layers, lm.d_model)
    vectors[layer] = step
    return lambda: add_steering(lm, vectors, layers=[layer], alpha=1.0, component=component, positions=positions)


def _add_rows(hidden: Tensor, steps: Tensor, positions: str) -> Tensor:
    """``hidden`` ``[rows, seq, d_model]`` with row ``i`` of ``steps`` ``[rows, d_model]`` added at ``positions``."""
    if positions == "all":
        return hidden + steps.to(hidden)[:, None, :]
    steered = hidden.clone()
    steered[:, -1] += steps.to(hidden)
    return steered


@contextmanager
def _adding_rows(module: torch.nn.Module, steps: Tensor, positions: str) -> Iterator[None]:
    """Add row ``i`` of ``steps`` ``[rows, d_model]`` to batch row ``i`` of ``module``'s output."""

    def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
        steered = _add_rows(output_tensor(output), steps, positions)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _head_logprobs(lm: LoadedModel, hidden: Tensor) -> Tensor:
    """Next-token log-probs ``[rows, vocab]`` float32 from the last block's output ``[rows, seq, d_model]``.

    Mirrors the model's ``logits_to_keep=1`` path: final norm, LM head on the last position, then
    any final logit soft-cap. The norm acts per position, so only the last one is normed.
    """
    return torch.log_softmax(_head_logits(lm, _final_normed(lm, hidden)).float(), dim=-1).cpu()


def _final_normed(lm: LoadedModel, hidden: Tensor) -> Tensor:
    """The final norm of the last position of ``hidden`` ``[rows, seq, d_model]``: ``[rows, d_model]``, contiguous
    (an LM-head matmul on a strided slice is about 10x slower on CPU)."""
    last = hidden[:, -1:].contiguous()
    return (last if lm.layout.final_norm is None else lm.layout.final_norm(last))[:, 0]


def _head_logits(lm: LoadedModel, normed: Tensor) -> Tensor:
    """LM head and any final logit soft-cap: ``[rows, vocab]`` from ``[rows, d_model]``."""
    logits = lm.model.get_output_embeddings()(normed)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _replay_hidden(lm: LoadedModel, inputs: BlockInputs, layer: int, steps: Tensor, *, component: str,
                   positions: str) -> Tensor:
    """The last block's output ``[n_steps * batch, seq, d_model]``: blocks ``layer … L-1`` replayed once per
    row of ``steps``.

    Rows are step-major (row ``i * batch + b`` is step ``i`` on prompt ``b``). A ``resid`` step
    leaves block ``layer`` itself unchanged, so its replay starts from that block's base output.
    """
    batch, repeat = inputs.hidden(layer).shape[0], len(steps)
    rows = steps.repeat_interleave(batch, 0)  # [n_steps * batch, d_model]
    if component == "resid":
        hidden = _add_rows(inputs.output(layer).repeat(repeat, 1, 1), rows, positions)
        return run_blocks(lm, inputs, layer + 1, hidden, repeat=repeat)
    with _adding_rows(lm.layout.component_module(component, layer), rows, positions):
        return run_blocks(lm, inputs, layer, inputs.hidden(layer).repeat(repeat, 1, 1), repeat=repeat)


def _replay_logprobs(lm: LoadedModel, inputs: BlockInputs, layer: int, steps: Tensor, *, component: str,
                     positions: str) -> Tensor:
    """Log-probs ``[n_steps, batch, vocab]`` of :func:`_replay_hidden` (the runtime checks compare them)."""
    output = _replay_hidden(lm, inputs, layer, steps, component=component, positions=positions)
    return _head_logprobs(lm, output).reshape(len(steps), inputs.hidden(layer).shape[0], -1)


def _steered_kls(lm: LoadedModel, hidden: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~torsion.metrics.kl_divergences` of the base log-probs ``base`` ``[batch, vocab]`` against the
    next-token distribution of each row of ``hidden`` ``[n_steps * batch, seq, d_model]`` (step-major).

    The LM head runs on :data:`HEAD_ROWS` rows at a time, and each row's log-softmax and float64
    KL terms are computed on their own, while they sit in the CPU cache: the same arithmetic as
    ``kl_divergences`` up to the order of the sums (~1e-16), in about a third of its time on a
    whole ``[rows, vocab]`` block (Qwen's 152k vocabulary, one CPU thread: 0.7 ms a row against
    1.8 ms; the whole block also page-faults in fresh memory for each chunk). A row with a non-finite
    log-prob is recomputed by ``kl_divergences`` itself (its ``p = 0`` rule).

    Returns:
        ``(KL(base ‖ steered), KL(steered ‖ base))``, each ``[n_steps, batch]`` float64 on the CPU.
    """
    batch = base.shape[0]
    repeat = hidden.shape[0] // batch
    normed = _final_normed(lm, hidden)
    logp = base.double().to(normed.device)
    p = logp.exp()
    out = torch.empty(2, hidden.shape[0], dtype=torch.float64, device=normed.device)
    for start in range(0, hidden.shape[0], HEAD_ROWS):
        logits = _head_logits(lm, normed[start:start + HEAD_ROWS]).float()
        for offset, row_logits in enumerate(logits):
            row, prompt = start + offset, (start + offset) % batch
            logq = torch.log_softmax(row_logits, dim=-1).double()
            q = logq.exp()
            difference = logq.sub_(logp[prompt])  # log q − log p
            out[0, row] = -torch.dot(p[prompt], difference)
            out[1, row] = torch.dot(q, difference)
        block = out[:, start:start + len(logits)]
        for offset in (~torch.isfinite(block).all(0)).nonzero()[:, 0].tolist():
            row = start + offset
            block[0, offset], block[1, offset] = (kl[0] for kl in kl_divergences(
                logp[row % batch:row % batch + 1], torch.log_softmax(logits[offset:offset + 1], dim=-1)))
    out = out.cpu().reshape(2, repeat, batch)
    return out[0], out[1]


@torch.inference_mode()
def fast_kls(lm: LoadedModel, prompts: Sequence[str], steps: dict[int, Tensor], *, component: str = "resid",
             positions: str = "all", batch_size: int = 16,
             max_rows: int | None = None,
             check_row: int = 0) -> tuple[dict[int, dict[str, Tensor]], dict[str, float]]:
    """:func:`naive_kls` at several layers, from one base forward per prompt batch.

    With ``positions="all"`` every prompt token is replayed from the steered block on. With
    ``positions="last"`` nothing before the last token changes, so only that token is replayed,
    on a KV cache of the prefix from the base pass (:func:`~torsion.replay.last_token_inputs`).

    Args:
        steps: layer -> ``[n_steps, d_model]``.
        max_rows: most ``directions × prompts`` rows in one replay (default: what fits in a
            quarter of the free memory, :func:`~torsion.replay.replay_rows`).
        check_row: the row of ``steps[first]`` the steered check replays (default the first).

    Returns:
        layer -> ``{kl_base_to_steered: [n_steps], kl_steered_to_base: [n_steps]}`` (means over
        prompts), and the first batch's checks at the first layer: ``unsteered`` (a replay
        without steering against the base forward's log-probs) and ``steered`` (the replay of
        the layer's ``check_row`` step against the full steered forward's, without a cache). When a gap
        exceeds ``FAST_PATH_TOLERANCE`` the replay is unsafe for this model and the KLs come
        back empty.
    """
    first = min(check_blocks(list(steps), lm.n_layers))
    per_batch: dict[int, dict[str, list[Tensor]]] = {layer: {name: [] for name in KL_DIRECTIONS} for layer in steps}
    gaps: dict[str, float] = {}
    bar = tqdm(total=math.ceil(len(prompts) / batch_size) * len(steps), desc="random control (layer x batch)",
               leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        encoded = encode(lm, batch)
        n_tokens = encoded["input_ids"].shape[1]
        if positions == "last" and n_tokens >= 2:
            inputs, logits = last_token_inputs(lm, encoded, first)
            replayed_tokens = 1
        else:
            with recording_block_inputs(lm, first) as inputs:
                logits = lm.model(**encoded, use_cache=False, logits_to_keep=1).logits[:, -1]
            replayed_tokens = n_tokens
        base = torch.log_softmax(logits.float(), dim=-1).cpu()  # [batch, vocab]
        if start == 0:
            gaps = _check_replay(lm, batch, inputs, base, first, steps[first][check_row], component=component,
                                 positions=positions)
            if max(gaps.values()) > FAST_PATH_TOLERANCE:
                bar.close()
                return {}, gaps
        rows = max_rows or replay_rows(lm, tokens=replayed_tokens, kv_tokens=n_tokens, n_blocks=lm.n_layers - first,
                                       reserved=HEAD_ROWS * 2 * int(lm.model.config.vocab_size) * 4)
        chunk = max(1, rows // len(batch))
        for layer, layer_steps in steps.items():
            pieces: dict[str, list[Tensor]] = {name: [] for name in KL_DIRECTIONS}
            for i in range(0, len(layer_steps), chunk):
                hidden = _replay_hidden(lm, inputs, layer, layer_steps[i:i + chunk], component=component,
                                        positions=positions)
                base_to_steered, steered_to_base = _steered_kls(lm, hidden, base)
                pieces["kl_base_to_steered"].append(base_to_steered)
                pieces["kl_steered_to_base"].append(steered_to_base)
            for name in KL_DIRECTIONS:
                per_batch[layer][name].append(torch.cat(pieces[name]))  # [n_steps, batch]
            bar.update()
    bar.close()
    return {layer: {name: torch.cat(pieces, dim=1).mean(1) for name, pieces in kls.items()}
            for layer, kls in per_batch.items()}, gaps


def _check_replay(lm: LoadedModel, batch: Sequence[str], inputs: BlockInputs, base: Tensor, layer: int,
                  step: Tensor, *, component: str, positions: str) -> dict[str, float]:
    """Relative gaps of the replay's log-probs ``[batch, vocab]``: unsteered against ``base``, and
    ``step`` ``[d_model]`` at ``layer`` against the full steered forward (skipped if the first fails)."""
    zero = torch.zeros(1, lm.d_model)
    unsteered = _replay_logprobs(lm, inputs, layer, zero, component=component, positions=positions)[0]
    gaps = {"unsteered": relative_gap(unsteered, base)}
    if gaps["unsteered"] <= FAST_PATH_TOLERANCE:
        replayed = _replay_logprobs(lm, inputs, layer, step[None], component=component, positions=positions)[0]
        full = next_token_logprobs(lm, batch, len(batch),
                                   _steering(lm, layer, step, component=component, positions=positions))
        gaps["steered"] = relative_gap(replayed, full)
    return gaps


def random_control(lm: LoadedModel, prompts: Sequence[str], vectors: Tensor, *, layers: Sequence[int],
                   alpha: float = 1.0, component: str = "resid", positions: str = "last", n_random: int = 50,
                   seed: int = 0, vector_name: str = "vector", batch_size: int = 16,
                   fast: bool = True, method: SteeringMethod | None = None) -> dict[str, Any]:
    """Steering KL of a method at ``±α`` against ``n_random`` norm-matched random directions at each layer.

    Args:
        vectors: ``[n_layers, d_model]``; row ``l`` is ``v_l`` (the default method: ``flat``, ``±α v_l``).
        layers: the blocks to test, one at a time.
        method: any steering method with layers, put on each block alone
            (:func:`torsion.steering.base.at_block`); ``alpha`` is its one strength. A ``flat`` arm is
            one more replayed row; any other method's arm runs its own full forwards
            (:func:`~torsion.metrics.first_token_kl`, the method's factory), and its record's applied
            norm (replacement methods: mean ``‖h' − h‖`` at the steered tokens, of the ``+α`` arm) is
            the random directions' norm.
        positions: ``last`` steers the final prompt token only, ``all`` every prompt token.
        fast: batch the directions on a replay of the blocks from ``l`` on. It falls back to the
            naive loop, and says so, if on the first batch an unsteered replay does not reproduce
            the base forward or the replay of ``+α v`` does not reproduce the full steered forward.

    Returns:
        The JSON-ready result; per layer, ``+alpha`` and ``-alpha`` arms with one
        :func:`summarize_kls` block per KL direction.
    """
    if not prompts:
        raise TorsionError("no prompts for the KL; pass at least one neutral prompt")
    if vectors.shape != (lm.n_layers, lm.d_model):
        raise TorsionError(f"vectors have shape {list(vectors.shape)}; pass [{lm.n_layers}, {lm.d_model}]")
    if positions not in ("all", "last"):
        raise TorsionError(f"unknown positions {positions!r}; choose all or last")
    layers = sorted(set(check_blocks(layers, lm.n_layers)))
    method = method or Flat(vectors, layers=(layers[0],), component=component, positions=positions)
    flat = type(method) is Flat
    arms_kl: dict[int, dict[str, Tensor]] = {}  # non-flat methods: layer -> {direction: [+α, −α]}
    applied, arm_norms = {}, {}
    for layer in layers:
        if flat:
            applied[layer] = float(torch.linalg.vector_norm(at_block(method, layer).vectors[layer].double() * alpha))
            arm_norms[layer] = (applied[layer], applied[layer])
        else:
            arms_kl[layer], arm_norms[layer] = _method_kls(lm, prompts, at_block(method, layer), alpha, batch_size)
            applied[layer] = arm_norms[layer][0]
        if not applied[layer] > 0:
            raise TorsionError(f"the applied norm is {applied[layer]} at layer {layer}; use a non-zero alpha and "
                               "a layer where the method changes the state")
    steps = {}  # [+α v, −α v, +r_1 … +r_N, −r_1 … −r_N], [2 + 2N, d_model]; zero rows for a non-flat arm
    for layer in layers:
        steering = (at_block(method, layer).vectors[layer].double() * alpha).float() if flat \
            else torch.zeros(lm.d_model)
        randoms = random_directions(lm.d_model, n_random, applied[layer], seed=seed)
        steps[layer] = torch.cat([steering[None], -steering[None], randoms, -randoms])
    kls, gaps = fast_kls(lm, prompts, steps, component=component, positions=positions, batch_size=batch_size,
                         check_row=0 if flat else 2) if fast else ({}, {})
    used_fast = bool(kls)
    if not kls:
        kls = {layer: naive_kls(lm, prompts, layer, steps[layer], component=component, positions=positions,
                                batch_size=batch_size) for layer in layers}
    for layer, by_direction in arms_kl.items():  # the method's own arms replace the zero rows
        for name in KL_DIRECTIONS:
            kls[layer][name] = torch.cat([by_direction[name], kls[layer][name][2:]])
    results = {}
    for layer in layers:
        arms = {}
        for arm, sign, randoms in (("+alpha", 1, slice(2, 2 + n_random)), ("-alpha", -1, slice(2 + n_random, None))):
            index = 0 if sign > 0 else 1
            by_direction = {name: summarize_kls(float(kls[layer][name][index]), kls[layer][name][randoms].tolist())
                            for name in KL_DIRECTIONS}
            own = {} if flat else {"steering_norm": arm_norms[layer][index]}
            arms[arm] = {"alpha": sign * alpha, "applied_norm": applied[layer], **own, **by_direction,
                         "geometric_privilege": by_direction["kl_base_to_steered"]["geometric_privilege"]}
        results[str(layer)] = arms
    return {
        "schema_version": SCHEMA_VERSION, "analysis": "random_control",
        "conventions": {
            "layer_indexing": LAYER_INDEXING, "component": component, "positions": positions,
            "steered_positions": STEERED_POSITIONS[positions], "vector": vector_name,
            "kl": "first token, neutral prompts", "kl_directions": list(KL_DIRECTIONS),
            "method": method.name, "strength_name": method.strength_name,
            "norm_matched": "random directions scaled to ||alpha v||" if not method.replacement else
                            "random directions scaled to the +alpha arm's mean ||h' - h|| at the steered tokens",
            **({} if flat else {"steering_norm": "the arm's own applied norm (replacement methods: mean ||h' - h||)"}),
            "random_directions": "Gaussian from a seeded torch.Generator, normalised, scaled to ||alpha v||; "
                                 "the same draws at every layer, negated for -alpha",
            "percentile_rank": "percent of random directions with a strictly lower KL",
            "geometric_privilege": "steering kl_base_to_steered < min of the random kl_base_to_steered"},
        "method": {"name": method.name, "strength": alpha,
                   "params": {k: v for k, v in method.params().items() if k != "layers"}},
        "layers": results, "n_random": n_random, "seed": seed, "alpha": alpha,
        "applied_norm": {str(layer): applied[layer] for layer in layers}, "n_prompts": len(prompts),
        "fast_path": used_fast,
        "fast_path_check": {**fast_path_check(fast, used_fast, gaps, fallback="the naive loop"),
                            "replayed_tokens": REPLAYED_TOKENS[positions] if used_fast else None},
    }


def _method_kls(lm: LoadedModel, prompts: Sequence[str], method: SteeringMethod, alpha: float,
                batch_size: int) -> tuple[dict[str, Tensor], tuple[float, float]]:
    """First-token KLs ``{direction: [2]}`` of ``method`` at ``+α`` and ``−α`` (its factory, full forwards),
    and each arm's matched norm (the record's applied norm, or mean ``‖h' − h‖`` for replacement methods)."""
    out: dict[str, list[float]] = {name: [] for name in KL_DIRECTIONS}
    norms = []
    for strength in (alpha, -alpha):
        records: list[MethodRecord] = []
        factory = method.factory(lm, strength)

        @contextmanager
        def recorded(factory: SteerFactory = factory, records: list = records) -> Iterator[MethodRecord]:
            with factory() as record:
                records.append(record)
                yield record

        kl = first_token_kl(lm, prompts, recorded, batch_size=batch_size)
        for name in KL_DIRECTIONS:
            out[name].append(kl[name])
        norms.append(matched_norm(records))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}, (norms[0], norms[1])


def run_random_control(run_dir: str | Path, lm: LoadedModel, *, layers: Sequence[int] | None = None,
                       alpha: float = 1.0, component: str = "resid", method: str = "md", positions: str = "last",
                       n_random: int = 50, seed: int | None = None, n_prompts: int | None = 32,
                       batch_size: int = 16, fast: bool = True, steering: str = "flat",
                       steering_params: dict[str, Any] | None = None,
                       manifold: str | Path | None = None) -> dict[str, Any]:
    """Random control on a run directory: writes ``analysis/random_control.json`` (the report draws its figure).

    ``v`` is the run's ``<method>/<component>`` vector; the prompts are a seeded sample of
    ``n_prompts`` from the shipped neutral set (all of it when None); ``seed`` defaults to the
    run's; ``layers`` to :func:`back_half_layers`. ``steering`` names the steering method
    (default ``flat`` on ``v``), built from the run by :func:`torsion.steering.from_run.run_method`
    with ``steering_params`` and ``manifold``.
    """
    from torsion.steering.from_run import run_method

    run = RunDir(run_dir)
    name = f"{method}/{component}"
    vectors = run_vector(load_vectors(run.vectors_path, d_model=lm.d_model), name)
    seed = int(run.manifest().get("seed", 0)) if seed is None else seed
    prompts = [p.prompt for p in sample(load_source("neutral"), n_prompts, seed=seed)]
    layers = sorted(set(check_blocks(back_half_layers(lm.n_layers) if layers is None else layers, lm.n_layers)))
    steered, record = run_method(run, lm, steering, vectors=vectors, layers=layers, component=component,
                                 positions=positions, params=steering_params, manifold=manifold)
    result = random_control(lm, prompts, vectors, layers=layers, alpha=alpha, component=component,
                            positions=positions, n_random=n_random, seed=seed, vector_name=name,
                            batch_size=batch_size, fast=fast, method=steered)
    result["conventions"]["prompts"] = "shipped neutral set, seeded sample stratified by category"
    result["method"].update(tensors_sha256=record["tensors_sha256"], given_params={
        key: "tensor" if isinstance(value, Tensor) else value for key, value in record["given_params"].items()})
    path = run.analysis_path("random_control")
    atomic_write_json(path, result)
    return result
