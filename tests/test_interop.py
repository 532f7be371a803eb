import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from torsion.errors import TorsionError
from torsion.interop import (
    export_control_vector_gguf,
    from_repeng,
    from_steering_vectors,
    import_control_vector_gguf,
    to_repeng,
    to_steering_vectors,
)
from torsion.vectors import SteeringVector


def _vector(n_layers=5, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(torch.randn(n_layers, d, generator=generator), {"method": "md"})


def test_gguf_round_trip_is_exact(tmp_path):
    vector = _vector()
    path = export_control_vector_gguf(vector, tmp_path / "v.gguf", model_hint="qwen2")
    again = import_control_vector_gguf(path, n_layers=5)
    assert torch.equal(again.directions, vector.directions)
    assert again.meta["model_hint"] == "qwen2" and again.meta["layer_indexing"] == "block"


def test_gguf_file_is_what_llama_cpp_reads(tmp_path):
    import gguf

    path = export_control_vector_gguf(_vector(3, 8), tmp_path / "v.gguf", model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    assert arch == "controlvector"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 3
    assert sorted(t.name for t in reader.tensors) == ["direction.0", "direction.1", "direction.2"]


def test_gguf_bad_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(TorsionError, match="missing or empty"):
        import_control_vector_gguf(empty)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(TorsionError, match="is not a GGUF file"):
        import_control_vector_gguf(garbage)


def test_gguf_vector_for_a_deeper_model_is_refused(tmp_path):
    path = export_control_vector_gguf(_vector(6, 8), tmp_path / "v.gguf", model_hint="llama")
    with pytest.raises(TorsionError, match="has layer 5 but the model has 4 blocks"):
        import_control_vector_gguf(path, n_layers=4)


def test_peer_objects_convert_by_block_index():
    vector = _vector(4, 8)
    peer = SimpleNamespace(layer_activations={1: vector.directions[1], 3: vector.directions[3]},
                           layer_type="decoder_block")
    back = from_steering_vectors(peer, n_layers=4)
    assert torch.equal(back.directions[[1, 3]], vector.directions[[1, 3]])
    assert torch.equal(back.directions[[0, 2]], torch.zeros(2, 8))
    control = SimpleNamespace(model_type="qwen2", directions={l: vector.directions[l].numpy() for l in range(4)})
    assert torch.equal(from_repeng(control).directions, vector.directions)


# steering-vectors 0.12.2 needs transformers<5 and repeng 0.4.0 numpy<2, so neither installs beside
# torsion's own pins; benchmarks/bench_peers.py runs the real packages in their own virtualenv.
# These stand-ins have the real classes' fields (steering_vectors.SteeringVector and
# repeng.ControlVector, both dataclasses) and check torsion's side of each conversion.
@dataclass
class PeerSteeringVector:
    layer_activations: dict[int, torch.Tensor]
    layer_type: str = "decoder_block"


@dataclass
class PeerControlVector:
    model_type: str
    directions: dict[int, np.ndarray]


def test_steering_vectors_round_trip_against_the_peer_class_shape(monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_vectors", SimpleNamespace(SteeringVector=PeerSteeringVector))
    vector = _vector()
    peer = to_steering_vectors(vector, layers=[1, 3])
    assert isinstance(peer, PeerSteeringVector) and sorted(peer.layer_activations) == [1, 3]
    assert peer.layer_type == "decoder_block" and torch.equal(peer.layer_activations[3], vector.directions[3])
    peer.layer_activations[3].zero_()  # a copy: the peer object never aliases torsion's tensor
    assert vector.directions[3].abs().sum() > 0
    full = to_steering_vectors(vector)
    assert torch.equal(from_steering_vectors(full).directions, vector.directions)
    with pytest.raises(TorsionError, match="layer_type 'attn' is not a block output"):
        from_steering_vectors(PeerSteeringVector({0: vector.directions[0]}, layer_type="attn"))
    monkeypatch.setitem(sys.modules, "steering_vectors", None)  # not installed
    with pytest.raises(TorsionError, match="steering-vectors is not installed"):
        to_steering_vectors(vector)


def test_repeng_round_trip_against_the_peer_class_shape(monkeypatch):
    monkeypatch.setitem(sys.modules, "repeng", SimpleNamespace(ControlVector=PeerControlVector))
    vector = _vector()
    control = to_repeng(vector, model_type="qwen2")
    assert control.model_type == "qwen2" and sorted(control.directions) == list(range(5))
    assert all(isinstance(d, np.ndarray) and d.dtype == np.float32 for d in control.directions.values())
    back = from_repeng(control)
    assert torch.equal(back.directions, vector.directions) and back.meta["model_hint"] == "qwen2"
    partial = from_repeng(to_repeng(vector, model_type="llama", layers=[2]), n_layers=5)
    assert torch.equal(partial.directions[2], vector.directions[2])
    assert partial.directions[[0, 1, 3, 4]].abs().sum() == 0
    monkeypatch.setitem(sys.modules, "repeng", None)
    with pytest.raises(TorsionError, match="repeng is not installed"):
        to_repeng(vector, model_type="qwen2")
