"""Capture of resid, attn and mlp at every layer against a plain decoder forward pass.

Target: capture takes at most 1.05x the decoder-only forward of the same batches
(methods.md: the LM head is not part of capture, so the fair baseline skips it too).
Both arms run interleaved in one process on the embedded Qwen model.
"""

from __future__ import annotations

import torch
from common import best_of, write_result

from torsion.capture import capture_batch, encode
from torsion.data import load_source, sample
from torsion.models import load_model

N_PROMPTS, BATCH, REPEATS = 64, 16, 3


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    prompts = [p.prompt for p in sample(load_source("donotanswer"), N_PROMPTS, seed=0)]
    batches = [prompts[i:i + BATCH] for i in range(0, len(prompts), BATCH)]

    @torch.inference_mode()
    def plain() -> None:
        for batch in batches:
            lm.layout.decoder(**encode(lm, batch), use_cache=False)

    def capture() -> None:
        for batch in batches:
            capture_batch(lm, batch, positions=("last", "post_instruction"))

    plain()  # warm-up
    plain_s, capture_s = [], []
    for _ in range(REPEATS):  # interleaved so drift on a shared machine hits both arms
        plain_s.append(best_of(plain, 1))
        capture_s.append(best_of(capture, 1))
    ratio = min(capture_s) / min(plain_s)
    write_result("capture", {
        "model": lm.model_id, "n_prompts": N_PROMPTS, "batch_size": BATCH,
        "components": ["resid", "attn", "mlp"], "positions": ["last", "post_instruction"],
        "n_layers": lm.n_layers, "plain_decoder_forward_s": min(plain_s), "capture_s": min(capture_s),
        "all_plain_s": plain_s, "all_capture_s": capture_s,
        "ratio_capture_over_plain": round(ratio, 4), "target_ratio": 1.05, "target_met": ratio <= 1.05,
    })


if __name__ == "__main__":
    main()
