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


def test_steering_vectors_round_trip():
    pytest.importorskip("steering_vectors", reason="optional extra steering-vectors is not installed")
    vector = _vector()
    assert torch.equal(from_steering_vectors(to_steering_vectors(vector)).directions, vector.directions)


def test_repeng_round_trip():
    pytest.importorskip("repeng", reason="optional extra repeng is not installed")
    vector = _vector()
    control = to_repeng(vector, model_type="qwen2")
    assert isinstance(control.directions[0], np.ndarray)
    assert torch.equal(from_repeng(control).directions, vector.directions)
