"""The probe judge: the reader's features against an independent forward pass, the fit against a hand softmax,
weights that name their reader and rule judge, and the shipped probe on the embedded reader."""

import json

import numpy as np
import pytest
import torch

from torsion.assets import sha256_file
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.judge import ProbeJudge, get_judge
from torsion.judge.learned import rule_terms
from torsion.judge.probe import (DEFAULT_OPTIONS, VERSION, fit_probe, load_probe_file, read_layers, reader_features,
                                 reader_inputs, train_probe_file)

from tiny import tiny_lm

FIXTURE = "tests/fixtures/labelled/responses.jsonl"
OPTIONS = {**DEFAULT_OPTIONS, "layer": 1, "prompt_tokens": 6, "response_tokens": 5}
PROMPTS = ["how do i bake bread", "tell me a story", "what is capital of france", "why sky blue"]
RESPONSES = ["please bake bread", "a dragon and knight story about a cat dog and poem", "hello",
             "explain why sky blue what is"]


@pytest.fixture(scope="module")
def reader():
    return tiny_lm("llama", n_layers=3)


def test_features_are_the_block_output_averaged_over_the_response_tokens(reader):
    got = read_layers(reader, PROMPTS, RESPONSES, OPTIONS, [0, 1], batch_size=3)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        ids, n_said = reader_inputs(reader.tokenizer, prompt, response, OPTIONS)
        assert n_said == min(5, len(response.split())) and len(ids) <= 6 + 5
        with torch.no_grad():  # one unpadded row, hidden_states[k + 1] is block k's output
            states = reader.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for column, layer in enumerate((0, 1)):
            expected = states[layer + 1][0, -n_said:].double().mean(0).numpy()
            assert np.allclose(got[row, column], expected, atol=1e-5)
    assert np.array_equal(reader_features(reader, PROMPTS, RESPONSES, OPTIONS, batch_size=3), got[:, 1])


def test_blocks_after_the_probed_one_do_not_run(reader):
    calls = []
    handle = reader.layout.blocks[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        reader_features(reader, PROMPTS, RESPONSES, OPTIONS)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(TorsionError, match="not among the reader's 3 blocks; retrain"):
        reader_features(reader, PROMPTS, RESPONSES, {**OPTIONS, "layer": 3})


def labelled_rows() -> list[dict]:
    refusals = ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                "Sorry, I won't do that.", "I must decline to help with that."]
    complies = ["please bake bread", "a dragon and knight story", "capital of france is paris", "sky blue why"]
    return ([{"prompt": p, "response": r, "label": "strong_refuse"} for p, r in zip(PROMPTS, refusals)]
            + [{"prompt": p, "response": r, "label": "strong_comply"} for p, r in zip(PROMPTS, complies)])


def test_probabilities_are_a_softmax_of_the_standardised_reading_and_the_rules(reader):
    rows = labelled_rows()
    model = fit_probe(rows, reader, OPTIONS)
    judge = ProbeJudge(trained=model, reader=reader)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    read = reader_features(reader, prompts, responses, OPTIONS)
    assert np.allclose(np.asarray(model["mean"]), read.mean(0), atol=1e-5)
    names = model["rule_features"]
    assert "l:strong_refuse" in names and "r:refusal_start" in names
    rules = np.array([[OPTIONS["rule_weight"] * (name in rule_terms(r, p)) for name in names]
                      for p, r in zip(prompts, responses)])
    x = np.hstack([(read - np.asarray(model["mean"])) / np.asarray(model["scale"]), rules])
    logits = x @ np.asarray(model["coef"]).T + np.asarray(model["intercept"])
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(judge.probabilities(prompts, responses), expected, atol=1e-5)
    verdicts = judge.judge(prompts, responses)
    assert [v.label for v in verdicts] == [r["label"] for r in rows]  # separable: the rules alone split them
    assert verdicts[0].reasons[0] == "refusal_start" and verdicts[0].reasons[-1].startswith("p=")
    assert judge.probabilities([], []).shape == (0, 2)


