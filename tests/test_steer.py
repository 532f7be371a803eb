import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from torsion.capture import output_tensor, encode
from torsion.errors import TorsionError
from torsion.orthogonalize import orthogonalize_weights, save_model_dir
from torsion.steer import ablate_direction, add_steering, dense_steering, generate_steered

from tiny import tiny_lm

PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and the knight please"]
LAYER = 1  # a non-final block of the 3-block tiny models: HF's last hidden_states entry is post-norm


def _vectors(lm, seed=1):
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _forward(lm, prompts=PROMPTS, **kwargs):
    return lm.model(**encode(lm, prompts), **kwargs)


def _hand_hooks(modules_and_deltas, positions="last"):
    """Hand-written forward hooks adding ``delta`` ``[d_model]`` to each module's output (at the last
    position, which in a decoding step is the new token, or at every position); returns the handles."""
    def make(delta):
        def hook(_module, _inputs, output):
            hidden = output_tensor(output).clone()
            if positions == "all":
                hidden += delta
            else:
                hidden[:, -1] += delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook
    return [module.register_forward_hook(make(delta)) for module, delta in modules_and_deltas]


def _hook_count(lm):
    """Forward hooks on the model (transformers installs its hidden-state recorders permanently)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_hook_ablation_equals_weight_orthogonalisation(family, per_layer):
    lm = tiny_lm(family)
    direction = _vectors(lm) if per_layer else _vectors(lm)[0]
    base, hooks = _forward(lm).logits, _hook_count(lm)
    with ablate_direction(lm, direction):
        ablated = _forward(lm).logits
    edited = orthogonalize_weights(lm, direction)
    orthogonalized = _forward(edited).logits
    torch.testing.assert_close(orthogonalized, ablated, atol=1e-4, rtol=0)
    assert (ablated - base).abs().max() > 1e-2
    assert torch.equal(_forward(lm).logits, base)  # the original is untouched: a deep copy was edited
    assert _hook_count(lm) == hooks
    assert edited.weights_sha256 is None


def test_ablated_residual_stream_has_no_component_along_the_direction():
    lm = tiny_lm("llama")
    unit = torch.nn.functional.normalize(_vectors(lm)[0], dim=0)
    with ablate_direction(lm, 5.0 * unit):
        hidden = _forward(lm, output_hidden_states=True).hidden_states
    for k in range(lm.n_layers):  # embedding and every block output except the post-norm last entry
        assert (hidden[k] @ unit).abs().max() < 1e-5
    assert (_forward(lm, output_hidden_states=True).hidden_states[1] @ unit).abs().max() > 1e-2


def test_orthogonalize_inplace_unties_a_tied_head():
    lm = tiny_lm("gemma")
    head = lm.model.get_output_embeddings().weight.clone()
    assert lm.model.get_output_embeddings().weight is lm.layout.embed.weight
    edited = orthogonalize_weights(lm, _vectors(lm)[0], inplace=True)
    assert edited is lm
    assert torch.equal(lm.model.get_output_embeddings().weight, head)  # the read-out keeps its weights
    assert not torch.equal(lm.layout.embed.weight, head)
    assert lm.model.config.tie_word_embeddings is False


def test_orthogonalize_refuses_post_norm_models():
    lm = tiny_lm("gemma2")
    with pytest.raises(TorsionError, match="post-norm.*not equivalent to directional ablation"):
        orthogonalize_weights(lm, _vectors(lm)[0])


def test_saved_model_reloads_with_identical_logits(tmp_path):
    lm = tiny_lm("gemma")  # tied embeddings: the saved copy must stay untied
    edited = orthogonalize_weights(lm, _vectors(lm))
    edited.model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model has
    save_model_dir(edited, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    inputs = encode(edited, PROMPTS)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, edited.model(**inputs).logits)


@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_alpha_zero_is_bit_identical_and_exit_restores(family, component):
    lm = tiny_lm(family)
    base, hooks = _forward(lm).logits, _hook_count(lm)
    with add_steering(lm, _vectors(lm), layers=[0, 1, 2], alpha=0.0, component=component, positions="all"):
        assert torch.equal(_forward(lm).logits, base)
    with pytest.raises(RuntimeError), add_steering(lm, _vectors(lm), layers=[1], alpha=3.0, component=component):
        assert not torch.equal(_forward(lm).logits, base)
        raise RuntimeError("leaving by an exception")
    assert torch.equal(_forward(lm).logits, base)
    assert _hook_count(lm) == hooks


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_resid_addition_changes_the_next_hidden_state_by_exactly_v(family):
    lm = tiny_lm(family)
    v = _vectors(lm)
    # this first call installs transformers' hidden-state recorders; steering must still run before them
    base = _forward(lm, output_hidden_states=True).hidden_states[LAYER + 1]
    with add_steering(lm, v, layers=LAYER, alpha=1.0, positions="all") as record:
        steered_all = _forward(lm, output_hidden_states=True).hidden_states[LAYER + 1]
    torch.testing.assert_close(steered_all - base, v[LAYER].expand_as(base), atol=1e-5, rtol=0)
    assert record.additions == [1]
    with add_steering(lm, v, layers=LAYER, alpha=1.0, positions="last"):
        steered_last = _forward(lm, output_hidden_states=True).hidden_states[LAYER + 1]
    torch.testing.assert_close(steered_last[:, -1] - base[:, -1], v[LAYER].expand(len(PROMPTS), -1),
                               atol=1e-5, rtol=0)
    assert torch.equal(steered_last[:, :-1], base[:, :-1])  # left-padded: -1 is every prompt's last token


@pytest.mark.parametrize("component", ["attn", "mlp"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sub_block_addition_changes_the_component_output_by_exactly_alpha_v(family, component):
    lm = tiny_lm(family)
    v, alpha = _vectors(lm), -2.5
    module = lm.layout.component_module(component, LAYER)
    captured = []

    def capture(_module, _inputs, output):
        captured.append(output_tensor(output).clone())

    handle = module.register_forward_hook(capture)  # registered first; steering still runs before it
    _forward(lm)
    with add_steering(lm, v, layers=[LAYER], alpha=alpha, component=component, positions="all"):
        _forward(lm)
    handle.remove()
    base, steered = captured
    torch.testing.assert_close(steered - base, alpha * v[LAYER].expand_as(base), atol=1e-5, rtol=0)


def test_record_reports_raw_alpha_and_applied_norm_per_layer():
    lm = tiny_lm("llama")
    v = _vectors(lm)
    with add_steering(lm, v, layers=[2, 0], alpha=[2.0, -0.5]) as record:
        pass
    assert record.alpha == (2.0, -0.5)
    assert record.applied_norms == pytest.approx([2.0 * v[2].norm().item(), 0.5 * v[0].norm().item()], rel=1e-6)
    assert record.conventions()["applied_norm"] == list(record.applied_norms)
    assert record.conventions()["layer_indexing"] == "block"


def test_dense_steering_with_equal_applied_norm():
    lm = tiny_lm("qwen2")
    v = _vectors(lm)
    v[1] = 0.0
    with dense_steering(lm, v, applied_norm=2.5) as record:
        logits = _forward(lm).logits
    handles = _hand_hooks([(lm.layout.blocks[l], 2.5 * v[l] / v[l].norm()) for l in (0, 2)])
    expected = _forward(lm).logits  # by hand: v̂_l scaled to norm 2.5 at blocks 0 and 2, last token
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert record.layers == (0, 1, 2)
    assert record.applied_norms == pytest.approx([2.5, 0.0, 2.5], abs=1e-12)
    assert record.alpha[1] == 0.0
    assert record.alpha[0] == pytest.approx(2.5 / v[0].double().norm().item(), rel=1e-12)
    assert (logits - _forward(lm).logits).abs().max() > 1e-2
    with pytest.raises(TorsionError, match="exactly one of alpha or applied_norm"):
        dense_steering(lm, v, alpha=1.0, applied_norm=1.0)
    with pytest.raises(TorsionError, match=re.escape("one direction per block, [3, d_model]")):
        dense_steering(lm, v[:2], alpha=1.0)


@pytest.mark.parametrize(("phase", "first_k", "expected"), [
    ("both", None, 6), ("both", 2, 3), ("prefill", None, 1), ("generation", None, 5), ("generation", 2, 2),
    ("both", 0, 1),
])
def test_phase_and_first_k_count_hook_additions_during_generate(phase, first_k, expected):
    lm = tiny_lm("llama")
    inputs = encode(lm, PROMPTS)
    inputs.pop("position_ids")
    with add_steering(lm, _vectors(lm), layers=[0, 2], alpha=1.0, phase=phase, first_k=first_k) as record:
        lm.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert record.additions == [expected, expected]  # 1 prefill forward + 5 generation steps


def test_generate_steered_rows():
    lm = tiny_lm("llama")
    v = _vectors(lm)
    unsteered = generate_steered(lm, PROMPTS, vectors=v, layers=[1], alpha=0.0, max_new_tokens=5, batch_size=2)
    inputs = encode(lm, PROMPTS)
    inputs.pop("position_ids")
    plain = lm.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = lm.tokenizer.batch_decode(plain[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [row["response"] for row in unsteered] == [e.strip() for e in expected]
    rows = generate_steered(lm, PROMPTS, vectors=v, layers=[1, 2], alpha=[20.0, -20.0], component="mlp",
                            max_new_tokens=5, batch_size=2)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert rows[0]["alpha"] == [20.0, -20.0]
    assert rows[0]["applied_norm"] == pytest.approx([20 * v[1].norm().item(), 20 * v[2].norm().item()], rel=1e-6)
    assert (rows[0]["layers"], rows[0]["component"], rows[0]["positions"]) == ([1, 2], "mlp", "last")
    assert [row["response"] for row in rows] != [row["response"] for row in unsteered]
    # by hand: α_l v_l on the mlp outputs of blocks 1 and 2, at the prompt's last token, then at each new token
    handles = _hand_hooks([(lm.layout.mlp[1], 20.0 * v[1]), (lm.layout.mlp[2], -20.0 * v[2])])
    try:
        steered = lm.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    expected = lm.tokenizer.batch_decode(steered[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [row["response"] for row in rows] == [e.strip() for e in expected]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": 3}, "layer 3 is out of range; this model has blocks 0..2"),
    ({"layers": -1}, "layer -1 is out of range; this model has blocks 0..2"),
    ({"alpha": float("nan")}, "alpha for layer 1 is nan; pass a finite number"),
    ({"alpha": [1.0, float("inf")], "layers": [0, 1]}, "alpha for layer 1 is inf; pass a finite number"),
    ({"alpha": [1.0, 2.0]}, "got 2 alpha values for 1 layers; pass one alpha or one per layer"),
    ({"vectors": torch.ones(3, 16)},
     "vector has d_model=16 but the model has 32; use a vector computed for this model"),
    ({"vectors": torch.ones(1, 32)}, "vector has 1 layers but layer 1 is steered"),
    ({"vectors": torch.ones(32)}, "vectors have shape [32]; pass [n_layers, d_model]"),
    ({"positions": "first"}, "unknown positions 'first'; choose last or all"),
    ({"phase": "prefill", "first_k": 2}, "first_k=2 needs k >= 0 and phase generation or both"),
    ({"component": "attention"}, "unknown component 'attention'; choose resid, attn or mlp"),
])
def test_bad_steering_input_is_a_torsion_error(kwargs, message):
    lm = tiny_lm("llama")
    args = {"vectors": _vectors(lm), "layers": 1, "alpha": 1.0, **kwargs}
    with pytest.raises(TorsionError, match=re.escape(message)), add_steering(lm, **args):
        pass
    assert _hook_count(lm) == 0


def test_bad_ablation_direction_is_a_torsion_error():
    lm = tiny_lm("llama")
    with pytest.raises(TorsionError, match=re.escape("vector has d_model=16 but the model has 32")):
        orthogonalize_weights(lm, torch.ones(16))
    zero_layer = _vectors(lm)
    zero_layer[2] = 0.0
    with pytest.raises(TorsionError, match="direction at layer 2 is zero or non-finite"), \
            ablate_direction(lm, zero_layer):
        pass


def test_ablation_weight_errors_name_the_weight_not_alpha():
    lm = tiny_lm("llama", n_layers=4)
    direction = torch.ones(lm.d_model)
    with pytest.raises(TorsionError, match=r"^got 2 weight values for 4 layers; pass one weight or one per layer$"):
        with ablate_direction(lm, direction, weight=[1.0, 0.5]):
            pass
    with pytest.raises(TorsionError, match=r"^weight for layer 0 is nan; pass a finite number$"):
        with ablate_direction(lm, direction, weight=float("nan")):
            pass


def test_generate_steered_with_the_default_auto_batch_size():
    lm = tiny_lm("llama", n_layers=4)
    rows = generate_steered(lm, ["hi", "hello there"], vectors=torch.ones(4, lm.d_model), layers=[1], alpha=1.0,
                            max_new_tokens=2)
    assert [row["prompt"] for row in rows] == ["hi", "hello there"] and rows[0]["layers"] == [1]


def test_generate_steered_refuses_batch_size_zero_in_one_line():
    lm = tiny_lm("llama", n_layers=4)
    with pytest.raises(TorsionError, match=r"^batch_size = 0; pass at least 1 prompt per batch$"):
        generate_steered(lm, ["hi"], vectors=torch.ones(4, lm.d_model), layers=[1], alpha=1.0, batch_size=0)
