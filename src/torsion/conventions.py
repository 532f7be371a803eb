"""Names shared by every stage. See ``methods.md``: layer ``l`` means decoder block ``l``.

Hugging Face ``hidden_states[k]`` is the output of block ``k - 1``; torsion never uses that
indexing in its own files. Every block index a user passes goes through :func:`check_blocks`.
"""

from __future__ import annotations

from numbers import Integral
from typing import Iterable, Literal

from torsion.errors import TorsionError

Component = Literal["resid", "attn", "mlp"]
Position = Literal["last", "post_instruction"]

COMPONENTS: tuple[Component, ...] = ("resid", "attn", "mlp")
POSITIONS: tuple[Position, ...] = ("last", "post_instruction")
LAYER_INDEXING = "block"  # layer l = output of decoder block l, 0 <= l < n_layers


def check_blocks(blocks: int | Iterable[int], n_layers: int, *, what: str = "layer") -> list[int]:
    """Block indices checked against a model (or vector) with ``n_layers`` blocks, in the order given.

    Negative indices are refused, never wrapped (``-1`` is not the last block, and a replay from
    it would steer the embedding output). Bools and non-integers are refused too.

    Example::

        check_blocks([12, 18], lm.n_layers, what="--layers")   # -> [12, 18]

    Raises:
        TorsionError: one line naming the bad index, the valid range and the fix.
    """
    values = [blocks] if isinstance(blocks, Integral) else list(blocks)
    if not values:
        raise TorsionError(f"no {what} given; pass at least one block index in 0..{n_layers - 1}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TorsionError(f"{what} {value!r} is not a block index; pass integers in 0..{n_layers - 1}")
        if not 0 <= int(value) < n_layers:
            raise TorsionError(f"{what} {value} is out of range; this model has blocks 0..{n_layers - 1} "
                               "(layer l is decoder block l; negative indices are not wrapped)")
    return [int(value) for value in values]
