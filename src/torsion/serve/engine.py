"""The batch engine: one worker thread owns the model and generates requests in batches.

Requests that arrive within ``batch_window_s`` of the first (up to ``max_batch_size`` rows)
form one static batch: prompts left-padded, one prefill, then one forward per step with a KV
cache. Each row carries its own steering (:class:`~torsion.serve.steering.RowSteering`):
hooks add a ``[batch, d_model]`` per-row offset at every steered block (zeros for the other
rows) and ablate per row with a ``[batch]`` weight per direction, so one forward serves every
row and unsteered rows compute exactly what they would unsteered. A row that finishes (EOS,
a stop sequence, ``max_tokens``, or a closed stream) is answered at once and dropped from
the batch and its cache; requests arriving meanwhile wait for the next batch (no rows join a
running batch: static batching). Greedy rows give the tokens they give alone.

Methods that cannot be applied row by row (ACE, splines: ``RowSteering.hooked``) run their
own hooks over a sub-batch of the rows with the same method and strength, after the per-row
batch.

Conditional rows (CAST) are decided first by one unsteered prefill of their prompts: a row
whose condition does not fire runs unsteered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torsion.capture import output_tensor
from torsion.models import LoadedModel
from torsion.serve.steering import RowSteering

logger = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for a probability that underflows to 0
_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(lm: LoadedModel) -> threading.Lock:
    """One lock per model object: engines sharing weights never mix their hooks."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(lm.model, threading.Lock())


@dataclass
class Job:
    """One request's generation. ``emit`` receives its events, from the engine thread:

    ``{"type": "steering", "fired": bool | None}`` first, ``{"type": "record", "record"}`` (a
    hooked method's :meth:`MethodRecord.conventions`) when its sub-batch starts, then per choice ``{"type": "delta",
    "choice", "text", "logprobs"}`` and ``{"type": "done", "choice", "finish_reason", "tokens",
    "text"}``, or one ``{"type": "error", "message"}``. Greedy (``temperature == 0``) choices
    are copies of one row.
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[dict[str, Any]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    steering: RowSteering | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return 1 if self.temperature == 0 else self.n


@dataclass
class _Row:
    job: Job
    choices: list[int]
    steering: RowSteering | None
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0


class _RowHooks:
    """Per-row steering of one batch; row tensors are sliced as rows leave (:meth:`keep`)."""

    def __init__(self, lm: LoadedModel, steerings: Sequence[RowSteering | None]) -> None:
        self.lm = lm
        weight = next(lm.model.parameters())
        batch, width = len(steerings), lm.d_model
        adds: dict[tuple[str, int], list[Tensor | None]] = {}
        ablate: dict[str, tuple[Tensor, Tensor]] = {}
        for row, steering in enumerate(steerings):
            if steering is None:
                continue
            if steering.units is not None:
                units, weights = ablate.setdefault(steering.unit_key,
                                                   (steering.units, torch.zeros(batch, lm.n_layers)))
                weights[row] = torch.tensor(steering.weights)
                continue
            slot = 1 if steering.positions == "all" else 0
            for layer, delta in steering.offsets.items():
                pair = adds.setdefault((steering.component, layer), [None, None])
                if pair[slot] is None:
                    pair[slot] = torch.zeros(batch, width, dtype=torch.float64)
                pair[slot][row] = delta
        # add_steering's cast: the float64 α·v becomes the weights' dtype
        self.adds = {key: [None if t is None else t.to(device=weight.device, dtype=weight.dtype) for t in pair]
                     for key, pair in adds.items()}
        self.ablate = {name: (units.to(weight.device), weights.to(weight.device))
                       for name, (units, weights) in ablate.items()}

    def keep(self, index: Tensor) -> None:
        for pair in self.adds.values():
            pair[:] = [None if t is None else t[index.to(t.device)] for t in pair]
        for name, (units, weights) in self.ablate.items():
            self.ablate[name] = (units, weights[index.to(weights.device)])

    def install(self) -> list[RemovableHandle]:
        layout, handles = self.lm.layout, []
        for (component, layer), pair in self.adds.items():
            hook = self._add_hook(pair)
            handles.append(layout.component_module(component, layer).register_forward_hook(hook, prepend=True))
        for name, (_units, weights) in self.ablate.items():
            writes = [(layout.embed, 0)] + [(module, layer) for layer in range(self.lm.n_layers)
                                            for module in (layout.attn[layer], layout.mlp[layer])]
            for module, layer in writes:
                if weights[:, layer].any():  # a block no row ablates gets no hook, as in ablate_direction
                    handles.append(module.register_forward_hook(self._ablate_hook(name, layer), prepend=True))
        return handles

    @staticmethod
    def _add_hook(pair: list[Tensor | None]) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            hidden = output_tensor(output)
            last, every = pair
            if every is not None:
                hidden = hidden + every.to(hidden)[:, None, :]
            if last is not None:
                if hidden.shape[1] == 1:
                    hidden = hidden + last.to(hidden)[:, None, :]
                else:
                    hidden = hidden.clone()
                    hidden[:, -1] += last.to(hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _ablate_hook(self, name: str, layer: int) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            units, weights = self.ablate[name]
            hidden = output_tensor(output)
            u = units[layer].to(hidden)
            removed = ((hidden @ u) * weights[:, layer].to(hidden)[:, None])[..., None] * u  # [batch, seq, d_model]
            ablated = hidden - removed
            return (ablated, *output[1:]) if isinstance(output, tuple) else ablated
        return hook


def _left_pad(lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask``, ``[batch, longest]``, left-padded."""
    longest = max(len(p) for p in prompts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, -len(prompt):] = torch.tensor(prompt)
            mask[row, -len(prompt):] = 1
    return ids.to(lm.device), mask.to(lm.device)