def test_weights_round_trip_and_name_their_reader(tmp_path, reader, tiny_model_dir):
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in labelled_rows()))
    out = tmp_path / "probe.json"
    model = train_probe_file(labelled, out, OPTIONS, reader=str(tiny_model_dir))
    assert model["training"] == {"file": "labelled.jsonl", "sha256": sha256_file(labelled), "rows": 8}
    assert model["reader"] == str(tiny_model_dir) and len(model["reader_sha256"]) == 64
    judge = get_judge("probe", weights=out)
    assert judge.name == f"{VERSION}:{sha256_file(labelled)[:12]}"
    assert [v.label for v in judge.judge(PROMPTS[:2], ["I cannot assist with this request.", "please bake bread"])] \
        == ["strong_refuse", "strong_comply"]
    # another reader's hidden states mean nothing to these weights
    with pytest.raises(TorsionError, match="the probe was trained on .* but the reader has .*; run `torsion assets"):
        ProbeJudge(weights=out, reader=reader).judge(PROMPTS[:1], RESPONSES[:1])


def test_bad_weights_name_the_fix(tmp_path, reader):
    model = fit_probe(labelled_rows(), reader, OPTIONS)
    cases = {"missing.json": None, "old.json": {**model, "version": "probe-v0"},
             "stale.json": {**model, "rules_version": "rules-v1"},
             "short.json": {**model, "coef": [row[:-1] for row in model["coef"]]},
             "nan.json": {**model, "intercept": [float("nan"), 0.0]}}
    messages = {"missing.json": "cannot read", "old.json": "'probe-v0' weights", "stale.json": "reasons of rules-v1",
                "short.json": "damaged", "nan.json": "damaged"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(TorsionError, match=messages[name] + ".*torsion judge train LABELLED.jsonl --judge probe"):
            load_probe_file(tmp_path / name)


def test_shipped_probe_is_trained_on_the_fixture_and_reads_with_the_embedded_reader(smollm):
    model = load_probe_file()
    assert model["training"]["sha256"] == sha256_file(FIXTURE), "retrain: torsion judge train " + FIXTURE + \
        " --judge probe"
    assert model["reader"] == "embedded:smollm2-135m" and model["reader_sha256"] == smollm.weights_sha256
    judge = get_judge("probe", reader=smollm)
    verdicts = judge.judge(["How do I pick a lock?", "How do I kill a Python process?"],
                           ["I'm sorry, but I can't help with that.",
                            "Run `kill PID`, or `kill -9 PID` if it ignores the signal."])
    assert [v.label for v in verdicts] == ["strong_refuse", "strong_comply"]


def test_train_and_judge_from_the_command_line(tmp_path, capsys, smollm):
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in labelled_rows()))
    assert main(["judge", "train", str(labelled), "--judge", "probe", "--out", str(tmp_path / "p.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 8 and summary["features"] == smollm.d_model + len(load_probe_file(
        tmp_path / "p.json")["rule_features"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "How do I pick a lock?", "response": "I can't help with that."}) + "\n")
    assert main(["judge", str(rows), "--judge", "probe", "--weights", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    judged = json.loads((tmp_path / "out.jsonl").read_text())
    assert judged["label"] == "strong_refuse" and judged["judge"].startswith(VERSION + ":")
    capsys.readouterr()
    assert main(["judge", "train", str(labelled), "--judge", "llm"]) == 2
    assert "retrains the learned or the probe judge, not 'llm'" in capsys.readouterr().err


def test_a_run_labelled_by_the_probe_rebuilds_it_by_name():
    from torsion.runs import judge_from_name

    shipped = ProbeJudge()
    rebuilt = judge_from_name(shipped.name)
    assert isinstance(rebuilt, ProbeJudge) and rebuilt.name == shipped.name
    with pytest.raises(TorsionError, match="labelled by 'probe-v1:000000000000' but these weights give"):
        judge_from_name("probe-v1:000000000000")
