"""``RUN_DIR/manifold.safetensors``: the fitted splines, read with safetensors only (no pickle).

Tensors (float32; ``<block>`` is a decoder block index, layer ``l`` = block ``l``):

- spline A, per fitted block: ``a/<block>/basis`` ``[k, d]``, ``a/<block>/mean`` ``[d]``,
  ``a/<block>/knots`` ``[n_knots, k]`` (knot centroids in that block's PCA coordinates),
  ``a/<block>/knots_t`` ``[n_knots]``;
- spline B: ``b/basis`` ``[k, d]`` (shared by every block), ``b/knots_t`` ``[n_knots]``, and
  per fitted block ``b/<block>/mean`` ``[d]``, ``b/<block>/knots`` ``[n_knots, k]``.

``__metadata__``: ``format`` = ``torsion.manifold/1`` and ``manifold``, a JSON object with
``model_id``, ``weights_sha256``, ``d_model``, ``n_layers``, ``component``, ``layer_indexing``,
``k``, ``m``, ``smoothing``, ``variants``, ``knots`` (kept bins with ``t`` and ``n``; dropped
bins with their counts and reason), ``stability`` (what ``analysis/stability.json`` flagged
structural and what was dropped or made soft), ``knot_weights`` (null or one smoothing weight
per kept knot), ``coherence`` (``null``, or the endpoint sweep with
``last_coherent_t`` ``{"low", "high"}``), the run directory and ``torsion_version``. The
splines themselves are refitted from the knots on load (deterministic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from torsion.errors import TorsionError
from torsion.manifold.fit import BlockCurve, Surface
from torsion.store import atomic_write_bytes

FORMAT = "torsion.manifold/1"


@dataclass(frozen=True, eq=False)
class Manifold:
    """Fitted spline A blocks (``a``), spline B surface (``b``) and the file's metadata (``meta``)."""

    a: dict[int, BlockCurve] = field(default_factory=dict)
    b: Surface | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def t_range(self) -> tuple[float, float]:
        """The coherent ``t`` range: the endpoint sweep's last coherent ``t`` per side, else the outer knots."""
        coherence = self.meta.get("coherence") or {}
        last = coherence.get("last_coherent_t") or {}
        bins = [b["t"] for b in self.meta.get("knots", {}).get("bins", [])]
        low = last.get("low", min(bins) if bins else 0.0)
        high = last.get("high", max(bins) if bins else 1.0)
        return float(low), float(high)

    def with_coherence(self, coherence: dict[str, Any]) -> Manifold:
        return replace(self, meta={**self.meta, "coherence": coherence})


def save_manifold(path: str | Path, manifold: Manifold) -> Path:
    """Write ``manifold`` atomically; returns the path."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, fit in manifold.a.items():
        tensors.update({f"a/{layer}/basis": fit.basis, f"a/{layer}/mean": fit.mean, f"a/{layer}/knots": fit.knots,
                        f"a/{layer}/knots_t": fit.knots_t})
    if manifold.b is not None:
        surface = manifold.b
        tensors.update({"b/basis": surface.basis, "b/knots_t": surface.knots_t})
        for index, layer in enumerate(surface.layers):
            tensors[f"b/{layer}/mean"] = surface.means[index]
            tensors[f"b/{layer}/knots"] = surface.knots[index]
    if not tensors:
        raise TorsionError("nothing to save: the manifold has neither spline A nor spline B; fit one first")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "manifold": json.dumps(manifold.meta, sort_keys=True)}
    path = Path(path)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
    return path


def load_manifold(path: str | Path) -> Manifold:
    """Read a manifold file written by :func:`save_manifold`."""
    from torsion.steering.io import read_safetensors

    metadata, tensors = read_safetensors(path, "manifold file")
    if metadata.get("format") != FORMAT:
        raise TorsionError(f"{path} is not a manifold file (format {metadata.get('format')!r}); "
                           "pass the output of `torsion manifold fit`")
    meta = json.loads(metadata["manifold"])
    smoothing = float(meta.get("smoothing", 0.0))
    weights = meta.get("knot_weights")
    weights = tuple(float(w) for w in weights) if weights else None
    blocks_a = sorted({int(key.split("/")[1]) for key in tensors if key.startswith("a/")})
    a = {layer: BlockCurve(layer, tensors[f"a/{layer}/basis"], tensors[f"a/{layer}/mean"],
                           tensors[f"a/{layer}/knots"], tensors[f"a/{layer}/knots_t"], smoothing, weights)
         for layer in blocks_a}
    b = None
    if "b/basis" in tensors:
        blocks_b = sorted({int(key.split("/")[1]) for key in tensors
                           if key.startswith("b/") and key.count("/") == 2})
        b = Surface(tuple(blocks_b), tensors["b/basis"],
                    torch.stack([tensors[f"b/{layer}/mean"] for layer in blocks_b]),
                    torch.stack([tensors[f"b/{layer}/knots"] for layer in blocks_b]),
                    tensors["b/knots_t"], int(meta["n_layers"]), smoothing, weights)
    return Manifold(a, b, meta)
