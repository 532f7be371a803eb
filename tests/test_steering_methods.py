"""The steering-method protocol on tiny random models: closed forms, no-ops, files and bad input."""

from __future__ import annotations

import pytest
import torch

from steering_helpers import PROMPTS, block_output
from tiny import tiny_lm
from torsion.capture import encode
from torsion.errors import TorsionError
from torsion.metrics import first_token_kl
from torsion.steer import ablate_direction
from torsion.steering import get_method, load_method, method_names
from torsion.steering.weighted_ablation import kernel_weights


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", n_layers=4)


@pytest.fixture(scope="module")
def inputs(lm):
    return encode(lm, PROMPTS)


def _vectors(seed: int = 1, n_layers: int = 4, d: int = 32) -> torch.Tensor:
    return torch.randn(n_layers, d, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _logits(lm, inputs, method=None, strength=0.0):
    if method is None:
        return lm.model(**inputs).logits
    with method.apply(lm, strength):
        return lm.model(**inputs).logits


def _methods():
    v, mu = _vectors(1), _vectors(2)
    return {
        "flat": get_method("flat", vectors=v, layers=[1, 2], positions="all"),
        "dense": get_method("dense", vectors=v),
        "dense-norm": get_method("dense", vectors=v, scale="applied_norm"),
        "ablation": get_method("ablation", directions=v),
        "weighted-ablation": get_method("weighted-ablation", directions=v, peak_position=1.5, width=2.0, floor=0.25),
        "ace": get_method("ace", vectors=v, means=mu, layers=[2], positions="all"),
    }


def test_registry_lists_every_method():
    assert method_names() == ["ablation", "ace", "dense", "flat", "spline-a", "spline-b", "weighted-ablation"]


@pytest.mark.parametrize("name", ["flat", "dense", "dense-norm"])
def test_additive_method_at_zero_is_bit_identical(lm, inputs, name):
    method = _methods()[name]
    assert torch.equal(_logits(lm, inputs, method, 0.0), _logits(lm, inputs))
    assert not torch.equal(_logits(lm, inputs, method, 1.5), _logits(lm, inputs))


def test_replacement_methods_at_zero_mixing_are_bit_identical(lm, inputs):
    base = _logits(lm, inputs)
    v, mu = _vectors(1), _vectors(2)
    ace = get_method("ace", vectors=v, means=mu, layers=[1, 2], beta=0.0, positions="all")
    assert torch.equal(_logits(lm, inputs, ace, 3.0), base)
    for name in ("ablation", "weighted-ablation"):
        assert torch.equal(_logits(lm, inputs, _methods()[name], 0.0), base)
        assert not torch.equal(_logits(lm, inputs, _methods()[name], 1.0), base)


def test_flat_adds_alpha_v_at_its_blocks(lm, inputs):
    method = _methods()["flat"]
    h = block_output(lm, inputs, 1)
    steered = block_output(lm, inputs, 1, method, 2.5)
    torch.testing.assert_close(steered, h + 2.5 * method.vectors[1], atol=1e-5, rtol=0)


def test_ace_equals_its_closed_form(lm, inputs):
    method = _methods()["ace"]
    alpha = 1.7
    h = block_output(lm, inputs, 2).double()
    v, mu = method.vectors[2].double(), method.means[2].double()
    unit = v / v.norm()
    expected = h - ((h - mu) @ unit)[..., None] * unit + alpha * unit
    steered = block_output(lm, inputs, 2, method, alpha).double()
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)
    # the coordinate along v̂, measured from μ, is α
    torch.testing.assert_close((steered - mu) @ unit, torch.full(h.shape[:2], alpha, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_ace_record_measures_the_mean_change(lm, inputs):
    method = _methods()["ace"]
    h = block_output(lm, inputs, 2)
    with torch.inference_mode(), method.apply(lm, 0.5) as record:
        lm.model(**inputs)
    steered = block_output(lm, inputs, 2, method, 0.5)
    expected = torch.linalg.vector_norm(steered - h, dim=-1).mean().item()
    assert record.mean_delta_norms()[0] == pytest.approx(expected, rel=1e-4)
    assert record.conventions()["applied_norm"] == [0.5]


def test_kernel_by_hand():
    assert kernel_weights(5, peak_weight=1.0, peak_position=2.0, width=2.0, floor=0.5) == [0.5, 0.75, 1.0, 0.75, 0.5]
    assert kernel_weights(5, peak_weight=1.0, peak_position=2.0, width=1.0, floor=0.5) == [0.0, 0.5, 1.0, 0.5, 0.0]
    with pytest.raises(TorsionError, match="width"):
        kernel_weights(3, peak_weight=1.0, peak_position=1.0, width=0.0, floor=0.0)


def test_weighted_ablation_at_weight_one_everywhere_is_plain_ablation(lm, inputs):
    v = _vectors(3)
    ones = get_method("weighted-ablation", directions=v, peak_weight=1.0, floor=1.0, peak_position=1.0, width=10.0)
    with torch.inference_mode(), ablate_direction(lm, v):
        plain = lm.model(**inputs).logits
    assert torch.equal(_logits(lm, inputs, ones, 1.0), plain)
    zero = get_method("weighted-ablation", directions=v, peak_weight=0.0, floor=0.0, peak_position=1.0, width=10.0)
    assert torch.equal(_logits(lm, inputs, zero, 1.0), _logits(lm, inputs))


def test_weighted_ablation_interpolates_one_direction(lm):
    v = _vectors(4)
    method = get_method("weighted-ablation", directions=v, direction_index=1.25)
    mixed = 0.75 * v[1].double() + 0.25 * v[2].double()
    torch.testing.assert_close(method.unit_source().double(), mixed / mixed.norm(), atol=1e-6, rtol=0)


def test_ablation_removes_the_weighted_share_of_the_component(lm, inputs):
    v = _vectors(5)
    seen = {}
    module = lm.layout.mlp[2]
    with torch.inference_mode(), get_method("ablation", directions=v).apply(lm, 0.5) as record:
        before = module.register_forward_hook(lambda m, i, o: seen.update(raw=o.clone()), prepend=True)
        after = module.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
        try:
            lm.model(**inputs)
        finally:
            before.remove()
            after.remove()
    unit = v[2] / v[2].norm()
    raw = seen["raw"]
    torch.testing.assert_close(seen["out"], raw - 0.5 * (raw @ unit)[..., None] * unit, atol=1e-6, rtol=0)
    assert record.strengths == (0.5,) * 4 and record.mean_delta_norms()[2] > 0


def test_factory_plugs_into_the_metrics(lm):
    method = _methods()["flat"]
    assert first_token_kl(lm, PROMPTS, method.factory(lm, 0.0))["kl_base_to_steered"] == 0.0
    assert first_token_kl(lm, PROMPTS, method.bind(lm)(2.0))["kl_base_to_steered"] > 0.0


@pytest.mark.parametrize("name", ["flat", "dense-norm", "weighted-ablation", "ace"])
def test_save_load_round_trip(lm, inputs, tmp_path, name):
    method = _methods()[name]
    path = method.save(tmp_path / "m.safetensors")
    loaded = load_method(path, lm=lm)
    assert type(loaded) is type(method) and loaded.params() == method.params()
    assert method.tensors().keys() == loaded.tensors().keys()
    for key, tensor in method.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[key])
    assert torch.equal(_logits(lm, inputs, loaded, 1.0), _logits(lm, inputs, method, 1.0))


def test_method_file_for_another_width_fails_in_one_line(lm, tmp_path):
    path = get_method("flat", vectors=torch.ones(4, 16), layers=[1]).save(tmp_path / "narrow.safetensors")
    with pytest.raises(TorsionError, match="d_model=16 but the model has 32") as error:
        load_method(path, lm=lm)
    assert "\n" not in str(error.value)


def test_method_for_another_model_is_refused(lm):
    method = get_method("flat", vectors=_vectors(1), layers=[1], meta={"model_id": "tiny-qwen2"})
    with pytest.raises(TorsionError, match="fitted on model tiny-qwen2"):
        method.apply(lm, 1.0)


@pytest.mark.parametrize("call, message", [
    (lambda: get_method("flatt", vectors=torch.ones(4, 32), layers=[1]), "unknown steering method 'flatt'; choose"),
    (lambda: get_method("flat", vectors=torch.ones(4, 32), layer=[1]), "unknown parameter 'layer'.*did you mean 'layers'"),
    (lambda: get_method("flat", vectors=torch.ones(4, 32)), "flat needs layers"),
    (lambda: get_method("dense", vectors=torch.ones(4, 32), scale="norm"), "unknown dense scale"),
    (lambda: get_method("flat", vectors=torch.ones(4, 32), layers=[9]).apply(tiny_lm("llama", 4), 1.0), "block 9"),
])
def test_bad_input_fails_in_one_line(call, message):
    with pytest.raises(TorsionError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_not_a_method_file(tmp_path, lm):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(TorsionError, match="not a readable safetensors method file"):
        load_method(path, lm=lm)
