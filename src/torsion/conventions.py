"""Names shared by every stage. See ``methods.md``: layer ``l`` means decoder block ``l``.

Hugging Face ``hidden_states[k]`` is the output of block ``k - 1``; torsion never uses that
indexing in its own files.
"""

from typing import Literal

Component = Literal["resid", "attn", "mlp"]
Position = Literal["last", "post_instruction"]

COMPONENTS: tuple[Component, ...] = ("resid", "attn", "mlp")
POSITIONS: tuple[Position, ...] = ("last", "post_instruction")
LAYER_INDEXING = "block"  # layer l = output of decoder block l, 0 <= l < n_layers
