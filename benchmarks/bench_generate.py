"""Generation throughput: today's ``model.generate`` batches against torsion's decode loop.

Both arms run in one process, interleaved chunk by chunk, on the quick profile's prompts
(donotanswer + harmbench, 128 each, seed 0) with its settings (greedy, 32 new tokens):

- ``baseline``: ``model.generate`` on batches of 8, shortest prompts first (the generation
  stage before this change);
- ``new``: :func:`torsion.generate.iter_generate_ids` with ``batch_size="auto"``.

Default mode (a few minutes): a prompt subset through both arms, plus where the time goes:
prefill per token and decode per step at batch sizes 1-64, the LM head's share, padding and
finished rows still decoded. ``--full`` (once; over an hour on 2 shared cores): all 256 prompts
through the baseline, the new path and the batch-of-one reference, the identical-output
share, and for each differing row the reference's top-2 logit margin where it diverges.
Writes ``benchmarks/results/generate.json`` (``--full`` adds a ``full`` section).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Sequence

import torch
from common import RESULTS, write_result

from torsion.capture import encode
from torsion.data.splits import build_prompt_set
from torsion.generate import (AUTO_BATCH_CAP, GenerationSettings, auto_batch_size, buckets, eos_token_ids,
                              iter_generate_ids, tokenize_prompts)
from torsion.models import LoadedModel, load_model

MODELS = ("embedded:qwen2.5-coder-0.5b", "embedded:smollm2-135m")
NEW_TOKENS, BASELINE_BATCH, SEED = 32, 8, 0
BATCH_SIZES = (1, 4, 16, 32, 64)
DECODE_STEPS = 4  # timed decode steps per batch size


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


@torch.inference_mode()
def where_time_goes(lm: LoadedModel, prompts: Sequence[str], batch_sizes: Sequence[int]) -> dict:
    """Prefill per token and decode per step at each batch size; the LM head's share of both."""
    rows = tokenize_prompts(lm, prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    head = lm.model.get_output_embeddings()
    out = {}
    for batch in batch_sizes:
        chosen = [prompts[i] for i in order[len(order) // 2 - batch // 2:][:batch]]  # median-length prompts
        inputs = encode(lm, chosen)
        tokens = int(inputs["attention_mask"].sum())
        start = time.perf_counter()
        output = lm.model(**inputs, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        lm.model(**inputs, use_cache=False)  # every position through the LM head, as without logits_to_keep
        prefill_all_logits = time.perf_counter() - start
        cache, steps = output.past_key_values, DECODE_STEPS
        mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(len(chosen), 1)], dim=1)
            positions = positions + 1
            logits = lm.model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        step = (time.perf_counter() - start) / steps
        hidden = torch.randn(len(chosen), 1, lm.d_model, dtype=lm.model.dtype)
        start = time.perf_counter()
        for _ in range(steps):
            head(hidden)
        head_s = (time.perf_counter() - start) / steps
        out[str(batch)] = {
            "prefill_tokens": tokens, "padded_positions": int(inputs["input_ids"].numel()) - tokens,
            "prefill_s_per_token": prefill / tokens, "prefill_tokens_per_s": round(tokens / prefill, 1),
            "prefill_all_logits_s_per_token": prefill_all_logits / tokens,
            "decode_step_s": step, "decode_tokens_per_s": round(len(chosen) / step, 1),
            "lm_head_s_per_step": head_s, "lm_head_share_of_step": round(head_s / step, 3),
        }
        print(batch, out[str(batch)], flush=True)
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
            "by_batch_size": where_time_goes(lm, prompts, args.batch_sizes),
        }
        print(json.dumps({k: v for k, v in models[spec].items() if k != "by_batch_size"}, indent=1), flush=True)
    previous = json.loads(path.read_text()) if path.exists() else {}  # keep a --full section
    write_result("generate", {**conventions, "models": models, "loadavg_end": os.getloadavg(),
                              **({"full": previous["full"]} if "full" in previous else {})})


if __name__ == "__main__":
    main()
