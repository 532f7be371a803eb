import json
import subprocess
import sys

import pytest

from torsion.cli import main
from torsion.errors import TorsionError


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "torsion.cli", *args], capture_output=True, text=True, env=env)


def test_help_teaches():
    result = _run("--help")
    assert result.returncode == 0
    assert "torsion run --profile smoke" in result.stdout and "resumes" in result.stdout
    run_help = _run("run", "--help").stdout
    for option in ("--profile", "--model", "--out", "--device", "--dtype"):
        assert option in run_help


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "nonsense", "--out", "{tmp}"], "unknown model spec 'nonsense'"),
    (["run", "--model", "embedded:gpt5", "--out", "{tmp}"], "unknown embedded model 'gpt5'"),
])
def test_bad_input_is_one_line_with_exit_2(tmp_path, capsys, args, message):
    code = main([a.replace("{tmp}", str(tmp_path / "run")) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("torsion: error: ") and message in err[-1]


def test_missing_assets_while_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORSION_CACHE", str(tmp_path / "empty-cache"))
    code = main(["run", "--profile", "smoke", "--model", "embedded:smollm2-135m", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "not cached; run `torsion assets pull`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import tiny_lm

    path = tmp_path_factory.mktemp("tiny")
    lm = tiny_lm("llama", n_layers=4)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory):
    import torch

    from torsion.vectors import SteeringVector

    root = tmp_path_factory.mktemp("vectors")
    SteeringVector(torch.ones(4, 32), {"model_id": "tiny"}).save(root / "ok.safetensors")
    SteeringVector(torch.ones(4, 48), {"model_id": "other"}).save(root / "wide.safetensors")
    (root / "empty.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--layers", "1", "--alpha", "nan"], "argument --alpha: 'nan' is not a finite number; pass a finite number"),
    (["--layers", "9", "--alpha", "1"], "layer 9 is out of range; this model has blocks 0..3"),
    (["--layers", "1", "--alpha", "1", "--vector", "{v}/wide.safetensors"], "d_model=48 but the model has 32"),
    (["--layers", "1", "--alpha", "1", "--vector", "{v}/empty.safetensors"], "is empty"),
])
def test_steer_bad_input(tiny_dir, vector_files, capsys, extra, message):
    args = ["steer", "--model", str(tiny_dir), "--vector", str(vector_files / "ok.safetensors"), "--prompt", "hello"]
    code = main(args + [a.replace("{v}", str(vector_files)) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("torsion: error: ")


def test_steer_writes_alpha_and_applied_norm(tiny_dir, vector_files, tmp_path):
    import json

    out = tmp_path / "steered.jsonl"
    code = main(["steer", "--model", str(tiny_dir), "--vector", str(vector_files / "ok.safetensors"),
                 "--prompt", "hello", "--layers", "1", "2", "--alpha", "0.5", "-2", "--max-new-tokens", "3",
                 "--out", str(out)])
    row = json.loads(out.read_text())
    assert code == 0 and row["alpha"] == [0.5, -2.0] and row["layers"] == [1, 2]
    assert row["applied_norm"] == pytest.approx([0.5 * 32 ** 0.5, 2 * 32 ** 0.5])


def test_judge_command_labels_resumes_and_rejects_bad_rows(tmp_path, capsys):
    import json

    rows = [{"id": "a", "prompt": "How do I bake bread?", "response": "Mix flour, water and yeast, then bake."},
            {"id": "b", "prompt": "How do I rob a bank?", "response": "I'm sorry, but I can't help with that."}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["judge", str(source), "--judge", "rules", "--out", str(out)]) == 0
    judged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in judged] == ["strong_comply", "strong_refuse"]
    assert main(["judge", str(source), "--judge", "rules", "--out", str(out)]) == 0  # nothing left to judge
    assert len(out.read_text().splitlines()) == 2 and "0 judged (2 already" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "c", "prompt": "x"}\n')
    assert main(["judge", str(bad), "--out", str(tmp_path / "o2.jsonl")]) == 2
    assert "row 1 has no string 'response'" in capsys.readouterr().err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert main(["judge", str(latin), "--out", str(tmp_path / "o3.jsonl")]) == 2
    assert "is not UTF-8" in capsys.readouterr().err


