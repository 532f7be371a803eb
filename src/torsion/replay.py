"""Restart a forward pass at block ``s`` from recorded block inputs (methods.md's fast paths).

A base forward runs once with pre-hooks that record what every block from ``first`` on
received (hidden state, attention mask, position ids and embeddings). :func:`run_blocks`
then replays blocks ``s … L-1`` from any hidden state, for many copies of the batch at once
(steering directions tiled along the batch axis). Propagation and the random-direction
control use it; each checks it at run time against the full forward and falls back when the
replay is off by more than :data:`FAST_PATH_TOLERANCE` (relative).

When only the last position is steered, nothing before it changes, so a replay needs only
that one token: :func:`last_token_inputs` runs the prompt prefix once with a KV cache, then
the last token on top of it while recording the block inputs; each replay extends its own
copy of the prefix cache (tiled to the replay's rows), never the recorded one.

Example::

    with recording_block_inputs(lm, first=12) as inputs:
        lm.layout.decoder(**encode(lm, prompts), use_cache=False)
    out = run_blocks(lm, inputs, 13, inputs.output(12) + step)   # [batch, seq, d_model]

    inputs, logits = last_token_inputs(lm, encode(lm, prompts), first=12)
    out = run_blocks(lm, inputs, 13, inputs.output(12) + step)   # [batch, 1, d_model]
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from torsion.capture import output_tensor
from torsion.errors import TorsionError
from torsion.models import LoadedModel

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

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
    prefix_cache: Cache | None = None  # keys/values of every token but the last (a last-token replay)

    def hidden(self, layer: int) -> Tensor:
        """The hidden state entering block ``layer``, ``[batch, seq, d_model]``."""
        return self.args[layer][0]

    def output(self, layer: int) -> Tensor:
        """The base output of block ``layer``, ``[batch, seq, d_model]``."""
        return self.hidden(layer + 1) if layer + 1 in self.args else self.last_output


@contextmanager
def recording_block_inputs(lm: LoadedModel, first: int, *, cached: bool = False) -> Iterator[BlockInputs]:
    """Record the inputs of blocks ``first … L-1`` during the forwards run inside the ``with``.

    ``first`` must be a block index (``0 … L-1``): block ``-1`` does not exist. A forward with
    a KV cache is refused unless ``cached`` (:func:`last_token_inputs` then supplies the prefix
    cache that replays extend).
    """
    if not 0 <= first < lm.n_layers:
        raise TorsionError(f"cannot replay from block {first}; this model has blocks 0..{lm.n_layers - 1}")
    inputs = BlockInputs()

    def make_hook(layer: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not args:
                raise TorsionError(f"block {layer} got its hidden state as a keyword; the fast path cannot "
                                   "replay it, pass fast=False")
            if kwargs.get("past_key_values") is not None and not cached:
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
            With ``inputs.prefix_cache`` (from :func:`last_token_inputs`) ``seq`` is 1 and each
            call attends to its own tiled copy of the prefix's keys and values.
        repeat: how many copies of the recorded batch ``hidden`` holds.

    Returns:
        ``[repeat * batch, seq, d_model]``, before the final norm (``hidden`` itself when ``start = L``).
    """
    batch = hidden.shape[0] // repeat
    cache = None if inputs.prefix_cache is None else _tiled_cache(inputs.prefix_cache, start, repeat)
    for layer in range(start, lm.n_layers):
        args = _repeat_batch(inputs.args[layer][1:], batch, repeat)
        kwargs = {k: _repeat_batch(v, batch, repeat) for k, v in inputs.kwargs[layer].items()}
        if cache is not None:
            kwargs["past_key_values"] = cache
        hidden = output_tensor(lm.layout.blocks[layer](hidden, *args, **kwargs))
    return hidden


@torch.inference_mode()
def last_token_inputs(lm: LoadedModel, encoded: dict[str, Tensor], first: int) -> tuple[BlockInputs, Tensor]:
    """Block inputs for replaying only the last token, and the base next-token logits ``[batch, vocab]``.

    The decoder runs the prefix (every token but the last, ``encoded`` left-padded as from
    :func:`torsion.capture.encode`) with a KV cache; a snapshot of that cache is kept in
    ``prefix_cache``; then the model runs the last token on the cache while blocks ``first …
    L-1`` are recorded (hidden states ``[batch, 1, d_model]``). Needs at least two tokens.
    """
    ids, mask, positions = encoded["input_ids"], encoded["attention_mask"], encoded["position_ids"]
    if ids.shape[1] < 2:
        raise TorsionError("a last-token replay needs prompts of at least two tokens; use positions='all'")
    prefix = lm.layout.decoder(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                               use_cache=True).past_key_values
    snapshot = _tiled_cache(prefix, 0, 1)  # the last token's forward below extends `prefix`, not this
    with recording_block_inputs(lm, first, cached=True) as inputs:
        logits = lm.model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                          past_key_values=prefix, use_cache=True, logits_to_keep=1).logits
    inputs.prefix_cache = snapshot
    return inputs, logits[:, -1]


def _tiled_cache(cache: Cache, start: int, repeat: int) -> Cache:
    """A copy of ``cache`` whose layers ``start …`` hold their keys and values tiled ``repeat`` times.

    Rows are direction-major like :func:`_repeat_batch`. The copy's layers are new objects, so
    extending it (a cache layer's ``update`` rebinds its tensors) leaves ``cache`` unchanged.
    """
    tiled = copy.copy(cache)
    tiled.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in tiled.layers[start:]:
        if getattr(layer, "is_initialized", False) and repeat > 1:
            layer.keys = layer.keys.repeat(repeat, 1, 1, 1)
            layer.values = layer.values.repeat(repeat, 1, 1, 1)
    return tiled


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


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def replay_rows(lm: LoadedModel, *, tokens: int, kv_tokens: int, n_blocks: int, share: float = 0.25,
                reserved: int = 0, most: int = 1024) -> int:
    """How many rows (directions × prompts) one replay may hold in ``share`` of the free memory.

    A row costs, roughly: its block activations (``tokens × (6 d_model + 3 d_mlp)`` elements)
    and attention scores (``tokens × heads × kv_tokens`` float32), and its copy of the prefix KV
    cache for ``n_blocks`` blocks. ``reserved`` bytes of the share are kept for what does not grow
    with the rows (the random control's LM-head block). At least 1, at most ``most``.
    """
    config = lm.model.config
    element = next(lm.model.parameters()).element_size()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or lm.d_model // heads)
    mlp = int(getattr(config, "intermediate_size", None) or 4 * lm.d_model)
    per_row = (tokens * (6 * lm.d_model + 3 * mlp) * element + tokens * heads * kv_tokens * 4
               + kv_tokens * 2 * kv_heads * head_dim * element * n_blocks)
    return max(1, min(most, (int(share * available_memory(lm.device)) - reserved) // per_row))
