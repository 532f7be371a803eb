"""Decoding-time capture: the ``generated`` position (methods.md, "Notation and conventions").

During a (steered or unsteered) ``model.generate``, forward hooks read the ``resid`` state at
chosen readout blocks:

- ``last``: the prompt's final token, in the prefill forward;
- ``generated``: the mean over the first ``K`` generated tokens of each row. Generated token
  ``j``'s state is read when that token is fed back (generation step ``j``), so ``K`` states need
  ``K + 1`` new tokens. A row's tokens stop at its first end-of-sequence token (that token and
  the padding after it never enter the mean); a row that stopped early averages what it
  produced, and ``generated_count`` says how many tokens that was (0: no state, NaN row).

The hooks only read (they return None), and steering hooks are prepended, so the capture sees
the steered states and never changes the generated tokens.

Example::

    with decoding_capture(lm, readout_blocks=[14, 18], k=8) as recorder:
        responses = generate_batch(lm, prompts, GenerationSettings(max_new_tokens=9))
    states = recorder.take()          # {"last": [b, 2, d], "generated": [b, 2, d], "generated_count": [b]}
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor

from torsion.capture import output_tensor
from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings, generate_batch
from torsion.models import LoadedModel
from torsion.steer import forward_is_prefill
from torsion.store import append_jsonl, read_jsonl
from torsion.tensorfile import RowWriter

DEFAULT_K = 8


def check_readout(readout_blocks: Sequence[int] | None, *, k: int, n_layers: int | None = None,
                  steered_blocks: Sequence[int] = ()) -> None:
    """One-line errors for ``K < 1``, no or out-of-range readout blocks, or a readout block before the
    first steered block. ``None`` blocks (a default still to be chosen) and ``n_layers`` skip their checks."""
    if k < 1:
        raise TorsionError(f"K={k}: the generated position averages the first K generated tokens; use K >= 1")
    if readout_blocks is None:
        return
    if not readout_blocks:
        raise TorsionError("no readout block given; pass at least one block index")
    bad = [b for b in readout_blocks if n_layers is not None and not 0 <= b < n_layers]
    if bad:
        raise TorsionError(f"readout block(s) {bad} out of range; the model has blocks 0..{n_layers - 1}")
    if steered_blocks and min(readout_blocks) < min(steered_blocks):
        raise TorsionError(f"readout block {min(readout_blocks)} is before the first steered block "
                           f"{min(steered_blocks)}; read out at or after the steered block")


@dataclass
class DecodingRecorder:
    """Running sums of the readout states of the current batch; :meth:`take` returns the means."""

    readout_blocks: tuple[int, ...]
    k: int
    stop_ids: frozenset[int]
    step: int = -1  # -1 before the prefill, then the generation step being fed
    last: list[Tensor | None] = field(default_factory=list)
    sums: list[Tensor | None] = field(default_factory=list)
    counts: Tensor | None = None
    live: Tensor | None = None  # [batch] rows whose fed token is still part of their output

    def __post_init__(self) -> None:
        self.last = [None] * len(self.readout_blocks)
        self.sums = [None] * len(self.readout_blocks)

    def before_forward(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        prefill, tokens = forward_is_prefill(args, kwargs)
        if prefill:  # the rule of torsion.steer's phase tracker
            self.step = -1
            self.counts = torch.zeros(tokens.shape[0])
            self.live = torch.ones(tokens.shape[0], dtype=torch.bool)
            return
        self.step += 1
        if tokens.dtype == torch.long:
            fed = tokens[:, -1].cpu()
            self.live &= ~torch.isin(fed, torch.tensor(sorted(self.stop_ids), dtype=torch.long))
        if self.step < self.k:
            self.counts += self.live.float()

    def make_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
            hidden = output_tensor(output)[:, -1, :].detach().float().cpu()  # [batch, d_model]
            if self.step == -1:
                self.last[index] = hidden
            elif self.step < self.k:
                masked = hidden * self.live[:, None].float()
                self.sums[index] = masked if self.sums[index] is None else self.sums[index] + masked
        return hook

    def take(self) -> dict[str, Tensor]:
        """``last``, ``generated`` ``[batch, n_readout, d_model]`` float32 and ``generated_count`` ``[batch]``; resets."""
        if self.last[0] is None:
            raise TorsionError("no forward pass was recorded; call generate inside the decoding_capture block")
        last = torch.stack(self.last, dim=1)
        counts = self.counts if self.counts is not None else torch.zeros(len(last))
        sums = torch.stack([s if s is not None else torch.zeros_like(last[:, 0]) for s in self.sums], dim=1)
        generated = sums / counts[:, None, None].clamp_min(1)
        generated[counts == 0] = float("nan")
        self.last, self.sums, self.step = [None] * len(self.readout_blocks), [None] * len(self.readout_blocks), -1
        return {"last": last, "generated": generated, "generated_count": counts.clone()}


def stop_token_ids(lm: LoadedModel) -> frozenset[int]:
    """The ids that end a generated row: the generation config's and the tokenizer's end-of-sequence tokens."""
    ids = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None:
        ids.append(lm.tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


@contextmanager
def decoding_capture(lm: LoadedModel, readout_blocks: Sequence[int], *, k: int = DEFAULT_K,
                     steered_blocks: Sequence[int] = ()) -> Iterator[DecodingRecorder]:
    """Record ``resid`` at ``readout_blocks`` while generating; hooks are removed on exit."""
    blocks = tuple(int(b) for b in readout_blocks)
    check_readout(blocks, k=k, n_layers=lm.n_layers, steered_blocks=steered_blocks)
    recorder = DecodingRecorder(blocks, k, stop_token_ids(lm))
    handles = [lm.layout.decoder.register_forward_pre_hook(recorder.before_forward, with_kwargs=True)]
    try:
        for index, block in enumerate(blocks):
            handles.append(lm.layout.component_module("resid", block).register_forward_hook(recorder.make_hook(index)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def capture_generation_to_file(lm: LoadedModel, prompts: Sequence[str], path: Path, *,
                               readout_blocks: Sequence[int], k: int = DEFAULT_K,
                               settings: GenerationSettings,
                               steer: Callable[[], ContextManager[Any]] | None = None,
                               steered_blocks: Sequence[int] = (),
                               metadata: dict[str, str] | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Generate every prompt (inside ``steer()`` when given) and stream its decoding-time states to ``path``.

    ``path`` (safetensors) holds ``last/resid`` and ``generated/resid`` ``[n_prompts, n_readout,
    d_model]`` and ``generated_count`` ``[n_prompts, 1]``, float32, rows in ``prompts`` order; the
    responses go to ``<path>.responses.jsonl`` (``{"row", "response"}``), one batch at a time.
    A killed capture resumes at its last finished batch. ``settings.max_new_tokens`` is raised to
    ``k + 1`` when smaller (generated token ``j`` is read when it is fed back).

    Returns:
        The tensors (by name) and the responses, in ``prompts`` order.
    """
    check_readout(readout_blocks, k=k, n_layers=lm.n_layers, steered_blocks=steered_blocks)
    if settings.max_new_tokens < k + 1:
        settings = replace(settings, max_new_tokens=k + 1)
    # the recorder reads rows in batch order while decoding: one fixed batch at a time
    settings = replace(settings, keep_rows=True, batch_size=8 if settings.batch_size == "auto" else settings.batch_size)
    n, shape = len(prompts), (len(prompts), len(readout_blocks), lm.d_model)
    responses_path = path.with_name(path.name + ".responses.jsonl")
    meta = {"layer_indexing": LAYER_INDEXING, "component": "resid", "positions": "last,generated",
            "readout_blocks": ",".join(map(str, readout_blocks)), "k": str(k), "model_id": lm.model_id,
            "max_new_tokens": str(settings.max_new_tokens), "dtype": "float32", **(metadata or {})}
    meta["prompts_sha256"] = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
    shapes = {"last/resid": shape, "generated/resid": shape, "generated_count": (n, 1)}
    if path.is_file() and _metadata(path) != meta:  # made with other prompts or settings: redo
        path.unlink()
        responses_path.unlink(missing_ok=True)
    if not path.is_file():
        with RowWriter(path, shapes, meta) as writer:
            done = {row["row"]: row["response"] for row in read_jsonl(responses_path)}
            with decoding_capture(lm, readout_blocks, k=k, steered_blocks=steered_blocks) as recorder, \
                    (steer() if steer is not None else nullcontext()):
                for start in range(writer.rows_done, n, settings.batch_size):
                    batch = list(prompts[start:start + settings.batch_size])
                    responses = generate_batch(lm, batch, settings)
                    states = recorder.take()
                    append_jsonl(responses_path, ({"row": start + i, "response": r} for i, r in enumerate(responses)))
                    done.update({start + i: r for i, r in enumerate(responses)})
                    writer.write(start, {"last/resid": states["last"].numpy(),
                                         "generated/resid": states["generated"].numpy(),
                                         "generated_count": states["generated_count"].numpy()[:, None]})
    tensors = _load(path)
    done = {row["row"]: row["response"] for row in read_jsonl(responses_path)}
    return tensors, [done[i] for i in range(n)]


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

