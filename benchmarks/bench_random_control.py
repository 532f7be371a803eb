"""Random-direction control: the batched replay (fast path) against the naive ``first_token_kl`` loop.

Target: the fast path is at least 5x faster than the naive loop, with the same KLs.
Both arms compute the first-token KL, both directions, of 50 norm-matched random directions at
each of 4 back-half layers of the embedded Qwen model (24 layers), on the first 8 shipped
neutral prompts, steering the residual stream at all positions. They run in one process,
interleaved layer by layer so that load from other work on a shared machine hits both arms;
each fast-path timing includes its own base forward (the library shares one across layers).
"""

from __future__ import annotations

import torch
from common import best_of, write_result

from torsion.analysis.common import back_half_layers
from torsion.analysis.random_control import KL_DIRECTIONS, fast_kls, naive_kls, random_directions
from torsion.data import load_source
from torsion.models import load_model

N_PROMPTS, N_RANDOM, APPLIED_NORM, SEED, BATCH = 8, 50, 8.0, 0, 8
COMPONENT, POSITIONS = "resid", "all"


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    prompts = [p.prompt for p in load_source("neutral")][:N_PROMPTS]
    layers = back_half_layers(lm.n_layers)
    steps = random_directions(lm.d_model, N_RANDOM, APPLIED_NORM, seed=SEED)  # [N_RANDOM, d_model]
    fast_kl: dict[int, dict[str, torch.Tensor]] = {}
    naive_kl: dict[int, dict[str, torch.Tensor]] = {}
    fast_s: dict[int, float] = {}
    naive_s: dict[int, float] = {}

    def fast(layer: int) -> None:
        kls, _ = fast_kls(lm, prompts, {layer: steps}, component=COMPONENT, positions=POSITIONS, batch_size=BATCH)
        fast_kl[layer] = kls[layer]

    def naive(layer: int) -> None:
        naive_kl[layer] = naive_kls(lm, prompts, layer, steps, component=COMPONENT, positions=POSITIONS,
                                    batch_size=BATCH)

    fast_kls(lm, prompts, {layers[-1]: steps[:2]}, batch_size=BATCH)  # warm-up
    for layer in layers:
        fast_s[layer] = best_of(lambda: fast(layer), 1)
        naive_s[layer] = best_of(lambda: naive(layer), 1)
    differences = torch.cat([(fast_kl[layer][name] - naive_kl[layer][name]).abs()
                             for layer in layers for name in KL_DIRECTIONS])
    naive_values = torch.cat([naive_kl[layer][name] for layer in layers for name in KL_DIRECTIONS])
    total_fast, total_naive = sum(fast_s.values()), sum(naive_s.values())
    write_result("random_control", {
        "model": lm.model_id, "n_prompts": len(prompts), "prompts": "first 8 shipped neutral prompts",
        "batch_size": BATCH, "layers": layers, "layer_indexing": "block", "component": COMPONENT,
        "positions": POSITIONS, "n_directions_per_layer": N_RANDOM, "applied_norm": APPLIED_NORM, "seed": SEED,
        "kl": "first token, kl_base_to_steered and kl_steered_to_base", "repeats": 1,
        "fast_s": round(total_fast, 2), "naive_s": round(total_naive, 2),
        "speedup": round(total_naive / total_fast, 2), "target_speedup": 5.0,
        "per_layer_s": {str(layer): {"fast": round(fast_s[layer], 2), "naive": round(naive_s[layer], 2)}
                        for layer in layers},
        "max_abs_kl_difference": float(differences.max()),
        "max_rel_kl_difference": float((differences / naive_values).max()),
        "smallest_kl": float(naive_values.min()),
    })


if __name__ == "__main__":
    main()
