"""Generation throughput: today's ``model.generate`` batches against torsion's decode loop.

Both arms run in one process, interleaved chunk by chunk, on the quick profile's prompts
(donotanswer + harmbench, 128 each, seed 0) with its settings (greedy, 32 new tokens):

- ``baseline``: ``model.generate`` on batches of 8, shortest prompts first (the generation
  stage before this change);
- ``new``: :func:`torsion.generate.iter_generate_ids` with ``batch_size="auto"``.

Default mode (a few minutes): a prompt subset through both arms, plus where the time goes:
prefill per token and decode per step at batch sizes 1-64 (CPU time, split into the decoder
blocks, the LM head and the rest; the peak memory each batch adds), padding and finished rows
still decoded. ``--sweep``: only the per-batch-size part, into each model's ``by_batch_size``.
``--full`` (once; over an hour on 2 shared cores): all 256 prompts through the baseline, the
new path and the batch-of-one reference, the identical-output share, and for each differing
row the reference's top-2 logit margin where it diverges.
Writes ``benchmarks/results/generate.json`` (``--full`` adds a ``full`` section).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time
from typing import Callable, Sequence

import torch
from common import RESULTS, write_result

from torsion.capture import encode
from torsion.data.splits import build_prompt_set
from torsion.generate import (AUTO_BATCH_CAP, GenerationSettings, auto_batch_size, buckets,
                              contiguous_head_input, eos_token_ids, iter_generate_ids, tokenize_prompts)
from torsion.models import LoadedModel, load_model

MODELS = ("embedded:qwen2.5-coder-0.5b", "embedded:smollm2-135m")
NEW_TOKENS, BASELINE_BATCH, SEED = 32, 8, 0
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DECODE_STEPS = 3  # timed decode steps per batch size (the best counts)


def peak_rss_reset() -> None:
    """Reset the process's peak RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mib() -> float:
    """``VmHWM`` of /proc/self/status: the peak resident set since the last reset, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def strip_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    return out


@torch.inference_mode()
def baseline_ids(lm: LoadedModel, prompts: Sequence[str], batch_size: int, stats: dict | None = None) -> list[list[int]]:
    """Today's path: ``model.generate`` on left-padded batches, shortest first; new ids up to EOS."""
    eos = set(eos_token_ids(lm))
    rows = tokenize_prompts(lm, prompts)
    out: list[list[int]] = [[] for _ in prompts]
    for indices in buckets([len(r) for r in rows], batch_size):
        inputs = encode(lm, [prompts[i] for i in indices])
        inputs.pop("position_ids")
        output = lm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id)
        new = output[:, inputs["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(indices, new):
            out[i] = strip_eos(tokens, eos)
        if stats is not None:  # row-steps decoded after the row finished; padded prompt positions
            steps = len(new[0])
            stats["row_steps"] += steps * len(indices)
            stats["finished_row_steps"] += sum(steps - min(steps, len(out[i]) + 1) for i in indices)
            stats["prompt_positions"] += inputs["input_ids"].numel()
            stats["real_prompt_tokens"] += int(inputs["attention_mask"].sum())
    return out


def new_ids(lm: LoadedModel, prompts: Sequence[str], batch_size: int | str = "auto") -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, batch_size=batch_size)
    for indices, ids in iter_generate_ids(lm, prompts, settings):
        for i, tokens in zip(indices, ids):
            out[i] = tokens
    return out


def timed(fn: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float, float]:
    peak_rss_reset()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, peak_rss_mib()


def side_by_side(lm: LoadedModel, prompts: Sequence[str], arms: dict[str, Callable], chunks: int,
                 on_chunk: Callable[[dict], None] | None = None) -> dict:
    """Run every arm on each chunk of ``prompts`` in turn (interleaved); return ids, seconds, peak RSS per arm.

    ``on_chunk(results)`` is called after each chunk (the full mode writes what it has so far).
    """
    size = -(-len(prompts) // chunks)
    results = {name: {"ids": [], "seconds": 0.0, "peak_rss_mib": 0.0, "load": []} for name in arms}
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        for name, arm in arms.items():
            ids, seconds, rss = timed(lambda: arm(chunk))
            record = results[name]
            record["ids"] += ids
            record["seconds"] += seconds
            record["peak_rss_mib"] = max(record["peak_rss_mib"], rss)
            record["load"].append(os.getloadavg()[0])
        if on_chunk is not None:
            on_chunk(results)
    return results


def summary(record: dict) -> dict:
    tokens = sum(map(len, record["ids"]))
    return {"seconds": round(record["seconds"], 2), "generated_tokens": tokens,
            "tokens_per_s": round(tokens / record["seconds"], 2), "peak_rss_mib": round(record["peak_rss_mib"], 1),
            "loadavg_1min": record["load"]}


class StepClock:
    """Process CPU seconds spent inside the decoder blocks and inside the LM head, from forward hooks.

    What a forward spends outside both (embedding, masks, cache bookkeeping, the final norm,
    Python dispatch) is its total minus these two.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.blocks = self.head = 0.0
        self._started = 0.0
        first, last, head = lm.layout.blocks[0], lm.layout.blocks[-1], lm.model.get_output_embeddings()
        self.handles = [first.register_forward_pre_hook(self._start),
                        last.register_forward_hook(lambda *_: self._stop("blocks")),
                        head.register_forward_pre_hook(self._start),
                        head.register_forward_hook(lambda *_: self._stop("head"))]

    def _start(self, *_args: object) -> None:
        self._started = time.process_time()

    def _stop(self, part: str) -> None:
        setattr(self, part, getattr(self, part) + time.process_time() - self._started)

    def reset(self) -> None:
        self.blocks = self.head = 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def rss_mib() -> float:
    """``VmRSS`` of /proc/self/status: the resident set now, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@torch.inference_mode()
def where_time_goes(lm: LoadedModel, prompts: Sequence[str], batch_sizes: Sequence[int]) -> dict:
    """Prefill per token and decode per step at each batch size, on median-length prompts, split into blocks,
    LM head and the rest.

    Times are process CPU seconds (steadier than wall time on a shared machine; with one torch
    thread they are the compute's own), the decode step the best of ``DECODE_STEPS``.
    """
    rows = tokenize_prompts(lm, prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    clock = StepClock(lm)
    out = {}
    try:
        for batch in batch_sizes:
            chosen = [prompts[i] for i in order[len(order) // 2 - batch // 2:][:batch]]  # median-length prompts
            inputs = encode(lm, chosen)
            tokens = int(inputs["attention_mask"].sum())
            clock.reset()
            start = time.process_time()
            with contiguous_head_input(lm):  # as decode_bucket runs the prefill
                output = lm.model(**inputs, use_cache=True, logits_to_keep=1)
            prefill = time.process_time() - start
            prefill_parts = {"blocks": clock.blocks, "lm_head": clock.head}
            cache = output.past_key_values
            mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for _ in range(DECODE_STEPS):
                mask = torch.cat([mask, mask.new_ones(len(chosen), 1)], dim=1)
                positions = positions + 1
                clock.reset()
                start, wall = time.process_time(), time.perf_counter()
                logits = lm.model(input_ids=token, attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                steps.append((time.process_time() - start, time.perf_counter() - wall, clock.blocks, clock.head))
            step, step_wall, blocks, head = min(steps)
            states = torch.randn(len(chosen), inputs["input_ids"].shape[1], lm.d_model, dtype=lm.model.dtype)
            head_s = {}
            for layout, last in (("strided", states[:, -1:]), ("contiguous", states[:, -1:].contiguous())):
                start = time.process_time()
                lm.model.get_output_embeddings()(last)
                head_s[layout] = round(time.process_time() - start, 4)
            out[str(batch)] = {
                "prefill_tokens": tokens, "padded_positions": int(inputs["input_ids"].numel()) - tokens,
                "prefill_cpu_s_per_token": round(prefill / tokens, 6),
                "prefill_tokens_per_cpu_s": round(tokens / prefill, 1),
                "prefill_share": {part: round(value / prefill, 3) for part, value in prefill_parts.items()},
                "prefill_lm_head_cpu_s_by_input_layout": head_s,
                "decode_step_cpu_s": round(step, 5), "decode_step_wall_s": round(step_wall, 5),
                "decode_tokens_per_cpu_s": round(len(chosen) / step, 1),
                "decode_share": {"blocks": round(blocks / step, 3), "lm_head": round(head / step, 3),
                                 "rest": round(1 - (blocks + head) / step, 3)},
            }
            print(lm.model_id, batch, out[str(batch)], flush=True)
            del output, cache, logits
    finally:
        clock.remove()
    return out


@torch.inference_mode()
def peak_memory(lm: LoadedModel, prompts: Sequence[str], batch_sizes: Sequence[int]) -> dict[str, float]:
    """Peak resident memory (MiB) a batch adds over a prefill and one decode step, per batch size.

    Measured as the peak RSS (``VmHWM``, reset first) minus the RSS before the batch, with glibc
    told to map every allocation over 64 KiB on its own (``mallopt``), so memory a batch frees
    leaves the process and the next batch starts from the model alone. torch's CPU tensors are
    invisible to tracemalloc. Run after the timings: the separate mappings cost page faults.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, so the dynamic threshold cannot grow
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD: give freed heap back
    rows = tokenize_prompts(lm, prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = {}
    for batch in batch_sizes:
        inputs = encode(lm, [prompts[i] for i in order[len(order) // 2 - batch // 2:][:batch]])
        gc.collect()
        libc.malloc_trim(0)
        before = rss_mib()
        peak_rss_reset()
        output = lm.model(**inputs, use_cache=True, logits_to_keep=1)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, 1)], dim=1)
        lm.model(input_ids=output.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask,
                 position_ids=inputs["position_ids"][:, -1:] + 1, past_key_values=output.past_key_values,
                 use_cache=True, logits_to_keep=1)
        out[str(batch)] = round(peak_rss_mib() - before, 1)
        del output
        print(lm.model_id, batch, "peak MiB added", out[str(batch)], flush=True)
    return out


def batch_size_sweep(lm: LoadedModel, prompts: Sequence[str], batch_sizes: Sequence[int]) -> dict:
    """:func:`where_time_goes`, then :func:`peak_memory` (after: its mappings cost page faults) per batch size."""
    out = where_time_goes(lm, prompts, batch_sizes)
    for batch, mib in peak_memory(lm, prompts, batch_sizes).items():
        out[batch]["peak_rss_added_mib"] = mib
    return out


def divergence(lm: LoadedModel, prompt: str, reference: list[int], other: list[int]) -> dict:
    """Where ``other`` leaves ``reference``, and the reference's top-2 logit margin there (batch of one)."""
    at = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    row = tokenize_prompts(lm, [prompt])[0] + reference[:at]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([row], device=lm.device), logits_to_keep=1).logits[0, -1]
    top = logits.float().topk(2).values
    return {"position": at, "reference_margin": float(top[0] - top[1]),
            "reference_token": reference[at] if at < len(reference) else None,
            "new_token": other[at] if at < len(other) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="256 prompts on the first of --models, with the batch-of-one reference")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the default mode")
    parser.add_argument("--full-prompts", type=int, default=256, help="prompts in --full mode (a check run: fewer)")
    parser.add_argument("--sweep", action="store_true",
                        help="only the per-batch-size measurements (a few minutes), into each model's by_batch_size")
    parser.add_argument("--skip-baseline", action="store_true", help="--full without the batches-of-8 arm")
    parser.add_argument("--chunk", type=int, default=32, help="--full: prompts per interleaved chunk")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=list(BATCH_SIZES),
                        help="batch sizes of the per-step measurements")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 5x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p.prompt for p in build_prompt_set(("donotanswer", "harmbench"), n_per_source=128,
                                                  holdout_fraction=0.2, seed=SEED)]
    path = RESULTS / "generate.json"
    conventions = {"prompts": "quick profile: donotanswer + harmbench, 128 each, seed 0", "decoding": "greedy",
                   "new_tokens": NEW_TOKENS, "baseline": f"model.generate, batches of {BASELINE_BATCH}, shortest first",
                   "new": "torsion.generate (length buckets, finished rows dropped, LM head at the last position), "
                          "batch_size=auto", "auto_batch_cap": AUTO_BATCH_CAP,
                   "tokens_per_s": "generated tokens (up to EOS) / wall seconds", "threads": args.threads,
                   "loadavg_start": os.getloadavg()}
    if args.sweep:
        current = json.loads(path.read_text()) if path.exists() else {}
        models = current.get("models", {})
        for spec in args.models:
            lm = load_model(spec)
            where_time_goes(lm, prompts, [2])  # warm-up: the first forwards of a process allocate
            lengths = [len(r) for r in tokenize_prompts(lm, prompts)]
            models.setdefault(spec, {}).update(by_batch_size=batch_size_sweep(lm, prompts, args.batch_sizes),
                                               auto_batch_size=auto_batch_size(lm, max(lengths) + NEW_TOKENS))
        write_result("generate", {**{k: v for k, v in current.items() if k not in ("benchmark", "machine")},
                                  "models": models, "by_batch_size_conventions": {
                                      "threads": args.threads, "decode_steps": DECODE_STEPS,
                                      "prompts": "median-length prompts of the quick profile's set",
                                      "times": "process CPU seconds; decode: best of the steps",
                                      "shares": "CPU time in the decoder blocks and the LM head (forward hooks); "
                                                "rest: embedding, masks, cache, final norm, Python",
                                      "memory": "peak RSS (VmHWM, reset first) minus RSS before the batch, over a prefill and one "
                                                "decode step, every allocation over 64 KiB mapped on its own "
                                                "(mallopt) so freed memory leaves the process",
                                      "loadavg": [round(v, 2) for v in os.getloadavg()]}})
        return
    if args.full:
        lm = load_model(args.models[0])
        prompts = prompts[:args.full_prompts]
        arms = {"baseline": lambda chunk: baseline_ids(lm, chunk, BASELINE_BATCH),
                "new": lambda chunk: new_ids(lm, chunk),
                "batch_of_one": lambda chunk: baseline_ids(lm, chunk, 1)}
        if args.skip_baseline:  # the default mode measures it; the reference is what --full adds
            arms.pop("baseline")
        def write(results: dict) -> None:
            reference = results["batch_of_one"]["ids"]
            report = {"model": lm.model_id, "n_prompts_done": len(reference), "n_prompts": len(prompts),
                      "prompts_per_chunk": args.chunk,
                      **{k: summary(v) for k, v in results.items()}}
            for name in ("baseline", "batch_of_one"):
                if name in report:
                    report[f"ratio_new_over_{name}_tokens_per_s"] = round(
                        report["new"]["tokens_per_s"] / report[name]["tokens_per_s"], 2)
            for name in [arm for arm in ("baseline", "new") if arm in results]:
                same = [a == b for a, b in zip(reference, results[name]["ids"])]
                report[f"{name}_identical_to_batch_of_one"] = round(sum(same) / len(same), 4)
                report[f"{name}_differences"] = [{"prompt_index": i, **divergence(lm, prompts[i], reference[i],
                                                                               results[name]["ids"][i])}
                                                 for i, s in enumerate(same) if not s]
            current = json.loads(path.read_text()) if path.exists() else {}  # the default mode may have written
            write_result("generate", {**{k: v for k, v in current.items() if k not in ("benchmark", "machine")},
                                      "full": {**conventions, **report}})

        side_by_side(lm, prompts, arms, chunks=max(1, len(prompts) // args.chunk), on_chunk=write)
        return
    subset = prompts[:: max(1, len(prompts) // args.prompts)][:args.prompts]
    models = {}
    for spec in args.models:
        lm = load_model(spec)
        stats = {"row_steps": 0, "finished_row_steps": 0, "prompt_positions": 0, "real_prompt_tokens": 0}
        baseline_ids(lm, subset[:8], BASELINE_BATCH)  # warm-up
        arms = {"baseline": lambda chunk: baseline_ids(lm, chunk, BASELINE_BATCH, stats),
                "new": lambda chunk: new_ids(lm, chunk)}
        results = side_by_side(lm, subset, arms, chunks=2)
        same = [a == b for a, b in zip(results["baseline"]["ids"], results["new"]["ids"])]
        lengths = [len(r) for r in tokenize_prompts(lm, subset)]
        models[spec] = {
            "model": lm.model_id, "n_prompts": len(subset), "prompts_per_chunk": -(-len(subset) // 2),
            "auto_batch_size": auto_batch_size(
                lm, max(lengths) + NEW_TOKENS),
            **{k: summary(v) for k, v in results.items()},
            "ratio_new_over_baseline_tokens_per_s": round(
                results["baseline"]["seconds"] / results["new"]["seconds"]
                * sum(map(len, results["new"]["ids"])) / sum(map(len, results["baseline"]["ids"])), 2),
            "new_identical_to_baseline": round(sum(same) / len(same), 4),
            "baseline_waste": {"finished_row_steps_share": round(stats["finished_row_steps"] / stats["row_steps"], 3),
                               "padding_share_of_prefill": round(1 - stats["real_prompt_tokens"]
                                                                 / stats["prompt_positions"], 3)},
            "by_batch_size": batch_size_sweep(lm, prompts, args.batch_sizes),
        }
        print(json.dumps({k: v for k, v in models[spec].items() if k != "by_batch_size"}, indent=1), flush=True)
    previous = json.loads(path.read_text()) if path.exists() else {}  # keep a --full section
    write_result("generate", {**conventions, "models": models, "loadavg_end": os.getloadavg(),
                              **({"full": previous["full"]} if "full" in previous else {})})


if __name__ == "__main__":
    main()
