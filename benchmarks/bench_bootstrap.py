"""The prompt bootstrap of the rotation angle: B = 1000 over 400 prompts × 24 layers × 896 dims.

Target: at most 3 s on this machine. The baseline, in the same process, is the naive loop
(index the activations, recompute the MD vectors, then the angles) timed over 50 resamples;
the JSON reports the per-resample speed ratio.
"""

from __future__ import annotations

import time

import torch
from common import best_of, write_result

from torsion.analysis.rotation import prompt_bootstrap
from torsion.geometry import adjacent_angles
from torsion.vectors import mean_difference

N, LAYERS, D, B, NAIVE_B = 400, 24, 896, 1000, 50


def naive(x: torch.Tensor, refused: torch.Tensor, draws: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    x_r, x_c = x[refused], x[~refused]
    means = []
    for _ in range(draws):
        i_r = torch.randint(0, len(x_r), (len(x_r),), generator=generator)
        i_c = torch.randint(0, len(x_c), (len(x_c),), generator=generator)
        means.append(float(adjacent_angles(mean_difference(x_r[i_r], x_c[i_c])).mean()))
    return means


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, LAYERS, D, generator=generator)
    refused = torch.rand(N, generator=generator) < 0.5
    prompt_bootstrap(x, refused, B=50, seed=0)  # warm-up
    vectorised_s = best_of(lambda: prompt_bootstrap(x, refused, B=B, seed=0), 3)
    start = time.perf_counter()
    naive(x, refused, NAIVE_B, seed=0)
    naive_s = time.perf_counter() - start
    per_resample_ratio = (naive_s / NAIVE_B) / (vectorised_s / B)
    write_result("bootstrap", {
        "shape": [N, LAYERS, D], "B": B, "vectorised_s": round(vectorised_s, 3),
        "naive_s_for_50": round(naive_s, 3), "naive_over_vectorised_per_resample": round(per_resample_ratio, 2),
        "target_s": 3.0, "target_met": vectorised_s <= 3.0,
    })


if __name__ == "__main__":
    main()
