"""The batch engine: one worker thread owns the model and generates requests in batches.

Rows decode in *lanes*: one lane for every row whose steering applies row by row, one lane per
hooked method and strength. A lane holds its rows' KV cache, left-padded, with an attention
mask and position ids per row (``position = real tokens so far - 1``), and takes one forward
per decode step. Each row carries its own steering (:class:`~torsion.serve.steering.RowSteering`):
the per-row lane's hooks add a ``[batch, d_model]`` per-row offset at every steered block (zeros
for the other rows) and ablate per row with a ``[batch]`` weight per direction, so one forward
serves every row and unsteered rows compute exactly what they would unsteered. Methods that
cannot be applied row by row (ACE, splines: ``RowSteering.hooked``) run their own hooks over
their lane only (installed around that lane's forwards, so other lanes never see them).

Batching: an idle engine waits ``batch_window_s`` after the first request (or until
``max_batch_size`` rows are waiting) and prefills them together. With ``continuous=True`` (the
default) a request arriving while rows decode joins at the next decode step: its prompts are
prefilled (their lane's hooks on), and their KV cache is left-padded to the running one's
length and concatenated to it, with the mask marking the padding. With ``continuous=False``
(static batching) it waits until every running row has finished. Either way at most
``max_batch_size`` rows run at once (a first request with more rows still runs), waiting
requests are admitted first come first served, and a row that finishes (EOS, a stop sequence,
``max_tokens``, or a closed stream) is answered at once and leaves its lane and its cache;
cache columns that have become padding for every row are dropped. Greedy rows give the tokens
they give alone. Caches that cannot be merged this way (any cache layer other than
``transformers``' plain ``DynamicLayer``, e.g. sliding-window layers) fall back to static
batching.

Conditional rows (CAST) are decided first by one unsteered prefill of their prompts: a row
whose condition does not fire runs unsteered.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
    hooked method's :meth:`MethodRecord.conventions`) when its prefill starts, then per choice ``{"type": "delta",
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
    """Per-row steering of one set of rows, in row order."""

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

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        layout, handles = self.lm.layout, []
        try:
            for (component, layer), pair in self.adds.items():
                module = layout.component_module(component, layer)
                handles.append(module.register_forward_hook(self._add_hook(pair), prepend=True))
            for name, (units, weights) in self.ablate.items():
                writes = [(layout.embed, 0)] + [(module, layer) for layer in range(self.lm.n_layers)
                                                for module in (layout.attn[layer], layout.mlp[layer])]
                for module, layer in writes:
                    if weights[:, layer].any():  # a block no row ablates gets no hook, as in ablate_direction
                        hook = self._ablate_hook(units[layer], weights[:, layer])
                        handles.append(module.register_forward_hook(hook, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

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

    @staticmethod
    def _ablate_hook(unit: Tensor, weights: Tensor) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
            hidden = output_tensor(output)
            u = unit.to(hidden)
            removed = ((hidden @ u) * weights.to(hidden)[:, None])[..., None] * u  # [batch, seq, d_model]
            ablated = hidden - removed
            return (ablated, *output[1:]) if isinstance(output, tuple) else ablated
        return hook


@dataclass
class _Lane:
    """Rows decoding together under one set of hooks, with their KV cache.

    ``steering`` is the hooked method's steering (None: the per-row lane); ``mask`` marks the
    cached tokens of each row (``[rows, cache length]``, left-padded); ``pending`` is each
    row's last chosen token, the next forward's input.
    """

    steering: RowSteering | None
    rows: list[_Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: Tensor | None = None
    pending: list[int] = field(default_factory=list)
    _hooks: _RowHooks | None = None

    @property
    def key(self) -> Any:
        return _lane_key(self.steering)

    def hooks(self, lm: LoadedModel, rows: Sequence[_Row] | None = None) -> contextlib.AbstractContextManager:
        """The context that steers this lane's forwards (over ``rows``, default the lane's rows)."""
        if self.steering is not None:
            return self.steering.hooked.apply(lm, self.steering.strength)
        if rows is not None:
            return _RowHooks(lm, [row.steering for row in rows]).installed()
        if self._hooks is None:
            self._hooks = _RowHooks(lm, [row.steering for row in self.rows])
        return self._hooks.installed()


def _lane_key(steering: RowSteering | None) -> Any:
    """Rows of a hooked method share its hooks: one lane per method and strength; all others share one."""
    hooked = None if steering is None else steering.hooked
    return None if hooked is None else (id(hooked), steering.strength)


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


def mergeable(cache: Any) -> bool:
    """Whether rows of ``cache`` can be padded, merged and trimmed: every layer a plain ``DynamicLayer``."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def merge_caches(cache: DynamicCache, mask: Tensor, other: DynamicCache, other_mask: Tensor) -> Tensor:
    """Append ``other``'s rows to ``cache`` (in place), both left-padded to the longer; return the merged mask."""
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: Tensor, length: int) -> Tensor:  # [rows, heads, length, head_dim]: zeros on the left
        return F.pad(t, (0, 0, width - length, 0))

    for layer, new in zip(cache.layers, other.layers):
        layer.keys = torch.cat([pad(layer.keys, mask.shape[1]), pad(new.keys, other_mask.shape[1])])
        layer.values = torch.cat([pad(layer.values, mask.shape[1]), pad(new.values, other_mask.shape[1])])
    return torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(other_mask, (width - other_mask.shape[1], 0))])


