"""Restart a forward pass at block ``s`` from recorded block inputs (methods.md's fast paths).

A base forward runs once with pre-hooks that record what every block from ``first`` on
received (hidden state, attention mask, position ids and embeddings). :func:`run_blocks`
then replays blocks ``s … L-1`` from any hidden state, for many copies of the batch at once
(steering directions tiled along the batch axis). Propagation and the random-direction
control use it; each checks it at run time against the full forward and falls back when the
replay is off by more than :data:`FAST_PATH_TOLERANCE` (relative).

Example::

    with recording_block_inputs(lm, first=12) as inputs:
        lm.layout.decoder(**encode(lm, prompts), use_cache=False)
    out = run_blocks(lm, inputs, 13, inputs.output(12) + step)   # [batch, seq, d_model]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from torsion.capture import output_tensor
from torsion.errors import TorsionError
from torsion.models import LoadedModel

FAST_PATH_TOLERANCE = 1e-4  # methods.md: a fast path must match the full steered forward within 1e-4 (relative)


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
    """Record the inputs of blocks ``first … L-1`` during the forwards run inside the ``with``.

    ``first`` must be a block index (``0 … L-1``): block ``-1`` does not exist.
    """
    if not 0 <= first < lm.n_layers:
        raise TorsionError(f"cannot replay from block {first}; this model has blocks 0..{lm.n_layers - 1}")
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


def fast_path_check(requested: bool, used: bool, gaps: dict[str, float], *, fallback: str,
                    tolerance: float = FAST_PATH_TOLERANCE) -> dict[str, Any]:
    """The record of whether a fast path (a replay from cached block inputs) was used, and why not.

    Args:
        gaps: the relative gaps measured on the first batch: ``unsteered`` (a replay without
            steering against the base forward) and ``steered`` (one steered direction replayed,
            against the full steered forward). Empty when the fast path was not requested.
    """
    gap = max(gaps.values()) if gaps else None
    if not requested:
        note = f"{fallback} (fast path not requested)"
    elif used:
        note = ("replayed the blocks from cached block inputs; on the first batch an unsteered replay matched "
                "the base forward and one steered replay matched the full steered forward")
    else:
        worst = max(gaps, key=gaps.get)
        note = (f"fell back to {fallback}: the {worst} replay differed from the full forward by {gap:.2e} "
                f"(relative, tolerance {tolerance:g}), so this model's blocks cannot be replayed safely")
    return {"requested": requested, "used": used, "max_relative_gap": gap,
            "unsteered_gap": gaps.get("unsteered"), "steered_gap": gaps.get("steered"),
            "tolerance": tolerance, "note": note}
