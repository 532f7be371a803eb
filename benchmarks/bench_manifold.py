"""Manifold steering: generation overhead of spline A, and the time to fit A and B for 24 blocks.

1. Generation with spline-A steering on 4 blocks (positions ``last``) against unsteered
   generation of the same batches, in one process on the embedded Qwen model: ``PAIRS`` pairs,
   the order alternating (``common.paired_runs``); both arms are forced to produce exactly
   ``NEW_TOKENS`` tokens. Target ≤ 1.05x, judged on the median per-pair ratio of this process's
   CPU time: with one torch thread that is the work each arm does, while wall time on a shared,
   oversubscribed machine mostly measures the scheduler (one run measured wall times of 8.8 to
   56 s for 5.5 s of CPU). The wall-time ratios (median of pairs, and of minima) and the hooks'
   own work, timed outside the model, are recorded beside it. The spline is fitted on this process's own
   activations of the prompts (labels assigned round-robin: the timing does not depend on what
   the knots mean).
2. Fitting spline A and spline B (with its leave-one-block-out table) for 24 blocks, k = 8,
   from activations shaped like a quick run. Target ≤ 10 s. It uses the real
   ``activations.safetensors`` of ``$TORSION_BENCH_RUN`` (default ``runs/quick`` in the repository) when
   that run has one, else synthetic activations of the same shape, and says which.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from common import NEUTRAL_PROMPTS, forced_generation, paired_runs, write_result

from torsion.capture import capture_batch
from torsion.judge.base import LABEL_SCORES
from torsion.manifold.build import fit_manifold
from torsion.manifold.knots import fit_knots, knots_from_run
from torsion.models import load_model
from torsion.steering.spline_a import SplineA
from torsion.store import RunDir

N_PROMPTS, BATCH, NEW_TOKENS, PAIRS, SEED = 4, 4, 16, 16, 0
LAYERS, K, T = [8, 10, 12, 14], 8, 0.8
FIT_BLOCKS, QUICK_SHAPE = 24, (190, 24, 896)  # fit rows of a quick run: train split, refused or complied
RUN = Path(os.environ.get("TORSION_BENCH_RUN", Path(__file__).resolve().parents[1] / "runs" / "quick"))
PROMPTS = NEUTRAL_PROMPTS
BINS = ("strong_refuse", "weak_refuse", "weak_comply", "strong_comply")


def _round_robin_knots(acts: torch.Tensor, m: int):
    labels = [BINS[i % len(BINS)] for i in range(acts.shape[0])]
    return fit_knots(acts, labels, [LABEL_SCORES[label] for label in labels], m=m)


def generation(lm) -> dict:
    acts = capture_batch(lm, PROMPTS, components=("resid",))["resid"]["last"]  # [16, n_layers, d]
    manifold, _ = fit_manifold(_round_robin_knots(acts, m=4), variant="a", layers=LAYERS, k=K,
                               meta={"model_id": lm.model_id, "weights_sha256": lm.weights_sha256})
    method = SplineA.from_manifold(manifold, LAYERS)
    generate = forced_generation(lm, [PROMPTS[i:i + BATCH] for i in range(0, N_PROMPTS, BATCH)], NEW_TOKENS)

    def steered() -> None:
        with method.apply(lm, T) as record:
            generate()
        assert record.steered_tokens == [len(PROMPTS[:N_PROMPTS]) * NEW_TOKENS] * len(LAYERS)

    runs = paired_runs(generate, steered, PAIRS)
    ratio = runs["median_pair_ratio_cpu"]
    plain_s = min(runs["times_s"]["plain"]["wall"])
    hook_s = _hook_seconds(lm, method)
    return {"hook_s_per_run": hook_s, "hook_share_of_plain": round(hook_s / plain_s, 5),
            "hook_note": "the spline-A hooks' own work for one run of every batch (per block and forward: "
                         "the subspace transform and the record's norm), timed outside the model; a load-"
                         "independent bound on the overhead, beside the wall-time ratio",
            "model": lm.model_id, "n_prompts": N_PROMPTS, "batch_size": BATCH, "new_tokens": NEW_TOKENS,
            "decoding": "greedy", "layers": LAYERS, "layer_indexing": "block", "k": K, "t": T, "beta": 1.0,
            "positions": "last", "plain_generate_s": plain_s,
            "steered_generate_s": min(runs["times_s"]["steered"]["wall"]), **runs,
            "ratio_steered_over_plain": round(ratio, 4),
            "ratio_steered_over_plain_wall": round(runs["median_pair_ratio_wall"], 4),
            "ratio_is": "median over pairs of steered / plain process CPU time (one torch thread)",
            "target_ratio": 1.05,
            "target_met": ratio <= 1.05}


def _hook_seconds(lm, method: SplineA, loops: int = 20) -> float:
    """Seconds of hook work for one run: ``N_PROMPTS / BATCH`` batches x ``NEW_TOKENS`` forwards x 4 blocks."""
    from torsion.steering.hooks import subspace_target

    targets = method.targets(T)
    record_like = torch.zeros(())
    transforms = [subspace_target(method.basis[i], method.mean[i], targets[i], 1.0, lm.device)
                  for i in range(len(LAYERS))]
    hidden = torch.randn(BATCH, 1, lm.d_model)  # one decoding step: the new token of every prompt
    calls = (N_PROMPTS // BATCH) * NEW_TOKENS
    start = time.perf_counter()
    for _ in range(loops):
        for _ in range(calls):
            for transform in transforms:
                _, delta = transform(hidden)
                record_like = record_like + torch.linalg.vector_norm(delta, dim=-1).sum()
    return (time.perf_counter() - start) / loops


def fitting() -> dict:
    source = "synthetic"
    if (RUN / "activations.safetensors").is_file():
        start = time.perf_counter()
        knots = knots_from_run(RunDir(RUN), m=5)
        knots_s = time.perf_counter() - start
        source = f"real: {RUN}/activations.safetensors"
    else:
        acts = torch.randn(*QUICK_SHAPE, generator=torch.Generator().manual_seed(SEED))
        start = time.perf_counter()
        knots = _round_robin_knots(acts, m=5)
        knots_s = time.perf_counter() - start
    n_rows, n_layers, d = knots.rows.shape
    blocks = list(range(min(FIT_BLOCKS, n_layers)))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        _, table = fit_manifold(knots, variant="both", layers=blocks, k=K)
        times.append(time.perf_counter() - start)
    fit_s = min(times)
    return {"activations": source, "rows": n_rows, "n_layers": n_layers, "d_model": d, "blocks": len(blocks),
            "k": K, "n_knots": len(knots.bins), "knots_s": knots_s, "fit_a_b_loo_s": fit_s, "all_fit_s": times,
            "includes": "PCA + spline per block (A), shared PCA + thin-plate surface (B), "
                        "leave-one-block-out table (one B refit per block)",
            "target_s": 10.0, "target_met": fit_s <= 10.0, "loadavg_1_5_15": os.getloadavg()}


def main() -> None:
    # One intra-op thread: on a shared, oversubscribed CPU, two OpenMP threads made a 190 x 896
    # eigensolve ~1000x slower (spin-waiting); the setting is recorded in the result.
    torch.set_num_threads(int(os.environ.get("TORSION_BENCH_THREADS", "1")))
    fit = fitting()
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    write_result("manifold", {"torch_threads": torch.get_num_threads(), "generation": generation(lm), "fit": fit})


if __name__ == "__main__":
    main()
