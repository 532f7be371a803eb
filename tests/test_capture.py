import numpy as np
import pytest
import torch

from torsion.capture import capture_batch, capture_to_file, encode, load_activations
from torsion.errors import TorsionError
from torsion.models import find_layout, post_instruction_length
from torsion.tensorfile import RowWriter

from tiny import tiny_lm

PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and the knight please"]
FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2"]


def _hidden_states(lm, prompts):
    inputs = encode(lm, prompts)
    with torch.no_grad():
        return lm.model(**inputs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_equals_hidden_states_of_next_index(family):
    lm = tiny_lm(family)
    acts = capture_batch(lm, PROMPTS)["resid"]["last"]
    hidden = _hidden_states(lm, PROMPTS)
    for layer in range(lm.n_layers - 1):
        torch.testing.assert_close(acts[:, layer], hidden[layer + 1][:, -1], atol=1e-5, rtol=0)
    # HF applies the final norm to its last entry; block L-1's raw output feeds that norm
    normed = lm.layout.final_norm(acts[:, -1:])[:, 0]
    torch.testing.assert_close(normed, hidden[-1][:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_plus_mlp_is_the_residual_update(family):
    """Independent formula: resid[l] - resid[l-1] = attn[l] + mlp[l] (resid[-1] = embeddings)."""
    lm = tiny_lm(family)
    acts = capture_batch(lm, PROMPTS)
    hidden = _hidden_states(lm, PROMPTS)
    previous = torch.cat([hidden[0][:, -1:], acts["resid"]["last"][:, :-1]], dim=1)
    update = acts["resid"]["last"] - previous
    torch.testing.assert_close(acts["attn"]["last"] + acts["mlp"]["last"], update, atol=1e-5, rtol=1e-5)
    assert acts["attn"]["last"].abs().sum() > 0 and acts["mlp"]["last"].abs().sum() > 0


def test_sub_module_outputs_are_captured():
    lm = tiny_lm("llama")
    seen = {}

    def record(_module, _inputs, output):
        seen["mlp"] = output[:, -1].clone()

    handle = lm.layout.mlp[1].register_forward_hook(record)
    try:
        acts = capture_batch(lm, PROMPTS)
    finally:
        handle.remove()
    torch.testing.assert_close(acts["mlp"]["last"][:, 1], seen["mlp"], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family):
    lm = tiny_lm(family)
    batch = capture_batch(lm, PROMPTS, positions=("last", "post_instruction"))
    for i, prompt in enumerate(PROMPTS):
        alone = capture_batch(lm, [prompt], positions=("last", "post_instruction"))
        for component in batch:
            for position in batch[component]:
                torch.testing.assert_close(batch[component][position][i], alone[component][position][0],
                                           atol=1e-4, rtol=1e-4)


def test_post_instruction_is_mean_over_template_suffix():
    lm = tiny_lm("llama")
    n_post = post_instruction_length(lm.tokenizer)
    assert n_post == 2  # "<end> <assistant>"
    acts = capture_batch(lm, PROMPTS, positions=("post_instruction",))["resid"]["post_instruction"]
    hidden = _hidden_states(lm, PROMPTS)
    torch.testing.assert_close(acts[:, 0], hidden[1][:, -n_post:].mean(1), atol=1e-5, rtol=1e-5)


def test_capture_to_file_matches_batches_and_resumes(tmp_path):
    lm = tiny_lm("qwen2")
    prompts = PROMPTS * 3
    path = tmp_path / "activations.safetensors"
    capture_to_file(lm, prompts, path, batch_size=4)
    tensors, meta = load_activations(path)
    assert set(tensors) == {"resid", "attn", "mlp", "post_instruction/resid", "post_instruction/attn",
                            "post_instruction/mlp"}
    assert tensors["resid"].shape == (9, 3, 32)
    assert meta["layer_indexing"] == "block" and meta["primary_position"] == "last"
    direct = capture_batch(lm, prompts)
    torch.testing.assert_close(tensors["resid"], direct["resid"]["last"], atol=1e-4, rtol=1e-4)


def test_row_writer_resumes_after_a_kill(tmp_path):
    path = tmp_path / "t.safetensors"
    rng = np.random.default_rng(0)
    full = rng.standard_normal((10, 2, 3)).astype(np.float32)
    writer = RowWriter(path, {"x": (10, 2, 3)}, {"k": "v"})
    writer.write(0, {"x": full[:4]})
    del writer  # killed: never closed, so nothing is published
    assert not path.exists()
    resumed = RowWriter(path, {"x": (10, 2, 3)}, {"k": "v"})
    assert resumed.rows_done == 4
    resumed.write(4, {"x": full[4:]})
    resumed.close()
    tensors, meta = load_activations(path)
    np.testing.assert_array_equal(tensors["x"].numpy(), full)
    assert meta == {"k": "v"}
    restarted = RowWriter(tmp_path / "u.safetensors", {"x": (10, 2, 3)}, {"k": "other"})
    assert restarted.rows_done == 0


def test_unknown_architecture_names_what_was_looked_for():
    lm = tiny_lm("llama")
    lm.model.config.model_type = "mystery"
    with pytest.raises(TorsionError, match="unsupported architecture 'mystery'.*model.layers"):
        find_layout(lm.model)


def test_layer_out_of_range():
    lm = tiny_lm("llama")
    with pytest.raises(TorsionError, match=r"layer 3 is out of range; this model has blocks 0..2"):
        lm.layout.component_module("resid", 3)


def test_a_changed_prompt_list_of_the_same_length_does_not_resume_into_old_rows(tmp_path, monkeypatch):
    import torsion.capture as capture

    lm = tiny_lm("llama")
    path = tmp_path / "activations.safetensors"
    old, new = ["hello", "how do i bake bread", "tell me a story", "why sky blue"], [
        "write poem cat", "what is capital of france", "tell me a story", "why sky blue"]
    real_batch, calls = capture.capture_batch, []

    def killed_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(capture, "capture_batch", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        capture_to_file(lm, old, path, components=("resid",), positions=("last",), batch_size=2)
    assert not path.exists() and path.with_name(path.name + ".partial").exists()  # rows 0-1 of `old` written
    monkeypatch.setattr(capture, "capture_batch", real_batch)
    capture_to_file(lm, new, path, components=("resid",), positions=("last",), batch_size=2)
    tensors, meta = load_activations(path)
    torch.testing.assert_close(tensors["resid"], capture_batch(lm, new, components=("resid",))["resid"]["last"],
                               atol=1e-5, rtol=0)
    assert meta["prompts_sha256"] == capture.prompts_sha256(new) != capture.prompts_sha256(old)
    assert capture.prompts_sha256(["a", "b"]) != capture.prompts_sha256(["b", "a"])
    assert capture.prompts_sha256(["a "]) != capture.prompts_sha256(["a"])


@pytest.mark.parametrize("checkpoint", ["{not json", '{"rows": 3}', '{"rows_done": "4"}', '{"rows_done": 99}',
                                        "[]", '{"rows_done": -1}'])
def test_a_damaged_capture_checkpoint_fails_in_one_line_naming_the_fix(tmp_path, checkpoint):
    path = tmp_path / "t.safetensors"
    writer = RowWriter(path, {"x": (10, 2, 3)}, {"k": "v"})
    writer.write(0, {"x": np.zeros((4, 2, 3), dtype=np.float32)})
    del writer
    (tmp_path / "t.safetensors.partial.json").write_text(checkpoint)
    with pytest.raises(TorsionError) as error:
        RowWriter(path, {"x": (10, 2, 3)}, {"k": "v"})
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "t.safetensors.partial.json is damaged" in message
    assert "delete it and t.safetensors.partial, then rerun" in message
