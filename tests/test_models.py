import pytest

from torsion import assets
from torsion.errors import TorsionError
from torsion.models import load_model


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown model spec 'nonsense'"),
    ("embedded:gpt5", "unknown embedded model 'gpt5'; choose one of embedded:qwen2.5-coder-0.5b"),
    ("missing.gguf", "GGUF file missing.gguf does not exist"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(TorsionError, match=message):
        load_model(spec)


def test_embedded_model_not_cached_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORSION_CACHE", str(tmp_path))
    with pytest.raises(TorsionError, match=r"not cached; run `torsion assets pull`"):
        load_model("embedded:smollm2-135m")


def test_directory_without_config(tmp_path):
    with pytest.raises(TorsionError, match="has no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(TorsionError, match="unknown dtype 'float8'"):
        load_model("embedded:smollm2-135m", dtype="float8")


def test_sha256_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert assets.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
