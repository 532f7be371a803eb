"""The stability analysis (learning curves with fits, CIs and bin contamination) over a quick-run shape.

Input: ``activations.safetensors`` of ``$TORSION_BENCH_RUN``, else of a finished run under the
repository's ``runs/``, when one exists
(its train rows, every captured component), else synthetic activations of a quick run's shape,
``[256, 24, 896]`` for ``resid``, ``attn`` and ``mlp``, with the quick run's six categories and all
four behaviour bins populated; the JSON says which. 8 pool sizes, ``B = 200``, the default
reference (``split``: two disjoint subsamples per draw); the ``pool`` reference (methods.md's) is
timed too, beside it. Target: at most 60 s on this machine for the default. The baseline, in the
same process, is the naive loop over the same draws (index the rows, ``mean_difference``,
``angle_deg``) for the global MD vector of one component under the default reference, timed over
20 draws per size; the JSON reports the per-draw speed ratio against the vectorised path on that
same subset. Writes ``benchmarks/results/stability.json``.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import best_of, write_result

from torsion.analysis.learning_curve import centred_gram, reference_sizes, split_counts, subsample_angles
from torsion.analysis.stability import DEFAULT_REFERENCE, analyze_stability
from torsion.geometry import angle_deg
from torsion.judge.base import LABEL_SCORES
from torsion.vectors import mean_difference

N, LAYERS, D, B, NAIVE_B = 256, 24, 896, 200, 20
CATEGORIES = {"harmbench": 0.5, "information_hazard": 0.13, "malicious_uses": 0.13, "discrimination": 0.09,
              "misinformation_harms": 0.09, "human_chatbox": 0.06}
BINS = {"strong_refuse": 0.45, "weak_refuse": 0.1, "weak_comply": 0.1, "strong_comply": 0.35}


def real_input() -> tuple[dict, list, list, list, str] | None:
    """A finished run's train rows, if one with activations and responses exists."""
    from torsion.capture import load_activations
    from torsion.runs import fit_rows, labelled_prompts
    from torsion.store import RunDir

    repo_runs = Path(__file__).resolve().parents[1] / "runs"
    given = os.environ.get("TORSION_BENCH_RUN")
    candidates = [str(Path(given) / "activations.safetensors")] if given else []
    for path in candidates + sorted(glob.glob(str(repo_runs / "*" / "activations.safetensors"))):
        if not Path(path).is_file():
            continue
        run = RunDir(Path(path).parent)
        try:
            prompts, responses = labelled_prompts(run)
        except Exception:  # an unfinished run: try the next
            continue
        rows = fit_rows(prompts, responses)
        activations, _ = load_activations(run.activations_path)
        return ({c: activations[c][rows] for c in ("resid", "attn", "mlp") if c in activations},
                [responses[i]["score"] for i in rows], [responses[i]["label"] for i in rows],
                [prompts[i].category for i in rows], f"real: {path}")
    return None


def synthetic_input() -> tuple[dict, list, list, list, str]:
    rng = np.random.default_rng(0)
    labels = list(rng.choice(list(BINS), size=N, p=list(BINS.values())))
    categories = list(rng.choice(list(CATEGORIES), size=N, p=list(CATEGORIES.values())))
    generator = torch.Generator().manual_seed(0)
    axis = torch.randn(LAYERS, D, generator=generator)
    sign = torch.tensor([LABEL_SCORES[label] for label in labels])
    activations = {c: torch.randn(N, LAYERS, D, generator=generator) + 0.3 * sign[:, None, None] * axis + 4.0
                   for c in ("resid", "attn", "mlp")}
    return activations, [LABEL_SCORES[label] for label in labels], labels, categories, "synthetic"


def naive_global(x: torch.Tensor, refused: list[int], complied: list[int], sizes: list[int], draws: int,
                 seed: int) -> torch.Tensor:
    """``[n_sizes, draws, n_layers]`` split-reference angles, one draw at a time, from ``subsample_angles``'s draws."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.tensor(refused), torch.tensor(complied)
    out = torch.zeros(len(sizes), draws, x.shape[1], dtype=torch.float64)
    for s, size in enumerate(sizes):
        n_first, n_second = split_counts(size, len(first), len(second))
        order_first = torch.argsort(torch.rand(draws, len(first), generator=generator, dtype=torch.float64), dim=1)
        order_second = torch.argsort(torch.rand(draws, len(second), generator=generator, dtype=torch.float64), dim=1)
        for b in range(draws):
            one = mean_difference(x[first[order_first[b, :n_first]]], x[second[order_second[b, :n_second]]])
            other = mean_difference(x[first[order_first[b, n_first:2 * n_first]]],
                                    x[second[order_second[b, n_second:2 * n_second]]])
            out[s, b] = angle_deg(one, other)
    return out


def main() -> None:
    activations, scores, labels, categories, source = real_input() or synthetic_input()
    analyze_stability({"resid": activations["resid"][:40, :2]}, scores[:40], labels[:40], categories[:40],
                      B=10, n_replicates=10)  # warm-up
    start = time.perf_counter()
    result = analyze_stability(activations, scores, labels, categories, B=B, seed=0)
    analysis_s = time.perf_counter() - start
    start = time.perf_counter()
    analyze_stability(activations, scores, labels, categories, B=B, seed=0, reference="pool")
    analysis_pool_s = time.perf_counter() - start

    x = activations["resid"]
    refused = [i for i, s in enumerate(scores) if s in (0.5, 1.0)]
    complied = [i for i, s in enumerate(scores) if s in (-0.5, -1.0)]
    sizes = reference_sizes(len(refused) + len(complied), DEFAULT_REFERENCE, m=5, n_sizes=8)
    vectorised_s = best_of(lambda: subsample_angles(centred_gram(x), refused, complied, sizes, B=B, seed=0,
                                                    reference=DEFAULT_REFERENCE), 2)
    start = time.perf_counter()
    naive = naive_global(x, refused, complied, sizes, NAIVE_B, seed=0)
    naive_s = time.perf_counter() - start
    same_draws = subsample_angles(centred_gram(x), refused, complied, sizes, B=NAIVE_B, seed=0,
                                  reference=DEFAULT_REFERENCE)
    n_entries = len(result["entries"])
    write_result("stability", {
        "input": source, "shape": [len(x), x.shape[1], x.shape[2]], "components": sorted(activations),
        "B": B, "n_sizes": len(sizes), "n_replicates": result["n_replicates"], "n_entries": n_entries,
        "kinds": sorted({f"{e['kind']}:{e['name']}" for e in result["entries"]}),
        "reference": result["parameters"]["reference"], "analysis_s": round(analysis_s, 3),
        "analysis_pool_reference_s": round(analysis_pool_s, 3),
        "subset": "global md, resid, all sizes (vectorised time includes its Gram matrix)",
        "vectorised_subset_s": round(vectorised_s, 3), "naive_subset_s_for_20_draws": round(naive_s, 3),
        "naive_over_vectorised_per_draw": round((naive_s / NAIVE_B) / (vectorised_s / B), 2),
        "max_gap_to_naive_deg": float((same_draws - naive).abs().max()),
        "target_s": 60.0, "target_met": analysis_s <= 60.0,
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    })


if __name__ == "__main__":
    main()
