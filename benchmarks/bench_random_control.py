"""Random-direction control: the naive loop, today's fast path (every position) and the last-position path.

Targets: the last-position path (``positions="last"``) is at least 10x faster than today's fast
path (``positions="all"``, which replays every prompt token), and each fast path gives the naive
loop's KLs to 1e-5. The arms compute the first-token KL, both directions, at block 12 of the
embedded Qwen model (the first of the pipeline's four back-half blocks, the one with the most
blocks to replay) on the first 4 shipped neutral prompts, steering the residual stream:

- ``fast_all`` and ``fast_last``: the pipeline's 102 directions per block (the steering step,
  its negative, 50 norm-matched random directions and their negatives), each call timed with
  its own base forward and its runtime self-checks;
- ``naive_all`` and ``naive_last``: :func:`~torsion.metrics.first_token_kl` per direction, on
  the first ``N_NAIVE`` of those directions only (one direction costs two full forwards; all
  102 would take most of an hour on this machine). Their KLs are the reference for the fast
  paths' KLs on the same directions, and their time per direction is reported as measured.

Everything runs in one process, one arm after another. Wall time and process CPU time are both
recorded (on a shared machine other work inflates wall time; CPU time is steadier), with the
load average before and after.

Usage: ``python benchmarks/bench_random_control.py``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
from common import write_result

from torsion.analysis.common import back_half_layers
from torsion.analysis.random_control import KL_DIRECTIONS, fast_kls, naive_kls, random_directions
from torsion.conventions import LAYER_INDEXING
from torsion.data import load_source
from torsion.models import load_model

N_PROMPTS, N_RANDOM, N_NAIVE, APPLIED_NORM, SEED, BATCH = 4, 50, 6, 8.0, 0, 4
COMPONENT = "resid"
KL_TOLERANCE = 1e-5


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main() -> None:
    load_before = os.getloadavg()
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    prompts = [p.prompt for p in load_source("neutral")][:N_PROMPTS]
    layer = back_half_layers(lm.n_layers)[0]
    axis = random_directions(lm.d_model, 1, APPLIED_NORM, seed=SEED + 1)  # a stand-in steering step
    randoms = random_directions(lm.d_model, N_RANDOM, APPLIED_NORM, seed=SEED)
    steps = torch.cat([axis, -axis, randoms, -randoms])  # [2 + 2 N_RANDOM, d_model], as random_control orders them
    naive_steps = torch.cat([steps[:N_NAIVE // 2], steps[2 + N_RANDOM:2 + N_RANDOM + N_NAIVE // 2]])
    kls: dict[str, dict[str, torch.Tensor]] = {}

    def fast(positions: str) -> None:
        result, gaps = fast_kls(lm, prompts, {layer: steps}, component=COMPONENT, positions=positions,
                                batch_size=BATCH)
        assert result, f"the {positions} fast path fell back: {gaps}"
        kls[f"fast_{positions}"] = result[layer]

    def naive(positions: str) -> None:
        kls[f"naive_{positions}"] = naive_kls(lm, prompts, layer, naive_steps, component=COMPONENT,
                                              positions=positions, batch_size=BATCH)

    fast_kls(lm, prompts, {layer: steps[:2]}, batch_size=BATCH, positions="last")  # warm-up
    times = {}
    for positions in ("all", "last"):
        times[f"fast_{positions}"] = timed(lambda: fast(positions))
    for positions in ("all", "last"):
        times[f"naive_{positions}"] = timed(lambda: naive(positions))
    naive_rows = torch.cat([torch.arange(N_NAIVE // 2), 2 + N_RANDOM + torch.arange(N_NAIVE // 2)])
    agreement = {}
    for positions in ("all", "last"):
        fast_values = torch.cat([kls[f"fast_{positions}"][name][naive_rows] for name in KL_DIRECTIONS])
        naive_values = torch.cat([kls[f"naive_{positions}"][name] for name in KL_DIRECTIONS])
        difference = (fast_values - naive_values).abs()
        agreement[positions] = {"max_abs_kl_difference": float(difference.max()),
                                "max_rel_kl_difference": float((difference / naive_values).max()),
                                "smallest_kl": float(naive_values.min()), "largest_kl": float(naive_values.max()),
                                "equal_to_tolerance": bool(difference.max() <= KL_TOLERANCE)}
    per_direction = {name: {key: value / (N_NAIVE if name.startswith("naive") else len(steps))
                            for key, value in measured.items()} for name, measured in times.items()}
    write_result("random_control", {
        "model": lm.model_id, "n_prompts": len(prompts), "prompts": f"first {N_PROMPTS} shipped neutral prompts",
        "batch_size": BATCH, "layer": layer, "layer_indexing": LAYER_INDEXING, "component": COMPONENT,
        "applied_norm": APPLIED_NORM, "seed": SEED, "kl": "first token, kl_base_to_steered and kl_steered_to_base",
        "directions": {"fast": len(steps), "naive": N_NAIVE,
                       "which": "fast: a stand-in steering step, its negative, 50 random directions and their "
                                "negatives; naive: the first 3 of those and the first 3 negated random ones"},
        "arms": {"fast_all": "today's fast path: every prompt token replayed from the block on (positions='all')",
                 "fast_last": "the final prompt token replayed on the prefix's KV cache (positions='last')",
                 "naive_all": "first_token_kl per direction, steering every prompt token",
                 "naive_last": "first_token_kl per direction, steering the final prompt token"},
        "seconds": {name: {key: round(value, 2) for key, value in measured.items()}
                    for name, measured in times.items()},
        "seconds_per_direction": {name: {key: round(value, 4) for key, value in measured.items()}
                                  for name, measured in per_direction.items()},
        "speedup_fast_last_over_fast_all": {key: round(times["fast_all"][key] / times["fast_last"][key], 2)
                                            for key in ("wall_s", "cpu_s")},
        "speedup_per_direction_fast_all_over_naive_all": {
            key: round(per_direction["naive_all"][key] / per_direction["fast_all"][key], 2)
            for key in ("wall_s", "cpu_s")},
        "speedup_per_direction_fast_last_over_naive_last": {
            key: round(per_direction["naive_last"][key] / per_direction["fast_last"][key], 2)
            for key in ("wall_s", "cpu_s")},
        "target_speedup_fast_last_over_fast_all": 10.0,
        "kl_agreement_with_naive": agreement, "kl_tolerance": KL_TOLERANCE,
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]},
    })


if __name__ == "__main__":
    main()
