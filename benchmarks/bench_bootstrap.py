"""The prompt bootstrap of the rotation angle: B = 1000 over 400 prompts × 24 layers × 896 dims.

Target: at most 3 s on this machine (random data, torch's default thread count). The baseline,
in the same process, is the naive loop over the same draws (index the activations, recompute
the MD vectors with ``mean_difference``, then the angles) timed over 50 resamples; the JSON
reports the per-resample speed ratio. Writes ``benchmarks/results/bootstrap.json``.
"""

from __future__ import annotations

import time

import torch
from common import best_of, write_result

from torsion.analysis.rotation import prompt_bootstrap
from torsion.geometry import adjacent_angles
from torsion.vectors import mean_difference

N, LAYERS, D, B, NAIVE_B = 400, 24, 896, 1000, 50


def naive(x: torch.Tensor, labels: torch.Tensor, draws: int, seed: int) -> list[float]:
    """Bootstrap mean angles one resample at a time, from the draws ``prompt_bootstrap`` makes."""
    generator = torch.Generator().manual_seed(seed)
    x_r, x_c = x[labels == 1], x[labels == 0]
    draws_r = torch.randint(0, len(x_r), (draws, len(x_r)), generator=generator)
    draws_c = torch.randint(0, len(x_c), (draws, len(x_c)), generator=generator)
    return [float(adjacent_angles(mean_difference(x_r[i_r], x_c[i_c])).mean()) for i_r, i_c in zip(draws_r, draws_c)]


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, LAYERS, D, generator=generator)
    labels = (torch.rand(N, generator=generator) < 0.5).long()
    prompt_bootstrap(x, labels, B=50, seed=0)  # warm-up
    vectorised_s = best_of(lambda: prompt_bootstrap(x, labels, B=B, seed=0), 3)
    start = time.perf_counter()
    naive_means = naive(x, labels, NAIVE_B, seed=0)
    naive_s = time.perf_counter() - start
    same_draws = prompt_bootstrap(x, labels, B=NAIVE_B, seed=0)["means_deg"]
    max_gap_deg = max(abs(a - b) for a, b in zip(same_draws, naive_means))
    per_resample_ratio = (naive_s / NAIVE_B) / (vectorised_s / B)
    write_result("bootstrap", {
        "shape": [N, LAYERS, D], "B": B, "vectorised_s": round(vectorised_s, 3),
        "naive_s_for_50": round(naive_s, 3), "naive_over_vectorised_per_resample": round(per_resample_ratio, 2),
        "max_gap_to_naive_deg": max_gap_deg,
        "target_s": 3.0, "target_met": vectorised_s <= 3.0,
    })


if __name__ == "__main__":
    main()
