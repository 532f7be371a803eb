"""Steered greedy generation against unsteered generation of the same batches.

Target: steering 4 layers at the last position costs at most 1.03x plain generation.
Both arms run the same generation loop, interleaved, in one process on the embedded Qwen
model; both are forced to produce exactly ``NEW_TOKENS`` tokens so they do the same work.
"""

from __future__ import annotations

import torch
from common import NEUTRAL_PROMPTS, forced_generation, interleaved, write_result

from torsion.models import load_model
from torsion.steer import add_steering

N_PROMPTS, BATCH, NEW_TOKENS, REPEATS, SEED = 16, 8, 32, 3, 0
LAYERS, APPLIED_NORM = [8, 10, 12, 14], 4.0
PROMPTS = NEUTRAL_PROMPTS


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    batches = [PROMPTS[i:i + BATCH] for i in range(0, N_PROMPTS, BATCH)]
    generator = torch.Generator().manual_seed(SEED)
    directions = torch.nn.functional.normalize(torch.randn(lm.n_layers, lm.d_model, generator=generator), dim=1)
    generate = forced_generation(lm, batches, NEW_TOKENS)

    def steered() -> None:
        with add_steering(lm, directions, layers=LAYERS, alpha=APPLIED_NORM, positions="last") as record:
            generate()
        assert record.additions == [len(batches) * NEW_TOKENS] * len(LAYERS)  # prefill + 31 steps per batch

    plain_s, steered_s, load = interleaved(generate, steered, REPEATS)
    ratio = min(steered_s) / min(plain_s)
    write_result("steer_overhead", {
        "model": lm.model_id, "n_prompts": N_PROMPTS, "batch_size": BATCH, "new_tokens": NEW_TOKENS,
        "decoding": "greedy", "layers": LAYERS, "layer_indexing": "block", "component": "resid",
        "positions": "last", "phase": "both", "alpha": APPLIED_NORM, "applied_norm": APPLIED_NORM,
        "direction": "random unit per layer", "seed": SEED, "repeats": REPEATS,
        "plain_generate_s": min(plain_s), "steered_generate_s": min(steered_s),
        "all_plain_s": plain_s, "all_steered_s": steered_s, "loadavg_1_5_15": load,
        "ratio_steered_over_plain": round(ratio, 4), "target_ratio": 1.03, "target_met": ratio <= 1.03,
    })


if __name__ == "__main__":
    main()
