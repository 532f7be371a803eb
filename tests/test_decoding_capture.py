"""Decoding-time capture: the generated position equals a teacher-forced recomputation; tokens never change."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_lm
from torsion.capture import encode
from torsion.decoding_capture import capture_generation_to_file, check_readout, decoding_capture
from torsion.errors import TorsionError
from torsion.generate import GenerationSettings
from torsion.steer import add_steering

PROMPTS = ["how do i bake bread", "tell me a story about the dragon", "hello", "what is the capital of france"]
K, NEW = 3, 6


def _generate(lm, prompts):
    inputs = encode(lm, prompts)
    inputs.pop("position_ids")
    with torch.inference_mode():
        out = lm.model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return inputs, out


def _teacher_forced(lm, inputs, out, block, stop_ids):
    """Mean ``resid`` at generated tokens 0..K-1 of each row (before its first stop token), from one full forward."""
    prompt_len = inputs["input_ids"].shape[1]
    mask = (torch.arange(out.shape[1]) < prompt_len).long()[None] * inputs["attention_mask"].new_ones(out.shape)
    mask[:, :prompt_len] = inputs["attention_mask"]
    generated = out[:, prompt_len:]
    n_steps = generated.shape[1]
    means, counts = [], []
    for row in range(len(out)):
        stops = [j for j in range(n_steps) if int(generated[row, j]) in stop_ids]
        count = min(K, stops[0] if stops else n_steps, n_steps - 1)
        mask[row, prompt_len:prompt_len + (stops[0] + 1 if stops else n_steps)] = 1
        counts.append(count)
    with torch.inference_mode():
        hidden = lm.model(input_ids=out, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          output_hidden_states=True).hidden_states[block + 1]  # block b = hidden_states[b + 1]
    for row, count in enumerate(counts):
        nan = torch.full((hidden.shape[-1],), float("nan"))
        means.append(hidden[row, prompt_len:prompt_len + count].mean(0) if count else nan)
    return torch.stack(means), torch.tensor(counts, dtype=torch.float32), hidden[:, prompt_len - 1]


def test_capture_changes_no_token_and_matches_a_teacher_forced_forward():
    lm = tiny_lm("llama", n_layers=4)
    _, plain = _generate(lm, PROMPTS)
    with decoding_capture(lm, [1, 2], k=K) as recorder:  # (HF applies the final norm to the last block's entry)
        inputs, captured = _generate(lm, PROMPTS)
    assert torch.equal(plain, captured)
    states = recorder.take()
    for index, block in enumerate([1, 2]):
        expected, counts, last = _teacher_forced(lm, inputs, captured, block, recorder.stop_ids)
        torch.testing.assert_close(states["generated_count"], counts)
        torch.testing.assert_close(states["generated"][:, index], expected, atol=1e-4, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(states["last"][:, index], last, atol=1e-4, rtol=1e-4)


def test_rows_that_stop_early_average_what_they_produced():
    lm = tiny_lm("llama", n_layers=4)
    _, out = _generate(lm, PROMPTS)
    prompt_len = encode(lm, PROMPTS)["input_ids"].shape[1]
    stop = int(out[0, prompt_len + 1])  # row 0's second generated token ends it
    lm.model.generation_config.eos_token_id = stop
    with decoding_capture(lm, [2], k=K) as recorder:
        inputs, stopped = _generate(lm, PROMPTS)
    states = recorder.take()
    expected, counts, _ = _teacher_forced(lm, inputs, stopped, 2, recorder.stop_ids)
    assert stop in recorder.stop_ids and counts[0] <= 1
    torch.testing.assert_close(states["generated_count"], counts)
    torch.testing.assert_close(states["generated"][:, 0], expected, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_steered_generation_is_unchanged_by_capture(tmp_path):
    lm = tiny_lm("llama", n_layers=4)
    vectors = torch.randn(4, lm.d_model)
    settings = GenerationSettings(max_new_tokens=NEW, batch_size=3)
    steer = lambda: add_steering(lm, vectors, layers=[1], alpha=4.0)  # noqa: E731
    with steer():
        _, plain = _generate(lm, PROMPTS)
    tensors, responses = capture_generation_to_file(lm, PROMPTS, tmp_path / "steered.safetensors",
                                                    readout_blocks=[2, 3], k=K, settings=settings, steer=steer,
                                                    steered_blocks=[1])
    prompt_len = encode(lm, PROMPTS)["input_ids"].shape[1]
    decoded = [t.strip() for t in lm.tokenizer.batch_decode(plain[:, prompt_len:], skip_special_tokens=True)]
    assert responses == decoded
    assert tensors["generated/resid"].shape == (4, 2, lm.d_model) and tensors["generated_count"].shape == (4, 1)
    again, _ = capture_generation_to_file(lm, PROMPTS, tmp_path / "steered.safetensors", readout_blocks=[2, 3], k=K,
                                          settings=settings, steer=steer, steered_blocks=[1])
    torch.testing.assert_close(again["last/resid"], tensors["last/resid"])


@pytest.mark.parametrize("kwargs, message", [
    ({"readout_blocks": [2], "k": 0}, "K=0"),
    ({"readout_blocks": [0], "k": 8, "steered_blocks": [1]}, "before the first steered block"),
    ({"readout_blocks": [9], "k": 8}, "out of range"),
])
def test_bad_readout_is_one_line(kwargs, message):
    with pytest.raises(TorsionError, match=message) as error:
        check_readout(n_layers=4, **kwargs)
    assert "\n" not in str(error.value)
