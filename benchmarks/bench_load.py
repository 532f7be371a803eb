"""Loading the embedded Qwen model from torsion's safetensors cache against the GGUF itself.

Target: the cached load takes at most 5 s. Both loads run in this one process.
"""

from __future__ import annotations

import time

import torch
from common import write_result
from transformers import AutoModelForCausalLM

from torsion import assets
from torsion.models import load_model

NAME = "qwen2.5-coder-0.5b"


def main() -> None:
    gguf = assets.gguf_path(NAME)
    start = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_s = time.perf_counter() - start
    start = time.perf_counter()
    lm = load_model(f"embedded:{NAME}")
    cached_s = time.perf_counter() - start
    cached_state = lm.model.state_dict()
    same = all(torch.equal(t, cached_state[k]) for k, t in reference.state_dict().items())
    write_result("load", {
        "model": f"embedded:{NAME}", "gguf_load_s": round(gguf_s, 3), "cached_load_s": round(cached_s, 3),
        "speedup": round(gguf_s / cached_s, 2), "weights_identical": same,
        "target_cached_s": 5.0, "target_met": cached_s <= 5.0,
    })


if __name__ == "__main__":
    main()