# ----- every bad input is one line and a non-zero exit, never a traceback -----

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["steer", "--vector", "{v}/ok.safetensors", "--prompt", "hi", "--layers", "1", "--alpha", "1", "--limit", "0"],
     "argument --limit: '0' is not a whole number >= 1"),
    (["steer", "--vector", "{v}/ok.safetensors", "--prompt", "hi", "--layers", "1", "--alpha", "1",
      "--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
    (["steer", "--vector", "{v}/ok.safetensors", "--prompt", " ", "--layers", "1", "--alpha", "1"],
     "argument --prompt: ' ' is not non-empty text"),
    (["steer", "--vector", "{v}/absent.safetensors", "--prompt", "hi", "--layers", "1", "--alpha", "1"],
     "absent.safetensors does not exist; pass an existing file"),
    (["steer", "--vector", "{v}/ok.safetensors", "--prompt", "hi", "--layers", "-1", "--alpha", "1"],
     "argument --layers: '-1' is not a block index >= 0"),
    (["steer", "--vector", "{v}/ok.safetensors", "--prompt", "hi", "--layers", "1", "--alpha", "1e999"],
     "'1e999' is not a finite number"),
    (["optimize", "{run}", "--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
    (["optimize", "{run}", "--layer-window", "0.2", "1.5"], "'1.5' is not a fraction between 0 and 1"),
    (["optimize", "{run}", "--storage", "nonsense"], "is not a database URL"),
    (["analyze", "propagation", "{run}", "--n-prompts", "0"], "argument --n-prompts: '0' is not a whole number >= 1"),
    (["analyze", "rotation", "{run}", "--bootstrap", "0"], "argument --bootstrap: '0' is not a whole number >= 1"),
    (["analyze", "rotation", "{run}", "--seed", "-3"], "argument --seed: '-3' is not a whole number >= 0"),
    (["analyze", "rotation", "{run}", "--device", "gpu"], "is not cpu, cuda, cuda:N, mps or auto"),
    (["run", "--n-per-source", "0"], "argument --n-per-source: '0' is not a whole number >= 1"),
    (["run", "--max-new-tokens", "-4"], "argument --max-new-tokens"),
    (["vector", "info", "{v}/absent.safetensors"], "does not exist; pass an existing file"),
    (["vector", "import-gguf", "{v}/ok.safetensors", "--n-layers", "0"], "argument --n-layers"),
    (["serve", "--port", "99999"], "is not a port number 0..65535"),
    (["review", "{v}"], "has no manifest.json; pass a directory made by `torsion run`"),
    (["judge", "in.jsonl", "--samples", "0"], "argument --samples"),
    (["orthogonalize", "--vector", "{v}/ok.safetensors", "--layer", "-2", "--out", "x"], "argument --layer"),
    (["analyze", "nonsense", "{run}"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_fail_as_parsed_in_one_line(vector_files, finished_tiny_run, capsys, args, message):
    code = main([a.replace("{v}", str(vector_files)).replace("{run}", str(finished_tiny_run)) for a in args])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith("torsion: error: ") and message in line, line
    assert "--help`" in line  # the fix: where the option is explained


def test_analyze_a_mistyped_directory_creates_nothing(tmp_path, capsys):
    from torsion.analysis.rotation import run_rotation

    typo = tmp_path / "typo-dir"
    assert main(["analyze", "rotation", str(typo)]) == 2
    assert "typo-dir does not exist" in _one_error_line(capsys) and not typo.exists()
    with pytest.raises(TorsionError):
        run_rotation(typo)  # the library reads too: no directory appears
    assert not typo.exists()


def test_analyze_without_activations_names_the_missing_file(tiny_run, capsys):
    (tiny_run / "activations.safetensors").unlink()
    assert main(["analyze", "rotation", str(tiny_run)]) == 2
    line = _one_error_line(capsys)
    assert "has no activations.safetensors, which `torsion analyze rotation` reads" in line


@pytest.mark.parametrize("name", ["categories", "random-control", "propagation"])
def test_analyze_layers_past_the_model_are_refused_before_loading(finished_tiny_run, capsys, name):
    assert main(["analyze", name, str(finished_tiny_run), "--layers", "2", "99"]) == 2
    assert "--layers 99 is out of range; the run's model has blocks 0..3" in _one_error_line(capsys)


@pytest.mark.parametrize("file, content, message", [
    ("manifest.json", '{"seed": 0,\n  "model": ', "manifest.json line 2 is not valid JSON"),
    ("manifest.json", "[1, 2]", "manifest.json holds a JSON list, not an object"),
    ("responses.jsonl", None, "responses.jsonl line 2 is not valid JSON"),
    ("responses.jsonl", '{"label": "strong_refuse", "score": 1}\n', "responses.jsonl line 1 needs a string 'id'"),
    ("prompts.jsonl", '{"id": 3}\n', "prompts.jsonl line 1 lacks id, prompt, category"),
])
@pytest.mark.parametrize("analysis", ["rotation", "categories"])
def test_a_damaged_run_file_is_one_line_naming_file_and_line(tiny_run, capsys, file, content, message, analysis):
    path = tiny_run / file
    if content is None:  # damage the second line of the real file
        lines = path.read_text().splitlines(keepends=True)
        content = lines[0] + '{"id": "x", "label"\n' + "".join(lines[2:])
    path.write_text(content)
    assert main(["analyze", analysis, str(tiny_run)]) == 2
    line = _one_error_line(capsys)
    assert message in line and "; " in line, line  # the problem, then the fix


def test_steer_on_an_empty_prompt_file(tiny_dir, vector_files, tmp_path, capsys):
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    code = main(["steer", "--model", str(tiny_dir), "--vector", str(vector_files / "ok.safetensors"),
                 "--prompts", str(empty), "--layers", "1", "--alpha", "1"])
    assert code == 2 and "holds no prompts" in _one_error_line(capsys)


def test_judge_agree_on_a_missing_file_says_so(tmp_path, capsys):
    present = tmp_path / "a.jsonl"
    present.write_text('{"id": "1", "label": "strong_refuse"}\n')
    assert main(["judge", "agree", str(present), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in _one_error_line(capsys)


@pytest.mark.parametrize("raised, code, message", [
    (ZeroDivisionError("division by zero"), 1,
     "torsion: internal error: ZeroDivisionError: division by zero; this is a bug in torsion: rerun with --debug"),
    (ValueError("two\nlines"), 1, "torsion: internal error: ValueError: two lines;"),
    (KeyboardInterrupt(), 130, "torsion: interrupted; run the same command again to resume"),
    (PermissionError(13, "Permission denied", "/root/x"), 2,
     "torsion: error: Permission denied (/root/x); check the path"),
    (TorsionError("bad\ninput; fix it"), 2, "torsion: error: bad input; fix it"),
    (ConnectionRefusedError(111, "Connection refused"), 2,
     "torsion: error: ConnectionRefusedError: [Errno 111] Connection refused; check the address and port"),
    (OSError("no file, no network"), 1, "torsion: internal error: OSError: no file, no network;"),
])
def test_the_boundary_reports_any_exception_in_one_line(monkeypatch, capsys, raised, code, message):
    from torsion import commands

    def fail(args):
        raise raised

    monkeypatch.setattr(commands, "assets", fail)
    assert main(["assets", "list"]) == code
    assert _one_error_line(capsys).startswith(message)
    for argv in (["--debug", "assets", "list"], ["assets", "list", "--debug"]):
        assert main(argv) == code
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(message)


# ----- item 7: the analyses use the run's seed; a user's 0 is never the default -----

def test_analyze_rotation_uses_the_runs_seed(tiny_run, capsys):
    from torsion.store import RunDir

    RunDir(tiny_run).update_manifest(seed=7)
    small = ["--bootstrap", "5", "--permutations", "5", "--split-halves", "2"]
    assert main(["analyze", "rotation", str(tiny_run), *small]) == 0
    assert json.loads((tiny_run / "analysis" / "rotation.json").read_text())["seed"] == 7
    assert main(["analyze", "rotation", str(tiny_run), *small, "--seed", "3"]) == 0
    assert json.loads((tiny_run / "analysis" / "rotation.json").read_text())["seed"] == 3
    capsys.readouterr()


@pytest.mark.parametrize("seed_args, expected", [([], 7), (["--seed", "0"], 0)])
def test_analyze_arditi_uses_the_runs_seed(tiny_run, monkeypatch, seed_args, expected):
    import types

    import torsion.analysis.arditi
    import torsion.models
    import torsion.report
    from torsion.store import RunDir

    RunDir(tiny_run).update_manifest(seed=7)
    seen = {}

    def fake_arditi(run_dir, lm, *, component, alphas, n_neutral, seed):
        seen.update(seed=seed, n_neutral=n_neutral)
        return {"analysis": "arditi"}

    monkeypatch.setattr(torsion.analysis.arditi, "run_arditi", fake_arditi)
    monkeypatch.setattr(torsion.models, "load_model", lambda *a, **k: types.SimpleNamespace(n_layers=4))
    monkeypatch.setattr(torsion.report, "build_report", lambda run_dir: None)
    assert main(["analyze", "arditi", str(tiny_run), *seed_args]) == 0
    assert seen == {"seed": expected, "n_neutral": 48}


def test_analyze_a_component_the_run_did_not_fit_is_refused_before_loading(tiny_run, capsys):
    from torsion.vectors import load_vectors, save_vectors

    path = tiny_run / "vectors.safetensors"
    kept = {k: v for k, v in load_vectors(path).items() if k != "md/mlp"}
    save_vectors(path, kept, run_meta={})
    assert main(["analyze", "arditi", str(tiny_run), "--component", "mlp"]) == 2
    assert "has no vector 'md/mlp'; pass a --component the run fitted (attn, resid)" in _one_error_line(capsys)


def test_orthogonalize_checks_the_layer_with_the_shared_block_check(vector_files, tmp_path, capsys):
    assert main(["orthogonalize", "--vector", str(vector_files / "ok.safetensors"), "--layer", "4",
                 "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "--layer 4 is out of range; this model has blocks 0..3" in line and "not wrapped" in line
    assert not (tmp_path / "out").exists()
