"""Helpers shared by the steering-method and manifold tests."""

from __future__ import annotations

import torch

PROMPTS = ["how do i bake bread", "tell me a story about the dragon"]


@torch.inference_mode()
def block_output(lm, inputs, layer: int, method=None, strength: float = 0.0) -> torch.Tensor:
    """Block ``layer``'s output ``[batch, seq, d]`` as downstream sees it (after any steering hook of
    ``method`` at ``strength``; unsteered when ``method`` is None)."""
    seen = {}
    handle = lm.layout.blocks[layer].register_forward_hook(
        lambda m, i, o: seen.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        if method is None:
            lm.model(**inputs)
        else:
            with method.apply(lm, strength):
                lm.model(**inputs)
    finally:
        handle.remove()
    return seen["h"].clone()