def _token_entry(lm: LoadedModel, token_id: int, logprob: float) -> dict[str, Any]:
    text = lm.tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}


class Engine:
    """Generates submitted :class:`Job` s in batches on one worker thread (:meth:`start`, :meth:`close`)."""

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 8, batch_window_s: float = 0.02) -> None:
        self.lm, self.max_batch_size, self.batch_window_s = lm, max_batch_size, batch_window_s
        config = lm.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else lm.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "largest_batch": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="torsion-serve-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, job: Job) -> None:
        self.stats["requests"] += 1
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, rows, closing = [first], first.rows, False
            deadline = time.monotonic() + self.batch_window_s
            while rows < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                jobs.append(job)
                rows += job.rows
            self.run_batch(jobs)
            if closing:
                return

    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Generate ``jobs`` as one batch (synchronously); failures become each job's error event."""
        try:
            with model_lock(self.lm):
                self._generate(jobs)
        except Exception as error:  # the engine keeps serving; the clients see a server error
            logger.exception("generation failed")
            for job in jobs:
                job.emit({"type": "error", "message": f"{type(error).__name__}: {error}"})

    @torch.inference_mode()
    def _conditions(self, jobs: Sequence[Job]) -> list[bool | None]:
        """Whether each job's condition fires, from one unsteered prefill of the conditional prompts."""
        gated = [i for i, job in enumerate(jobs) if job.steering is not None and job.steering.condition is not None]
        fired: list[bool | None] = [None] * len(jobs)
        if not gated:
            return fired
        ids, mask = _left_pad(self.lm, [jobs[i].prompt_ids for i in gated])
        layers = {jobs[i].steering.condition.layer for i in gated}
        captured: dict[int, Tensor] = {}

        def make_hook(layer: int):
            def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
                captured[layer] = output_tensor(output)
            return hook

        handles = [self.lm.layout.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
        try:
            self.lm.layout.decoder(input_ids=ids, attention_mask=mask,
                                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for row, i in enumerate(gated):
            condition = jobs[i].steering.condition
            fired[i] = condition.fires(condition.pick(captured[condition.layer][row:row + 1]).cpu())[0]
        return fired

    @torch.inference_mode()
    def _generate(self, jobs: Sequence[Job]) -> None:
        fired = self._conditions(jobs)
        rows: list[_Row] = []
        for job, fire in zip(jobs, fired):
            job.emit({"type": "steering", "fired": fire})
            steering = job.steering if fire is not False else None
            seed = job.seed if job.seed is not None else int(torch.randint(0, 2 ** 62, ()))
            generator = None if job.temperature == 0 else torch.Generator().manual_seed(seed)
            if job.temperature == 0:
                rows.append(_Row(job, list(range(job.n)), steering, None))
            else:
                rows += [_Row(job, [choice], steering, generator) for choice in range(job.n)]
        groups: dict[Any, list[_Row]] = {}
        for row in rows:  # rows of a hooked method share its hooks: one sub-batch per method and strength
            hooked = None if row.steering is None else row.steering.hooked
            groups.setdefault(None if hooked is None else (id(hooked), row.steering.strength), []).append(row)
        for key, group in groups.items():
            self.stats["batches"] += 1
            self.stats["rows"] += len(group)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
            if key is None:
                hooks = _RowHooks(self.lm, [row.steering for row in group])
                handles = hooks.install()
                try:
                    self._decode(group, hooks)
                finally:
                    for handle in handles:
                        handle.remove()
            else:
                steering = group[0].steering
                with steering.hooked.apply(self.lm, steering.strength) as record:
                    conventions = record.conventions()
                    for job in {id(row.job): row.job for row in group}.values():
                        job.emit({"type": "record", "record": conventions})
                    self._decode(group, None)

    def _decode(self, rows: list[_Row], hooks: _RowHooks | None) -> None:
        ids, mask = _left_pad(self.lm, [row.job.prompt_ids for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while rows:
            out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            keep, tokens = [], []
            for index, row in enumerate(rows):
                token = self._choose(logits[index], row)
                tokens.append(token)
                if not self._advance(row, token, logits[index]):
                    keep.append(index)
            if len(keep) < len(rows):
                if not keep:
                    break
                index = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(index)
                if hooks is not None:
                    hooks.keep(index)
                mask = mask[index]
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            ids = torch.tensor(tokens, device=mask.device)[:, None]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1

    @staticmethod
    def _choose(logits: Tensor, row: _Row) -> int:
        """Greedy argmax, or a draw from the temperature- and top-p-shaped distribution."""
        job = row.job
        if job.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / job.temperature, dim=-1).cpu()
        if job.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(0) - ordered > job.top_p  # keep the smallest prefix reaching top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int, logits: Tensor) -> bool:
        """Record ``token``; emit the new text; return True when the row is finished (and answered)."""
        job, tokenizer = row.job, self.lm.tokenizer
        if job.cancelled.is_set():
            return True
        row.tokens.append(token)
        entries = None
        if job.top_logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            entry = _token_entry(self.lm, token, float(logprobs[token]))
            values, top = logprobs.topk(job.top_logprobs)
            entry["top_logprobs"] = [_token_entry(self.lm, int(i), float(v)) for v, i in zip(values, top)]
            entries = [entry]
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        finish = "stop" if token in self.eos else None
        cuts = [text.find(stop) for stop in job.stop if stop in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        if finish is None and len(row.tokens) >= job.max_tokens:
            finish = "length"
        hold = 0 if finish else max((len(stop) - 1 for stop in job.stop), default=0)
        end = len(text) - hold
        while end > row.emitted and not finish and text[end - 1] == "\ufffd":  # an incomplete character
            end -= 1
        if end > row.emitted or entries:
            delta = text[row.emitted:max(end, row.emitted)]
            row.emitted = max(end, row.emitted)
            for choice in row.choices:
                job.emit({"type": "delta", "choice": choice, "text": delta, "logprobs": entries})
        if finish:
            for choice in row.choices:
                job.emit({"type": "done", "choice": choice, "finish_reason": finish, "tokens": len(row.tokens),
                          "text": text})
        return finish is not None

