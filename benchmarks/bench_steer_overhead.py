"""Steered greedy generation against unsteered generation of the same batches.

Target: steering 4 layers at the last position costs at most 1.03x plain generation.
Both arms run the same generation loop, interleaved, in one process on the embedded Qwen
model; both are forced to produce exactly ``NEW_TOKENS`` tokens so they do the same work.
"""

from __future__ import annotations

import torch
from common import best_of, write_result

from torsion.capture import encode
from torsion.models import load_model
from torsion.steer import add_steering

N_PROMPTS, BATCH, NEW_TOKENS, REPEATS, SEED = 16, 8, 32, 3, 0
LAYERS, APPLIED_NORM = [8, 10, 12, 14], 4.0
PROMPTS = [
    "How do I bake sourdough bread at home?", "Explain why the sky is blue.",
    "Write a haiku about autumn leaves.", "What is the capital of Australia?",
    "Summarise the plot of Hamlet in three sentences.", "How does a binary search work?",
    "Give me three tips for a job interview.", "What causes ocean tides?",
    "Translate 'good morning' into French and Spanish.", "Why do cats purr?",
    "Describe how a bicycle gear system works.", "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small coffee shop.", "How many planets are in the solar system?",
    "Explain photosynthesis to a ten-year-old.", "Write a short thank-you note to a teacher.",
]


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    batches = [PROMPTS[i:i + BATCH] for i in range(0, N_PROMPTS, BATCH)]
    generator = torch.Generator().manual_seed(SEED)
    directions = torch.nn.functional.normalize(torch.randn(lm.n_layers, lm.d_model, generator=generator), dim=1)

    @torch.inference_mode()
    def generate() -> None:
        for batch in batches:
            inputs = encode(lm, batch)
            inputs.pop("position_ids")
            lm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id)

    def steered() -> None:
        with add_steering(lm, directions, layers=LAYERS, alpha=APPLIED_NORM, positions="last") as record:
            generate()
        assert record.additions == [len(batches) * NEW_TOKENS] * len(LAYERS)  # prefill + 31 steps per batch

    generate()  # warm-up
    plain_s, steered_s = [], []
    for _ in range(REPEATS):  # interleaved so drift on a shared machine hits both arms
        plain_s.append(best_of(generate, 1))
        steered_s.append(best_of(steered, 1))
    ratio = min(steered_s) / min(plain_s)
    write_result("steer_overhead", {
        "model": lm.model_id, "n_prompts": N_PROMPTS, "batch_size": BATCH, "new_tokens": NEW_TOKENS,
        "decoding": "greedy", "layers": LAYERS, "layer_indexing": "block", "component": "resid",
        "positions": "last", "phase": "both", "alpha": APPLIED_NORM, "applied_norm": APPLIED_NORM,
        "direction": "random unit per layer", "seed": SEED, "repeats": REPEATS,
        "plain_generate_s": min(plain_s), "steered_generate_s": min(steered_s),
        "all_plain_s": plain_s, "all_steered_s": steered_s,
        "ratio_steered_over_plain": round(ratio, 4), "target_ratio": 1.03, "target_met": ratio <= 1.03,
    })


if __name__ == "__main__":
    main()
