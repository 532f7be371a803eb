"""Shared bits of the benchmark scripts: neutral prompts, timing, and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).parent / "results"
NEUTRAL_PROMPTS = [
    "How do I bake sourdough bread at home?", "Explain why the sky is blue.",
    "Write a haiku about autumn leaves.", "What is the capital of Australia?",
    "Summarise the plot of Hamlet in three sentences.", "How does a binary search work?",
    "Give me three tips for a job interview.", "What causes ocean tides?",
    "Translate 'good morning' into French and Spanish.", "Why do cats purr?",
    "Describe how a bicycle gear system works.", "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small coffee shop.", "How many planets are in the solar system?",
    "Explain photosynthesis to a ten-year-old.", "Write a short thank-you note to a teacher.",
]


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls (the least noisy estimate on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def forced_generation(lm, batches: Sequence[Sequence[str]], new_tokens: int) -> Callable[[], None]:
    """A function that greedily generates every batch with exactly ``new_tokens`` new tokens each
    (so a steered and a plain arm do the same work)."""
    from torsion.capture import encode

    @torch.inference_mode()
    def generate() -> None:
        for batch in batches:
            inputs = encode(lm, list(batch))
            inputs.pop("position_ids")
            lm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id)

    return generate


def interleaved(plain: Callable[[], object], steered: Callable[[], object],
                repeats: int) -> tuple[list[float], list[float], list[tuple[float, float, float]]]:
    """Wall times of ``repeats`` alternating plain and steered calls (so drift on a shared machine hits
    both arms), after one plain warm-up, with ``os.getloadavg()`` before and after each pair."""
    plain()  # warm-up
    plain_s, steered_s, load = [], [], [os.getloadavg()]
    for _ in range(repeats):
        plain_s.append(best_of(plain, 1))
        steered_s.append(best_of(steered, 1))
        load.append(os.getloadavg())
    return plain_s, steered_s, load


def paired_runs(plain: Callable[[], object], steered: Callable[[], object], pairs: int) -> dict[str, object]:
    """``pairs`` plain/steered pairs in one process, the order alternating (ABBA: plain first in even
    pairs, steered first in odd ones) so drift and warm-up hit both arms alike, after one warm-up call
    of each. Per call: wall seconds and this process's CPU seconds (``time.process_time``, which a
    loaded machine inflates far less than wall time). Returns the lists, the median of the per-pair
    ratios (steered / plain) for both clocks, the ratio of the minima, and ``os.getloadavg()`` per pair."""
    import statistics

    plain()
    steered()
    times: dict[str, dict[str, list[float]]] = {arm: {"wall": [], "cpu": []} for arm in ("plain", "steered")}
    load = [os.getloadavg()]
    for pair in range(pairs):
        order = (("plain", plain), ("steered", steered))
        for arm, fn in order if pair % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[arm]["cpu"].append(time.process_time() - cpu)
            times[arm]["wall"].append(time.perf_counter() - wall)
        load.append(os.getloadavg())
    ratios = {clock: [s / p for s, p in zip(times["steered"][clock], times["plain"][clock])] for clock in ("wall", "cpu")}
    return {"pairs": pairs, "order": "ABBA (plain first in even pairs)", "times_s": times,
            "median_pair_ratio_wall": statistics.median(ratios["wall"]),
            "median_pair_ratio_cpu": statistics.median(ratios["cpu"]),
            "ratio_of_minima_wall": min(times["steered"]["wall"]) / min(times["plain"]["wall"]),
            "pair_ratios_wall": ratios["wall"], "loadavg_1_5_15": load}


def write_result(name: str, result: dict) -> Path:
    result = {"benchmark": name, "machine": {"cpu_threads": torch.get_num_threads(),
                                             "platform": platform.platform()}, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
