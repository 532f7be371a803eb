"""Fuzzing every file loader a user or a damaged run directory can feed torsion.

Property: any input gives either a valid result or a :class:`TorsionError` whose message is one
line; never another exception. Loaders that also write leave the complete output or nothing.
Each test is bounded (``max_examples`` below, no deadline) so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from torsion.cli import main
from torsion.data.files import load_prompt_file
from torsion.data.records import Prompt, read_prompts_jsonl
from torsion.errors import TorsionError
from torsion.interop import export_control_vector_gguf, import_control_vector_gguf
from torsion.store import RunDir, read_json, read_jsonl, read_responses
from torsion.vectors import SteeringVector, load_run_meta, load_vectors

FUZZ = settings(max_examples=60, deadline=None, database=None,  # nothing written into the repository
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values, including the awkward ones: lone surrogates, deep nesting, huge numbers, odd keys.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
field_names = st.sampled_from(["prompt", "category", "id", "label", "score", "response", "split", "source",
                               "prompt_hash", "x"])
rows = st.dictionaries(field_names, json_values | st.text(max_size=30), max_size=6)
prompt_rows = st.fixed_dictionaries({"prompt": st.text(max_size=30)},
                                    optional={"category": st.text(max_size=8) | scalars | json_values})
awkward_lines = st.sampled_from([
    "[" * 5000 + "]" * 5000, "1" * 5000, '"\\ud800"', '{"prompt": "\\udfff"}', "\x00", "\ufeff{}", "{}\r",
    '{"prompt": "a", "category": {"b": 1}}', "NaN", "-Infinity", '{"prompt": "ok"}',
])
lines = st.lists(st.one_of(prompt_rows.map(json.dumps), prompt_rows.map(json.dumps), rows.map(json.dumps),
                           json_values.map(json.dumps), awkward_lines, st.text(max_size=40)), max_size=8)


def _one_line_error(call):
    """Run ``call``; return its result, or None after checking a TorsionError is one line."""
    try:
        return call()
    except TorsionError as error:
        message = str(error)
        assert message and message == " ".join(message.splitlines()) and len(message.splitlines()) == 1
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----- prompt files: .csv, .json, .jsonl -----

def _check_prompts(prompts: list[Prompt] | None) -> None:
    for prompt in prompts or []:
        assert isinstance(prompt, Prompt) and prompt.prompt.strip() and isinstance(prompt.category, str)
        prompt.prompt.encode("utf-8"), prompt.category.encode("utf-8")  # writable to prompts.jsonl


@FUZZ
@given(suffix=st.sampled_from([".csv", ".json", ".jsonl"]), data=st.binary(max_size=300))
@example(suffix=".csv", data=b'prompt,category\n"a\x00b",c\n')
@example(suffix=".csv", data=b'prompt\n"unterminated\n')
@example(suffix=".json", data=b"[" * 3000)
@example(suffix=".jsonl", data=b'{"prompt": "\\ud800 x"}\n')
def test_prompt_files_from_arbitrary_bytes(scratch, suffix, data):
    path = _write(scratch / f"prompts{suffix}", data)
    _check_prompts(_one_line_error(lambda: load_prompt_file(path)))


@FUZZ
@given(suffix=st.sampled_from([".json", ".jsonl", ".csv"]), body=lines)
def test_prompt_files_from_structured_rows(scratch, suffix, body):
    path = scratch / f"structured{suffix}"
    if suffix == ".json":
        path.write_text("[" + ",".join(line for line in body if line.strip()) + "]", encoding="utf-8",
                        errors="surrogatepass")
    elif suffix == ".jsonl":
        path.write_text("\n".join(body), encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text("prompt,category\n" + "\n".join(body), encoding="utf-8", errors="surrogatepass")
    _check_prompts(_one_line_error(lambda: load_prompt_file(path)))


# ----- JSONL in the run directory: responses.jsonl, prompts.jsonl, any appended file -----

@FUZZ
@given(data=st.binary(max_size=300) | lines.map(lambda b: "\n".join(b).encode("utf-8", "surrogatepass")))
@example(data=b'{"id": "a", "label": "strong_refuse", "score": 1}\n{"id": \n')
@example(data=b'{"id": "a", "label": "x", "score": true}\n')
@example(data=b"1\n2\n")
def test_run_jsonl_readers(scratch, data):
    path = _write(scratch / "rows.jsonl", data)
    rows = _one_line_error(lambda: read_jsonl(path))
    assert rows is None or all(isinstance(row, dict) for row in rows)
    responses = _one_line_error(lambda: read_responses(path))
    for row in responses or []:
        assert isinstance(row["id"], str) and isinstance(row["label"], str)
        assert row.get("score") is None or isinstance(row["score"], (int, float))
    prompts = _one_line_error(lambda: read_prompts_jsonl(path))
    assert prompts is None or all(isinstance(p.prompt, str) and p.split in ("train", "holdout") for p in prompts)


# ----- JSON objects in the run directory: manifest.json, analysis/<name>.json -----

@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
@example(data=b"[" * 5000)
@example(data=b"9" * 5000)
@example(data=b'{"seed": 0,\n "model": ')
def test_run_json_readers(scratch, data):
    run = scratch / "run"
    run.mkdir(exist_ok=True)
    _write(run / "manifest.json", data)
    manifest = _one_line_error(lambda: RunDir(run).manifest())
    assert manifest is None or isinstance(manifest, dict)
    analysis = _write(scratch / "analysis.json", data)
    assert _one_line_error(lambda: read_json(analysis)) == manifest  # one reader for every run-dir JSON object


# ----- vector files: safetensors -----

dtypes = st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                          torch.bool, torch.uint8])
shapes = st.lists(st.integers(1, 4), min_size=2, max_size=2) | st.lists(st.integers(0, 4), max_size=3)
metadata_values = (st.dictionaries(st.text(max_size=5), scalars, max_size=3).map(json.dumps)
                   | st.text(max_size=20) | json_values.map(json.dumps))


@st.composite
def safetensors_files(draw) -> bytes:
    tensors = {}
    for key in draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
                             max_size=3, unique=True)):
        shape = draw(shapes)
        values = torch.tensor(draw(st.lists(st.floats(-4, 4, width=32) | st.floats(width=32) | st.integers(-3, 3),
                                            min_size=int(torch.Size(shape).numel()),
                                            max_size=int(torch.Size(shape).numel()))), dtype=torch.float64)
        tensors[key] = values.reshape(shape).to(draw(dtypes))
    metadata = draw(st.dictionaries(st.sampled_from(["torsion:run", "torsion:version"]
                                                    + [f"meta:{key}" for key in tensors]), metadata_values))
    return safetensors_bytes(tensors, metadata or None)


@FUZZ
@given(data=st.binary(max_size=200) | safetensors_files())
@example(data=struct.pack("<Q", 2 ** 60) + b"{}")
@example(data=b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
def test_vector_files(scratch, data):
    path = _write(scratch / "v.safetensors", data)
    vectors = _one_line_error(lambda: load_vectors(path))
    for vector in (vectors or {}).values():
        assert isinstance(vector, SteeringVector) and vector.n_layers >= 1 and vector.d_model >= 1
        assert vector.directions.dtype == torch.float32 and bool(torch.isfinite(vector.directions).all())
        assert isinstance(vector.meta, dict)
    _one_line_error(lambda: load_vectors(path, d_model=2))
    meta = _one_line_error(lambda: load_run_meta(path))
    assert meta is None or isinstance(meta, dict)


# ----- llama.cpp control vectors (GGUF), through the library and through `torsion vector import-gguf` -----

@pytest.fixture(scope="module")
def valid_gguf(scratch) -> bytes:
    directions = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4) / 7
    return export_control_vector_gguf(SteeringVector(directions, {}), scratch / "valid.gguf",
                                      model_hint="llama").read_bytes()


def _check_import(scratch: Path, path: Path) -> None:
    vector = _one_line_error(lambda: import_control_vector_gguf(path))
    if vector is not None:
        assert vector.n_layers >= 1 and vector.d_model >= 1 and bool(torch.isfinite(vector.directions).all())
    out = scratch / "imported" / "v.safetensors"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    code = main(["vector", "import-gguf", str(path), "--out", str(out)])
    assert code in (0, 2)
    assert out.is_file() == (code == 0)  # the output is whole (it loads) or absent
    if code == 0:
        assert torch.equal(load_vectors(out)["vector"].directions, vector.directions)
    assert [p.name for p in out.parent.iterdir()] in ([], ["v.safetensors"])  # no temp files left


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
def test_gguf_from_arbitrary_bytes(scratch, data, capsys):
    _check_import(scratch, _write(scratch / "any.gguf", data))
    capsys.readouterr()


@FUZZ
@given(data=st.data())
def test_gguf_truncated_or_flipped(scratch, valid_gguf, data, capsys):
    cut = data.draw(st.integers(1, len(valid_gguf)))
    damaged = bytearray(valid_gguf[:cut])
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    _check_import(scratch, _write(scratch / "damaged.gguf", bytes(damaged)))
    capsys.readouterr()


@st.composite
def control_vector_ggufs(draw) -> bytes:
    """Well-formed GGUF files with arbitrary tensors: odd names, layer indices, dtypes, shapes, values."""
    import tempfile

    import gguf
    import numpy as np

    names = st.sampled_from(["direction.0", "direction.1", "direction.3", "direction.999999", "direction.-1",
                             "direction.\u00b2", "direction.", "direction.01", "other.0"])
    with tempfile.TemporaryDirectory() as folder, np.errstate(all="ignore"):  # casts of inf/nan are the point
        path = Path(folder) / "v.gguf"
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", draw(st.text(max_size=10)))
        for name in draw(st.lists(names, max_size=4, unique=True)):
            width = draw(st.integers(1, 5))
            values = np.array(draw(st.lists(st.floats(-4, 4, width=32) | st.floats(width=32), min_size=width,
                                              max_size=width)), dtype=np.float32)
            kind = draw(st.sampled_from(["f32", "f32", "f32", "f16", "i32", "2d", "q8"]))
            if kind == "f16":
                writer.add_tensor(name, values.astype(np.float16))
            elif kind == "i32":
                writer.add_tensor(name, values.astype(np.int64).clip(-9, 9).astype(np.int32))
            elif kind == "2d":
                writer.add_tensor(name, np.stack([values, values]))
            elif kind == "q8":  # 34 raw bytes: one Q8_0 block of 32 weights
                writer.add_tensor(name, np.zeros(34, dtype=np.uint8), raw_shape=(34,),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@FUZZ
@given(data=control_vector_ggufs())
def test_gguf_with_arbitrary_tensors(scratch, data, capsys):
    _check_import(scratch, _write(scratch / "tensors.gguf", data))
    capsys.readouterr()


def test_gguf_export_leaves_no_partial_file_when_it_fails(scratch, monkeypatch):
    import gguf

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    out = scratch / "export" / "v.gguf"
    with pytest.raises(OSError):
        export_control_vector_gguf(SteeringVector(torch.ones(2, 3), {}), out, model_hint="x")
    assert list(out.parent.iterdir()) == []


# ----- `torsion judge IN --out OUT`: reads a user's JSONL, appends judged rows -----

judge_rows = st.fixed_dictionaries({"prompt": st.text(max_size=20), "response": st.text(max_size=30)},
                                   optional={"id": st.text(max_size=4) | st.integers(0, 3)})


@FUZZ
@given(body=st.lists(st.one_of(judge_rows.map(json.dumps), judge_rows.map(json.dumps), rows.map(json.dumps),
                               awkward_lines, st.text(max_size=20)), max_size=6))
@example(body=['{"prompt": "p", "response": "r", "id": []}'])  # found by this test: an unhashable id
def test_judge_command_reads_any_jsonl_and_appends_whole_rows(scratch, body, capsys):
    source = scratch / "judge-in.jsonl"
    source.write_text("\n".join(body), encoding="utf-8", errors="surrogatepass")
    out = scratch / "judge-out.jsonl"
    out.unlink(missing_ok=True)
    code = main(["judge", str(source), "--judge", "rules", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (0, 2)
    if code == 2:
        assert len(err) == 1 and err[0].startswith("torsion: error: ")
    for row in read_jsonl(out):  # whatever was written is whole, judged rows
        assert row["label"] and "prompt" in row and "response" in row


labelled_rows = st.fixed_dictionaries({"label": st.sampled_from(["strong_refuse", "weak_refuse", "weak_comply",
                                                                 "strong_comply", "degenerate", "judge_error",
                                                                 "maybe"]) | st.text(max_size=5)},
                                      optional={"id": st.sampled_from(["a", "b", "c"]) | json_values,
                                                "judge": st.text(max_size=3)})


@FUZZ
@given(a=st.lists(st.one_of(labelled_rows.map(json.dumps), awkward_lines), max_size=5),
       b=st.lists(st.one_of(labelled_rows.map(json.dumps), awkward_lines), max_size=5))
@example(a=['{"id": {}, "label": "weak_comply"}'], b=['{"id": "a", "label": "weak_comply"}'])
def test_judge_agree_reads_any_pair_of_files(scratch, a, b, capsys):
    paths = []
    for name, body in (("agree-a.jsonl", a), ("agree-b.jsonl", b)):
        path = scratch / name
        path.write_text("\n".join(body) + "\n", encoding="utf-8", errors="surrogatepass")
        paths.append(str(path))
    code = main(["judge", "agree", *paths])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0 or (code == 2 and len(err) == 1 and err[0].startswith("torsion: error: "))


labelled_rows = st.fixed_dictionaries({"prompt": st.text(max_size=20), "response": st.text(max_size=30),
                                       "label": st.sampled_from(["strong_refuse", "strong_comply", "weak_comply",
                                                                 "degenerate", "nonsense"]) | scalars})


@FUZZ
@given(data=st.binary(max_size=300) | st.lists(labelled_rows.map(json.dumps) | rows.map(json.dumps)
                                               | awkward_lines, max_size=6).map(lambda ls: "\n".join(ls).encode()))
def test_labelled_file_loader(scratch, data):
    from torsion.judge.learned import read_labelled

    path = scratch / "labelled.jsonl"
    path.write_bytes(data)
    got = _one_line_error(lambda: read_labelled(path))
    if got is not None:
        assert all(isinstance(r["prompt"], str) and isinstance(r["response"], str) for r in got)


def _weights_variants():
    """Valid learned-judge weights (a tiny fit) with any one field replaced by an arbitrary JSON value."""
    from torsion.judge.learned import fit

    good = fit([{"prompt": "p", "response": "I cannot help with that.", "label": "strong_refuse"},
                {"prompt": "p", "response": "Sure, here is how.", "label": "strong_comply"}] * 3,
               {"min_df": 1})
    keys = st.sampled_from(sorted(good))
    return st.builds(lambda key, value: {**good, key: value}, keys, json_values) | st.just(good)


@FUZZ
@given(data=st.binary(max_size=200).map(lambda b: ("bytes", b)) | _weights_variants().map(lambda w: ("json", w))
       | json_values.map(lambda w: ("json", w)))
def test_learned_judge_weights_loader(scratch, data):
    from torsion.judge.learned import LearnedJudge

    kind, value = data
    path = scratch / "weights.json"
    path.write_bytes(value if kind == "bytes" else json.dumps(value).encode())
    judge = _one_line_error(lambda: LearnedJudge(path))
    if judge is not None:  # a usable judge labels a response
        (verdict,) = judge.judge(["a prompt"], ["I cannot help with that."])
        assert verdict.label in judge.classes


# ----- a multi-objective front file: torsion orthogonalize --from-study -----

@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"points": st.lists(st.dictionaries(st.sampled_from(
           ["heldout", "train", "method_params", "trial"]), json_values, max_size=4), max_size=3)},
           optional={"study": json_values, "vector_key": json_values}).map(lambda v: json.dumps(v).encode()))
@example(data=b'{"points": [{"heldout": {}}]}')
@example(data=b'{"points": [1]}')
def test_front_file_loader(scratch, data):
    from torsion.optimize_multi import load_front

    run = scratch / "front-run"
    (run / "analysis").mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text("{}")
    _write(run / "analysis" / "front_s.json", data)
    loaded = _one_line_error(lambda: load_front(run / "s"))
    assert loaded is None or isinstance(loaded[1]["points"][0]["heldout"]["refusal_rate"], (int, float))
