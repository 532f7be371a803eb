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


def write_result(name: str, result: dict) -> Path:
    result = {"benchmark": name, "machine": {"cpu_threads": torch.get_num_threads(),
                                             "platform": platform.platform()}, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
