"""Shared bits of the benchmark scripts: timing and the JSON result file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls (the least noisy estimate on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_result(name: str, result: dict) -> Path:
    result = {"benchmark": name, "machine": {"cpu_threads": torch.get_num_threads(),
                                             "platform": platform.platform()}, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
