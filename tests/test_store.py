import json

import pytest

from torsion.store import RunDir, append_jsonl, atomic_write_json, read_jsonl


def test_append_and_read_jsonl_drop_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    with open(path, "a") as handle:
        handle.write('{"id": "c", "resp')  # a kill in the middle of a line
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    append_jsonl(path, [{"id": "d"}])  # the torn line is cut before appending
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "d"]
    assert path.read_text().count("\n") == 3


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_stage_marks_done_only_when_the_body_returns(tmp_path):
    run = RunDir(tmp_path)
    with run.stage("prompts"):
        pass
    assert run.stage_done("prompts")
    with pytest.raises(RuntimeError):
        with run.stage("generate"):
            raise RuntimeError("killed")
    assert not run.stage_done("generate")
    assert run.manifest()["stages"]["prompts"]["seconds"] >= 0


def test_a_finished_stage_invalidates_its_downstream(tmp_path):
    run = RunDir(tmp_path)
    with run.stage("report"):
        pass
    with run.stage("analysis", invalidates=("report",)):
        pass
    assert run.stage_done("analysis") and not run.stage_done("report")


def test_run_dir_creates_nothing_until_the_first_write(tmp_path):
    run = RunDir(tmp_path / "typo")
    assert run.manifest() == {} and read_jsonl(run.responses_path) == [] and not run.root.exists()
    run.update_manifest(seed=1)  # a writer creates it
    assert run.manifest() == {"seed": 1}


@pytest.mark.parametrize("content, message", [
    ('{"seed": 1,\n"x": }', r"manifest\.json line 2 is not valid JSON \(Expecting value\); fix it by hand"),
    ("[]", r"manifest\.json holds a JSON list, not an object"),
    (b'{"seed": "\xff"}', r"manifest\.json line 1 is not UTF-8"),
])
def test_a_damaged_manifest_names_file_line_and_fix(tmp_path, content, message):
    from torsion.errors import TorsionError

    path = tmp_path / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TorsionError, match=message):
        RunDir(tmp_path).manifest()


def test_read_responses_names_the_line_of_a_bad_row(tmp_path):
    from torsion.errors import TorsionError
    from torsion.store import read_responses

    path = tmp_path / "responses.jsonl"
    good = {"id": "a", "label": "strong_refuse", "score": 1.0}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "score": "high"}) + "\n")
    with pytest.raises(TorsionError, match=r"responses\.jsonl line 3 needs a string 'id' and 'label' and a number"):
        read_responses(path)
    path.write_text(json.dumps(good) + "\n[1]\n")
    with pytest.raises(TorsionError, match=r"line 2 holds a JSON list, not an object; fix that line: each row is one"):
        read_responses(path)
    path.write_text(json.dumps(good) + '\n{"id": "b", "lab')  # a torn append is still dropped, not an error
    assert read_responses(path) == [good]
