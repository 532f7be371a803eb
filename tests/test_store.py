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