def trim_padding(cache: DynamicCache, mask: Tensor) -> Tensor:
    """Drop the leading cache columns that are padding for every row; return the trimmed mask."""
    start = int(mask.any(0).int().argmax())
    if start:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
    return mask[:, start:]


def _token_entry(lm: LoadedModel, token_id: int, logprob: float) -> dict[str, Any]:
    text = lm.tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}


class Engine:
    """Generates submitted :class:`Job` s in batches on one worker thread (:meth:`start`, :meth:`close`)."""

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 8, batch_window_s: float = 0.02,
                 continuous: bool = True) -> None:
        self.lm, self.max_batch_size, self.batch_window_s = lm, max_batch_size, batch_window_s
        self.continuous = continuous
        config = lm.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else lm.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # batches: prefills (each admits a group of rows); rows: rows admitted; largest_batch: most rows in
        # one forward; joined: rows that joined rows already decoding (continuous batching)
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "largest_batch": 0, "joined": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._lanes: list[_Lane] = []
        self._mergeable: bool | None = None  # known after the first prefill
        self._thread: threading.Thread | None = None

    @property
    def mode(self) -> str:
        """``continuous`` or ``static`` (asked for, or forced by a cache that cannot be merged)."""
        return "continuous" if self.continuous and self._mergeable is not False else "static"

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

    @property
    def running_rows(self) -> int:
        return sum(len(lane.rows) for lane in self._lanes)

    def _collect(self, deadline: float | None) -> bool:
        """Move queued jobs to the waiting line: until ``deadline`` or a full batch, or (None) those queued now.

        Returns True when :meth:`close` was called.
        """
        while True:
            if deadline is not None and sum(job.rows for job in self._waiting) >= self.max_batch_size:
                return False
            try:
                if deadline is None:
                    job = self._queue.get_nowait()
                else:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if job is None:
                return True
            self._waiting.append(job)

    def _admissible(self) -> list[Job]:
        """Waiting jobs that start now, first come first served, within ``max_batch_size`` rows."""
        running = self.running_rows
        if running and self.mode == "static":
            return []
        admitted: list[Job] = []
        while self._waiting and (running == 0 or running + self._waiting[0].rows <= self.max_batch_size):
            job = self._waiting.popleft()
            admitted.append(job)
            running += job.rows
        return admitted

    def _loop(self) -> None:
        closing = False
        while True:
            if not self._lanes and not self._waiting:
                if closing:
                    return
                first = self._queue.get()
                if first is None:
                    return
                self._waiting.append(first)
            if not self._lanes:  # a new batch: wait the window for others
                closing = self._collect(time.monotonic() + self.batch_window_s) or closing
            else:
                closing = self._collect(None) or closing
            self.step(self._admissible())

    def step(self, admitted: Sequence[Job]) -> None:
        """Prefill ``admitted`` into the lanes, then one decode step of every lane; failures become errors."""
        try:
            with model_lock(self.lm), torch.inference_mode():
                if admitted:
                    self._admit(admitted)
                for lane in list(self._lanes):
                    self._step(lane)
        except Exception as error:  # the engine keeps serving; the clients see a server error
            logger.exception("generation failed")
            jobs = {id(job): job for job in admitted}
            jobs.update((id(row.job), row.job) for lane in self._lanes for row in lane.rows)
            self._lanes = []
            for job in jobs.values():
                job.emit({"type": "error", "message": f"{type(error).__name__}: {error}"})

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

    def _admit(self, jobs: Sequence[Job]) -> None:
        """Prefill the rows of ``jobs``, one forward per lane, and merge the rows that go on into their lanes."""
        fired = self._conditions(jobs)
        groups: dict[Any, list[_Row]] = {}
        for job, fire in zip(jobs, fired):
            job.emit({"type": "steering", "fired": fire})
            steering = job.steering if fire is not False else None
            seed = job.seed if job.seed is not None else int(torch.randint(0, 2 ** 62, ()))
            generator = None if job.temperature == 0 else torch.Generator().manual_seed(seed)
            rows = [_Row(job, list(range(job.n)), steering, None)] if job.temperature == 0 else \
                [_Row(job, [choice], steering, generator) for choice in range(job.n)]
            groups.setdefault(_lane_key(steering), []).extend(rows)
        for key, rows in groups.items():
            lane = next((lane for lane in self._lanes if lane.key == key), None)
            joining = lane is not None
            if lane is None:
                lane = _Lane(rows[0].steering if key is not None else None)
            self.stats["batches"] += 1
            self.stats["rows"] += len(rows)
            self.stats["joined"] += len(rows) if joining else 0
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
            ids, mask = _left_pad(self.lm, [row.job.prompt_ids for row in rows])
            cache = DynamicCache(config=self.lm.model.config)
            with lane.hooks(self.lm, rows) as record:
                if key is not None:
                    conventions = record.conventions()
                    for job in {id(row.job): row.job for row in rows}.values():
                        job.emit({"type": "record", "record": conventions})
                out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                    past_key_values=cache, use_cache=True, logits_to_keep=1)
            if self._mergeable is None:
                self._mergeable = mergeable(cache)
            keep, tokens = self._advance_all(rows, out.logits[:, -1, :].float())
            if not keep:
                continue
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(index)
                mask = mask[index]
            rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
            if joining:
                lane.mask = merge_caches(lane.cache, lane.mask, cache, mask)
            else:
                lane.cache, lane.mask = cache, mask
                self._lanes.append(lane)
            lane.rows += rows
            lane.pending += tokens
            lane._hooks = None

    def _step(self, lane: _Lane) -> None:
        """One decode forward of ``lane``; finished rows leave it (and it leaves when empty)."""
        mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), 1))], dim=1)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(lane.rows))
        with lane.hooks(self.lm):
            out = self.lm.model(input_ids=torch.tensor(lane.pending, device=mask.device)[:, None],
                                attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                                past_key_values=lane.cache, use_cache=True, logits_to_keep=1)
        lane.mask = mask
        keep, tokens = self._advance_all(lane.rows, out.logits[:, -1, :].float())
        if not keep:
            self._lanes.remove(lane)
            return
        if len(keep) < len(lane.rows):
            index = torch.tensor(keep, device=mask.device)
            lane.cache.batch_select_indices(index)
            lane.mask, lane.rows, lane._hooks = mask[index], [lane.rows[i] for i in keep], None
            if self._mergeable:
                lane.mask = trim_padding(lane.cache, lane.mask)
        lane.pending = [tokens[i] for i in keep]

    def _advance_all(self, rows: Sequence[_Row], logits: Tensor) -> tuple[list[int], list[int]]:
        """Choose and record each row's token; return the indices of the rows that go on, and every token."""
        keep, tokens = [], []
        for index, row in enumerate(rows):
            token = self._choose(logits[index], row)
            tokens.append(token)
            if not self._advance(row, token, logits[index]):
                keep.append(index)
        return keep, tokens

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

