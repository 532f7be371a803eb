import random

import pytest
import torch

from torsion.capture import encode
from torsion.errors import TorsionError
from torsion.generate import (AUTO_BATCH_CAP, GenerationSettings, auto_batch_size, buckets, decode_bucket,
                              generate_batch, iter_generate_ids, row_bytes, tokenize_prompts)
from torsion.steer import add_steering, generate_steered

from tiny import WORDS, tiny_lm

NEW = 7


def _prompts(n=11, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def _hf_batch_of_one(lm, prompts, max_new_tokens=NEW, **kwargs):
    """Today's reference: ``model.generate`` one prompt at a time, greedy, ids up to EOS."""
    eos = lm.model.generation_config.eos_token_id
    out = []
    for prompt in prompts:
        inputs = encode(lm, [prompt])
        inputs.pop("position_ids")
        ids = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
        out.append(ids[:ids.index(eos)] if eos in ids else ids)
    return out


def _ids(lm, prompts, settings):
    out = [None] * len(prompts)
    for indices, ids in iter_generate_ids(lm, prompts, settings):
        for i, tokens in zip(indices, ids):
            out[i] = tokens
    return out


def _with_frequent_eos(lm, prompts):
    """Make the token the reference emits most often the EOS, so rows finish at different steps."""
    counts = {}
    for ids in _hf_batch_of_one(lm, prompts):
        for token in ids:
            counts[token] = counts.get(token, 0) + 1
    lm.model.generation_config.eos_token_id = max(counts, key=counts.get)
    return lm


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_bucketed_batches_give_the_batch_of_one_tokens(family, batch_size):
    lm = tiny_lm(family)
    prompts = _prompts()
    _with_frequent_eos(lm, prompts)
    reference = _hf_batch_of_one(lm, prompts)
    lengths = {len(r) for r in reference}
    assert len(lengths) > 1 and min(lengths) < NEW  # rows stop early, at different steps: rows leave the batch
    assert _ids(lm, prompts, GenerationSettings(max_new_tokens=NEW, batch_size=batch_size)) == reference
    texts = generate_batch(lm, prompts, GenerationSettings(max_new_tokens=NEW, batch_size=batch_size))
    assert texts == [t.strip() for t in lm.tokenizer.batch_decode(reference, skip_special_tokens=True)]


def test_buckets_sort_by_length_and_restore_order():
    assert buckets([5, 1, 3, 1, 9], 2) == [[1, 3], [2, 0], [4]]
    lm = tiny_lm("llama")
    prompts = _prompts(7, seed=3)
    seen = [indices for indices, _ in iter_generate_ids(lm, prompts, GenerationSettings(max_new_tokens=2,
                                                                                        batch_size=3))]
    lengths = [len(r) for r in tokenize_prompts(lm, prompts)]
    assert sorted(i for chunk in seen for i in chunk) == list(range(7))
    flat = [lengths[i] for chunk in seen for i in chunk]
    assert flat == sorted(flat) and [len(chunk) for chunk in seen] == [3, 3, 1]


def test_auto_batch_size_is_bounded_by_the_cap_and_by_memory(monkeypatch):
    lm = tiny_lm("qwen2")
    assert auto_batch_size(lm, 40) == AUTO_BATCH_CAP
    # hand count for the tiny Qwen2 (3 layers, 2 KV heads of 8, MLP 64, 4 heads, vocab 34), 10 tokens, float32
    expected = 2 * 3 * 2 * 8 * 10 * 4 + 10 * max(4 * 64, 4 * 10) * 4 + 2 * len(lm.tokenizer) * 4
    assert row_bytes(lm, 10) == expected
    monkeypatch.setattr("torsion.generate.available_memory", lambda device: 4 * 5 * expected + 3)
    assert auto_batch_size(lm, 10) == 5
    monkeypatch.setattr("torsion.generate.available_memory", lambda device: 0)
    assert auto_batch_size(lm, 10) == 1


@pytest.mark.parametrize("bad", [0, -2, "big", 2.5, True])
def test_bad_batch_size_is_refused(bad):
    with pytest.raises(TorsionError, match="pass a whole number >= 1 or 'auto'"):
        GenerationSettings(batch_size=bad)


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("family, attention", [("llama", "eager"), ("qwen2", "eager"), ("qwen2", "sdpa"),
                                               ("gemma2", "eager")])
def test_steered_fast_generation_equals_steered_generate(family, attention, positions):
    """Steering every position also steers the left padding; masked, it must not reach a real token.
    sdpa is the attention the embedded models load with."""
    lm = tiny_lm(family)
    lm.model.set_attn_implementation(attention)
    prompts = _prompts(9, seed=1)
    vectors = torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(5))
    steer = dict(vectors=vectors, layers=[0, 2], alpha=[3.0, -2.0], positions=positions)
    with add_steering(lm, **steer) as reference_record:
        reference = _hf_batch_of_one(lm, prompts, min_new_tokens=NEW)
    plain = _hf_batch_of_one(lm, prompts, min_new_tokens=NEW)
    assert reference != plain  # the steering changes the tokens
    for batch_size in (1, 4, "auto"):
        with add_steering(lm, **steer):
            assert _ids(lm, prompts, GenerationSettings(max_new_tokens=NEW, batch_size=batch_size)) == reference
    rows = generate_steered(lm, prompts, **steer, max_new_tokens=NEW, batch_size=4)
    assert [r["response"] for r in rows] == [t.strip() for t in lm.tokenizer.batch_decode(reference,
                                                                                          skip_special_tokens=True)]
    lm.model.generation_config.eos_token_id = None  # every row runs NEW steps: additions are comparable
    with add_steering(lm, **steer) as record:
        decode_bucket(lm, tokenize_prompts(lm, prompts[:4]), GenerationSettings(max_new_tokens=NEW))
    assert record.additions == [NEW, NEW]  # one prefill + NEW - 1 steps, as under model.generate
    assert reference_record.additions == [len(prompts) * NEW] * 2


def test_sampling_is_reproducible_from_the_seed_and_leaves_the_global_rng_alone():
    lm = tiny_lm("llama")
    prompts = _prompts(8, seed=2) + ["hello"] * 3
    settings = GenerationSettings(max_new_tokens=NEW, temperature=1.5, top_p=0.9, seed=7, batch_size=3)
    state = torch.random.get_rng_state()
    first = generate_batch(lm, prompts, settings)
    assert torch.equal(torch.random.get_rng_state(), state)
    other_batches = generate_batch(lm, prompts, GenerationSettings(max_new_tokens=NEW, temperature=1.5, top_p=0.9,
                                                                   seed=7, batch_size=5))
    assert other_batches == first  # a row's draws come from its own generator, whatever its batch
    assert len(set(first[-3:])) > 1  # repeats of a prompt draw differently
    other_seed = generate_batch(lm, prompts, GenerationSettings(max_new_tokens=NEW, temperature=1.5, top_p=0.9,
                                                                seed=8, batch_size=3))
    assert other_seed != first


def test_steer_cli_takes_auto_or_a_whole_number(capsys, tmp_path):
    from torsion.cli import build_parser

    vector = tmp_path / "v.safetensors"
    vector.write_bytes(b"")  # the parser checks that the file exists; nothing reads it here
    parse = lambda *extra: build_parser().parse_args(["steer", "--vector", str(vector), "--layers", "1",
                                                      "--alpha", "1", "--prompt", "hi", *extra])
    assert parse().batch_size == "auto" and parse("--batch-size", "12").batch_size == 12
    with pytest.raises(SystemExit):
        parse("--batch-size", "0")
    assert "pass a whole number >= 1 or auto" in capsys.readouterr().err
