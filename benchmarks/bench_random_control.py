"""Random-direction control: the naive loop, today's fast path (every position) and the last-position path.

Targets: the last-position path (``positions="last"``) is at least 10x faster than the fast path
that replays every prompt token (``positions="all"``), and each fast path gives the naive loop's
KLs to 1e-5. The arms compute the first-token KL, both directions, with the quick profile's
settings: the embedded Qwen model, its four back-half blocks (``back_half_layers``), the
pipeline's 102 directions per block (a stand-in steering step, its negative, 50 norm-matched
random directions and their negatives), the residual stream, on the first ``--n-prompts`` of a
seeded sample of the shipped neutral prompts drawn as ``run_random_control`` draws them (one
batch: 408 replayed rows per block, matmuls of hundreds of rows as in the pipeline's batches of
16; the cost per prompt hardly depends on the count, and the quick profile's 32 prompts through
the all-position arm would take over an hour on this shared machine):

- ``fast_all`` and ``fast_last``: :func:`~torsion.analysis.random_control.fast_kls`, each call
  timed with its base forward and its runtime self-checks. Both share the LM-head and KL code,
  so their ratio is the replay's alone;
- ``naive_all`` and ``naive_last``: :func:`~torsion.metrics.first_token_kl` per direction, on
  ``NAIVE_ROWS`` of the directions at two of the blocks (one direction costs two full forwards of
  the batch). Their KLs are the reference for the fast paths' KLs on the same directions.

Each fast arm runs under cProfile; the record splits its time into the replayed blocks, the LM
head with the KL terms, and the rest (the base forward and the checks). Everything runs in one
process, one arm after another; wall and process CPU time are both recorded (other work on a
shared machine inflates wall time; CPU time is steadier), with the load average before and after.

Usage: ``python benchmarks/bench_random_control.py [--n-prompts 16]`` (default 16, one pipeline batch,
so the per-batch costs weigh as they do in the pipeline; 4 takes a quarter of the time).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from typing import Callable

import torch
from common import write_result

from torsion.analysis.common import back_half_layers
from torsion.analysis.random_control import KL_DIRECTIONS, fast_kls, naive_kls, random_directions
from torsion.conventions import LAYER_INDEXING
from torsion.data import load_source, sample
from torsion.models import load_model

N_PROMPTS, N_RANDOM, APPLIED_NORM, SEED, BATCH = 16, 50, 8.0, 0, 16
NAIVE_ROWS = (0, 2, 2 + N_RANDOM)  # the steering step, the first random direction and its negative
COMPONENT = "resid"
KL_TOLERANCE = 1e-5
PARTS = {"replayed_blocks": "_replay_hidden", "lm_head_and_kl": "_steered_kls"}


def timed(fn: Callable[[], object], profile: bool = False) -> dict[str, float]:
    """Wall and process CPU seconds of one call; with ``profile``, the cumulative wall seconds of ``PARTS``."""
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    fn()
    if profiler:
        profiler.disable()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    if profiler:
        stats = pstats.Stats(profiler).stats
        for part, function in PARTS.items():
            out[f"{part}_wall_s"] = sum(entry[3] for (_, _, name), entry in stats.items() if name == function)
        out["rest_wall_s"] = out["wall_s"] - sum(out[f"{part}_wall_s"] for part in PARTS)
    return out


def main(n_prompts: int = N_PROMPTS) -> None:
    load_before = os.getloadavg()
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    prompts = [p.prompt for p in sample(load_source("neutral"), 32, seed=SEED)][:n_prompts]
    layers = back_half_layers(lm.n_layers)
    naive_layers = [layers[0], layers[-1]]  # the most blocks to replay, and none
    axis = random_directions(lm.d_model, 1, APPLIED_NORM, seed=SEED + 1)  # a stand-in steering step
    randoms = random_directions(lm.d_model, N_RANDOM, APPLIED_NORM, seed=SEED)
    steps = torch.cat([axis, -axis, randoms, -randoms])  # [2 + 2 N_RANDOM, d_model], as random_control orders them
    kls: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def fast(positions: str, name: str, on: list[str]) -> Callable[[], None]:
        def run() -> None:
            result, gaps = fast_kls(lm, on, {layer: steps for layer in layers}, component=COMPONENT,
                                    positions=positions, batch_size=BATCH)
            assert result, f"the {positions} fast path fell back: {gaps}"
            kls[name] = result
        return run

    def naive(positions: str) -> None:
        kls[f"naive_{positions}"] = {layer: naive_kls(lm, prompts, layer, steps[list(NAIVE_ROWS)],
                                                      component=COMPONENT, positions=positions, batch_size=BATCH)
                                     for layer in naive_layers}

    fast_kls(lm, prompts[:2], {layers[0]: steps[:2]}, batch_size=BATCH, positions="last")  # warm-up
    times = {"fast_all": timed(fast("all", "fast_all", prompts), profile=True),
             "fast_last": timed(fast("last", "fast_last", prompts), profile=True)}
    for positions in ("all", "last"):
        times[f"naive_{positions}"] = timed(lambda: naive(positions))
    agreement = {}
    for positions in ("all", "last"):
        fast_values = torch.cat([kls[f"fast_{positions}"][layer][name][list(NAIVE_ROWS)]
                                 for layer in naive_layers for name in KL_DIRECTIONS])
        naive_values = torch.cat([kls[f"naive_{positions}"][layer][name]
                                  for layer in naive_layers for name in KL_DIRECTIONS])
        difference = (fast_values - naive_values).abs()
        agreement[positions] = {"n_kls": len(naive_values), "max_abs_kl_difference": float(difference.max()),
                                "max_rel_kl_difference": float((difference / naive_values).max()),
                                "smallest_kl": float(naive_values.min()), "largest_kl": float(naive_values.max()),
                                "equal_to_tolerance": bool(difference.max() <= KL_TOLERANCE)}
    units = {"fast_all": n_prompts * len(layers) * len(steps), "fast_last": n_prompts * len(layers) * len(steps),
             "naive_all": n_prompts * len(naive_layers) * len(NAIVE_ROWS),
             "naive_last": n_prompts * len(naive_layers) * len(NAIVE_ROWS)}
    per_unit = {name: {key: value / units[name] for key, value in measured.items() if key in ("wall_s", "cpu_s")}
                for name, measured in times.items()}

    def ratio(slow: str, quick: str) -> dict[str, float]:
        return {key: round(per_unit[slow][key] / per_unit[quick][key], 2) for key in ("wall_s", "cpu_s")}

    write_result("random_control", {
        "model": lm.model_id, "n_prompts": n_prompts,
        "prompts": f"seeded sample (seed {SEED}) of the shipped neutral set, as run_random_control draws it; "
                   f"the first {n_prompts}",
        "batch_size": BATCH, "layers": layers, "naive_layers": naive_layers, "layer_indexing": LAYER_INDEXING,
        "component": COMPONENT, "applied_norm": APPLIED_NORM, "seed": SEED,
        "kl": "first token, kl_base_to_steered and kl_steered_to_base",
        "directions": {"fast": len(steps), "naive": len(NAIVE_ROWS),
                       "which": "fast: a stand-in steering step, its negative, 50 random directions and their "
                                "negatives; naive: the steering step, the first random direction and its negative"},
        "arms": {"fast_all": "every prompt token replayed from the block on (positions='all')",
                 "fast_last": "the final prompt token replayed on the prefix's KV cache (positions='last')",
                 "naive_all": "first_token_kl per direction, steering every prompt token",
                 "naive_last": "first_token_kl per direction, steering the final prompt token"},
        "seconds": {name: {key: round(value, 2) for key, value in measured.items()}
                    for name, measured in times.items()},
        "unit": "one (prompt, block, direction)",
        "seconds_per_unit": {name: {key: round(value, 6) for key, value in measured.items()}
                             for name, measured in per_unit.items()},
        "speedup_fast_last_over_fast_all": ratio("fast_all", "fast_last"),
        "speedup_fast_all_over_naive_all": ratio("naive_all", "fast_all"),
        "speedup_fast_last_over_naive_last": ratio("naive_last", "fast_last"),
        "target_speedup_fast_last_over_fast_all": 10.0,
        "kl_agreement_with_naive": agreement, "kl_tolerance": KL_TOLERANCE,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]},
    })


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=N_PROMPTS, help=f"neutral prompts (default {N_PROMPTS})")
    n_prompts = parser.parse_args().n_prompts
    if not 1 <= n_prompts <= 32:
        parser.error(f"--n-prompts {n_prompts}: pass 1 to 32 (the seeded sample holds 32 prompts)")
    main(n_prompts)
