"""Move steering vectors between torsion and other tools.

- llama.cpp control vectors (GGUF, architecture ``controlvector``): tensor ``direction.<l>``
  is added after decoder block ``l`` — the same block indexing as torsion. llama.cpp never
  steers block 0, so a non-zero layer 0 is written but ignored there.
- steering-vectors' ``SteeringVector`` (``layer_activations: {block: [d_model]}``, layer type
  ``decoder_block``) and repeng's ``ControlVector`` (``directions: {block: ndarray}``) when those
  optional packages are installed.

Example::

    export_control_vector_gguf(vector, "refusal.gguf", model_hint="qwen2")
    again = import_control_vector_gguf("refusal.gguf", n_layers=24)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.vectors import SteeringVector

_ARCH = "controlvector"
MAX_IMPLIED_LAYERS = 4096  # a layer index past this, without --n-layers, is a corrupt file, not a model


def export_control_vector_gguf(vector: SteeringVector, path: Path | str, *, model_hint: str) -> Path:
    """Write llama.cpp's control-vector GGUF: one float32 ``direction.<l>`` per layer.

    The file appears whole or not at all: it is written beside ``path`` and renamed.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer = gguf.GGUFWriter(str(partial), _ARCH)
        writer.add_string(f"{_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{_ARCH}.layer_count", vector.n_layers)
        for layer in range(vector.n_layers):
            writer.add_tensor(f"direction.{layer}", vector.directions[layer].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def import_control_vector_gguf(path: Path | str, *, n_layers: int | None = None) -> SteeringVector:
    """Read a control-vector GGUF: float32 or float16 ``direction.<l>`` tensors, ``[d_model]`` each.

    Layers absent from the file are zero. Anything else (not GGUF, truncated, quantised or
    non-finite directions, mixed widths) raises :class:`TorsionError`.
    """
    import gguf

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise TorsionError(f"control vector {path} is missing or empty; export one with torsion or repeng")
    fix = "pass a llama.cpp control vector (torsion vector export-gguf writes one)"
    try:
        reader = gguf.GGUFReader(str(path))
        model_hint = _string_field(reader, f"{_ARCH}.model_hint")
        tensors = [(t.name, t.tensor_type, np.array(t.data)) for t in reader.tensors]
    except Exception as error:  # noqa: BLE001 (gguf raises ValueError, struct, index and memmap errors on bad files)
        problem = f"{type(error).__name__}: {error}"
        raise TorsionError(f"{path} is not a GGUF file torsion can read ({problem}); {fix}") from None
    directions = {}
    for name, kind, data in tensors:
        match = re.fullmatch(r"direction\.(\d{1,6})", name, flags=re.ASCII)
        if match is None:
            continue
        if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise TorsionError(f"{path} tensor {name} is {getattr(kind, 'name', kind)}, not F32 or F16; {fix}")
        if sum(size > 1 for size in data.shape) > 1:
            raise TorsionError(f"{path} tensor {name} has shape {list(data.shape)}, not [d_model]; {fix}")
        value = torch.from_numpy(data.astype(np.float32).reshape(-1))
        if value.numel() == 0 or not bool(torch.isfinite(value).all()):
            raise TorsionError(f"{path} tensor {name} is empty or holds non-finite values; {fix}")
        directions[int(match.group(1))] = value
    if not directions:
        raise TorsionError(f"{path} holds no direction.<layer> tensors; is it a control vector?")
    return _from_layer_dict(directions, n_layers, {"source": str(path), "model_hint": model_hint,
                                                   "format": "llama.cpp controlvector"})


def _string_field(reader, name: str) -> str:
    """A GGUF string key's value, or "" when absent or not a string."""
    import gguf

    field = reader.get_field(name)
    if field is None or list(field.types) != [gguf.GGUFValueType.STRING]:
        return ""
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _from_layer_dict(directions: dict[int, torch.Tensor], n_layers: int | None, meta: dict) -> SteeringVector:
    if n_layers is None and max(directions) >= MAX_IMPLIED_LAYERS:
        raise TorsionError(f"vector has layer {max(directions)}, past {MAX_IMPLIED_LAYERS} blocks; pass the "
                           "model's block count (--n-layers) or use a vector made for a real model")
    if min(directions) < 0:
        raise TorsionError(f"vector has layer {min(directions)}; layers are decoder blocks 0..L-1, fix the source")
    count = n_layers if n_layers is not None else max(directions) + 1
    if max(directions) >= count:
        raise TorsionError(f"vector has layer {max(directions)} but the model has {count} blocks; "
                           "use a vector made for this model")
    width = {v.numel() for v in directions.values()}
    if len(width) != 1:
        raise TorsionError(f"vector layers have different widths {sorted(width)}; the file is corrupt")
    stacked = torch.zeros(count, width.pop(), dtype=torch.float32)
    for layer, value in directions.items():
        stacked[layer] = value.reshape(-1).float()
    return SteeringVector(stacked, {**meta, "layer_indexing": LAYER_INDEXING})


def to_steering_vectors(vector: SteeringVector, layers: list[int] | None = None):
    """A steering-vectors ``SteeringVector`` (decoder-block layers) with the given layers."""
    try:
        from steering_vectors import SteeringVector as PeerVector
    except ImportError:
        raise TorsionError("steering-vectors is not installed; `pip install steering-vectors`") from None
    chosen = range(vector.n_layers) if layers is None else layers
    return PeerVector(layer_activations={l: vector.directions[l].clone() for l in chosen},
                      layer_type="decoder_block")


def from_steering_vectors(peer, *, n_layers: int | None = None) -> SteeringVector:
    if getattr(peer, "layer_type", "decoder_block") != "decoder_block":
        raise TorsionError(f"steering-vectors layer_type {peer.layer_type!r} is not a block output; "
                           "torsion imports decoder_block vectors only")
    return _from_layer_dict(dict(peer.layer_activations), n_layers, {"format": "steering-vectors"})


def to_repeng(vector: SteeringVector, *, model_type: str, layers: list[int] | None = None):
    """A repeng ``ControlVector``; repeng's layer ``l`` is also decoder block ``l``."""
    try:
        from repeng import ControlVector
    except ImportError:
        raise TorsionError("repeng is not installed; `pip install repeng`") from None
    chosen = range(vector.n_layers) if layers is None else layers
    return ControlVector(model_type=model_type,
                         directions={l: vector.directions[l].numpy().copy() for l in chosen})


def from_repeng(control, *, n_layers: int | None = None) -> SteeringVector:
    directions = {int(l): torch.from_numpy(np.asarray(v, dtype=np.float32)) for l, v in control.directions.items()}
    return _from_layer_dict(directions, n_layers, {"format": "repeng", "model_hint": control.model_type})
