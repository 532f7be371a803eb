"""Batched, resumable generation with judging: the one generation path of torsion.

:func:`generate_batch` is a hand-written decode loop over a Hugging Face ``DynamicCache``:
prompts are chat-templated, sorted by token length and cut into buckets of similar length
(little padding), each bucket is prefilled once with the LM head applied to the last position
only, and rows that emit end-of-sequence leave the batch (the loop stops when none is left).
Greedy decoding is the argmax of the same logits ``model.generate`` reads; sampling applies
transformers' temperature and top-p warpers and draws each row from its own generator, seeded
from ``(seed, prompt, occurrence)``, so a row's draws do not depend on its batch or on resumes
and the global RNG is never touched. Steering hooks (:mod:`torsion.steer`) see the same forwards
as under ``model.generate``: one prefill (the prompt's last token is position ``-1``, batches are
left-padded) and one forward per further token. Rows that finish leave the batch, so a hook that
records per-row states during decoding sees the batch shrink.

Responses are appended to ``responses.jsonl`` one whole bucket at a time, already judged,
so a killed run loses at most the bucket in flight and a re-run skips every id on file.

Example::

    settings = GenerationSettings(max_new_tokens=32)            # batch_size="auto"
    texts = generate_batch(lm, ["How do I bake bread?"], settings)
    generate_responses(lm, prompts, run.responses_path, settings=settings, judge=get_judge("rules"))
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from torsion.errors import TorsionError
from torsion.judge.base import Judge
from torsion.judge.correction import row_correction
from torsion.models import LoadedModel, chat_prompt
from torsion.store import append_jsonl, read_jsonl

if TYPE_CHECKING:
    from torsion.data import Prompt

AUTO = "auto"
# benchmarks/results/generate.json (by_batch_size, one CPU thread): decode tokens per CPU second
# grow 6 -> 18 -> 37 -> 58 -> 85 at 1, 8, 16, 32, 64 rows for Qwen 0.5B (SmolLM 135M: 172 at 32,
# 194 at 64); prefill per token is flat from 4 rows; memory is not binding (~300 MiB at 64 rows).
# 64 rows would decode ~1.5x faster for Qwen, but they coarsen what a killed run loses and what
# the strength search's pruner sees (one report per bucket), so the cap stays at 32.
AUTO_BATCH_CAP = 32
AUTO_MEMORY_SHARE = 0.25  # at most this share of the free memory goes to one batch's working set


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, recorded in the manifest. ``temperature == 0`` means greedy.

    ``batch_size`` is a number of rows or ``"auto"`` (:func:`auto_batch_size`).
    """

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | str = AUTO
    # one bucket per batch_size prompts in the given order, finished rows fed the pad token until all
    # end (as model.generate): for hooks that read per-row states while decoding (decoding_capture)
    keep_rows: bool = False

    def __post_init__(self) -> None:
        if self.batch_size != AUTO and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                        or self.batch_size < 1):
            raise TorsionError(f"batch size {self.batch_size!r} is not valid; pass a whole number >= 1 or 'auto'")
        if self.max_new_tokens < 1:
            raise TorsionError(f"max_new_tokens={self.max_new_tokens}; pass at least 1")


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else ``MemAvailable`` of /proc/meminfo (8 GiB if unreadable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def row_bytes(lm: LoadedModel, n_tokens: int) -> int:
    """Working memory of one row holding ``n_tokens`` tokens: KV cache, prefill activations, last logits.

    An upper estimate: the prefill's widest activation (the MLP's hidden layer, or the attention
    scores of every head) is counted with the KV cache of every layer.
    """
    config = lm.model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = lm.model.dtype.itemsize
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * n_tokens * width
    activations = n_tokens * max(4 * config.intermediate_size, heads * n_tokens) * 4
    return kv + activations + 2 * config.vocab_size * 4


def auto_batch_size(lm: LoadedModel, n_tokens: int) -> int:
    """Rows per bucket for ``batch_size="auto"``: the measured CPU plateau, bounded by free memory.

    ``n_tokens`` is the longest prompt plus the new tokens. At most :data:`AUTO_BATCH_CAP`
    rows, and at most :data:`AUTO_MEMORY_SHARE` of :func:`available_memory`.
    """
    fits = int(AUTO_MEMORY_SHARE * available_memory(lm.device)) // max(1, row_bytes(lm, n_tokens))
    return max(1, min(AUTO_BATCH_CAP, fits))


def eos_token_ids(lm: LoadedModel) -> list[int]:
    """The ids that end a response: the generation config's ``eos_token_id`` (as ``generate`` reads it)."""
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def row_generators(prompts: Sequence[str], seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded from ``(seed, prompt, occurrence)``: repeats of a prompt draw differently."""
    seen: dict[str, int] = {}
    generators = []
    for prompt in prompts:
        occurrence = seen[prompt] = seen.get(prompt, -1) + 1
        digest = hashlib.sha256(f"{seed}\0{occurrence}\0{prompt}".encode()).digest()
        generators.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1))
    return generators


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` (real tokens counted from 0), ``[batch, longest]``."""
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _next_tokens(logits: Tensor, settings: GenerationSettings, generators: Sequence[torch.Generator]) -> Tensor:
    """``[rows]`` next tokens from ``[rows, vocab]`` logits: argmax, or one draw per row from its generator."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    scores = TemperatureLogitsWarper(settings.temperature)(None, logits.float())
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


@contextmanager
def contiguous_head_input(lm: LoadedModel) -> Iterator[None]:
    """Make the LM head's input contiguous inside the ``with``.

    Under ``logits_to_keep=1`` a prefill hands the head the batch's last positions as a strided
    slice, on which the CPU matmul runs ~8x slower (Qwen 0.5B, 32 rows: 1.18 s against 0.14 s;
    benchmarks/results/generate.json, ``by_batch_size``); the values are the same up to the
    matmul's rounding (~1e-6).
    """
    handle = lm.model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def decode_bucket(lm: LoadedModel, rows: Sequence[list[int]], settings: GenerationSettings,
                  generators: Sequence[torch.Generator] | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each tokenized prompt of one bucket; return the new ids.

    ``rows`` are chat-templated token ids; the result excludes the end-of-sequence token. One
    prefill forward (LM head on the last position only), then one forward per further token
    for the rows still running; finished rows leave the batch and the cache.
    """
    eos = torch.tensor(eos_token_ids(lm), dtype=torch.long, device=lm.device)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask, positions = _left_pad(rows, pad_id, lm.device)
    generators = list(generators) if generators is not None else [None] * len(rows)
    alive = list(range(len(rows)))  # original row of each batch row
    new_ids: list[list[int]] = [[] for _ in rows]
    cache = DynamicCache(config=lm.model.config)
    with contiguous_head_input(lm):
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]
    stopped = torch.zeros(len(rows), dtype=torch.bool, device=lm.device)
    for step in range(settings.max_new_tokens):
        tokens = _next_tokens(logits, settings, [generators[r] for r in alive])
        finished = torch.isin(tokens, eos)
        if settings.keep_rows:
            tokens = tokens.masked_fill(stopped, pad_id)
            finished = stopped = finished | stopped
        for row, token, done in zip(alive, tokens.tolist(), finished.tolist()):
            if not done:
                new_ids[row].append(token)
        if step == settings.max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()) and not settings.keep_rows:
            keep = (~finished).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
            alive = [alive[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = lm.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return new_ids


def tokenize_prompts(lm: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Chat-templated token ids of each prompt (the ids :func:`torsion.capture.encode` pads)."""
    texts = [chat_prompt(lm.tokenizer, p) for p in prompts]
    return lm.tokenizer(texts, add_special_tokens=False)["input_ids"]


def buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted shortest first (stable) and cut into runs of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def iter_generate_ids(lm: LoadedModel, prompts: Sequence[str],
                      settings: GenerationSettings) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Yield ``(indices, new_ids)`` one bucket at a time, shortest prompts first (``indices`` index ``prompts``)."""
    if not prompts:
        return
    rows = tokenize_prompts(lm, prompts)
    lengths = [len(r) for r in rows]
    size = settings.batch_size
    if size == AUTO:
        size = auto_batch_size(lm, max(lengths) + settings.max_new_tokens)
    sampled = settings.temperature > 0
    generators = row_generators(prompts, settings.seed, lm.device) if sampled else None
    order = [list(range(start, min(start + size, len(rows)))) for start in range(0, len(rows), size)]
    for indices in order if settings.keep_rows else buckets(lengths, size):
        yield indices, decode_bucket(lm, [rows[i] for i in indices], settings,
                                     [generators[i] for i in indices] if sampled else None)


def iter_generate(lm: LoadedModel, prompts: Sequence[str],
                  settings: GenerationSettings) -> Iterator[tuple[list[int], list[str]]]:
    """Yield ``(indices, responses)`` one bucket at a time; responses are decoded without special tokens, stripped."""
    for indices, new_ids in iter_generate_ids(lm, prompts, settings):
        yield indices, [t.strip() for t in lm.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]


def generate_batch(lm: LoadedModel, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """The response to every prompt, in prompt order: any number of prompts, run in length buckets inside."""
    responses = [""] * len(prompts)
    for indices, texts in iter_generate(lm, prompts, settings):
        for index, text in zip(indices, texts):
            responses[index] = text
    return responses


def generate_responses(lm: LoadedModel, prompts: Sequence[Prompt], path: Path, *,
                       settings: GenerationSettings, judge: Judge) -> list[dict]:
    """Generate and judge every prompt not yet in ``path``; return all rows in prompt order.

    Pending prompts run in length buckets, shortest first; the file's order does not matter
    because rows are matched by ``id``. Sampled rows draw from their own seeded generators, so
    a resumed run draws what an uninterrupted one would.
    """
    done = {row["id"] for row in read_jsonl(path)}
    pending = [p for p in prompts if p.id not in done]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(pending), desc="generate", unit="prompt")
    for indices, responses in iter_generate(lm, [p.prompt for p in pending], settings):
        batch = [pending[i] for i in indices]
        verdicts = judge.judge([p.prompt for p in batch], responses)
        append_jsonl(path, (
            {"id": p.id, "response": r, "label": v.label, "score": v.score, "judge": v.judge,
             "reasons": list(v.reasons), "correction": row_correction(p.prompt, r, v.score)}
            for p, r, v in zip(batch, responses, verdicts)
        ))
        bar.update(len(batch))
    bar.close()
    by_id = {row["id"]: row for row in read_jsonl(path)}
    return [by_id[p.id] for p in prompts]
