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


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_weights_hash_is_the_sha256_of_the_sorted_listing_of_weight_files(tmp_path):
    from torsion.weights import weights_sha256

    model = tmp_path / "model"
    model.mkdir()
    (model / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (model / "model-00001-of-00002.safetensors").write_bytes(b"first shard")
    (model / "pytorch_model.bin").write_bytes(b"ignored: safetensors take precedence")
    (model / "config.json").write_text("{}")
    listing = (f"{_sha(b'first shard')}  model-00001-of-00002.safetensors\n"
               f"{_sha(b'second shard')}  model-00002-of-00002.safetensors\n")  # `sha256sum model-*` format
    assert weights_sha256(model, cache_dir=tmp_path / "cache") == _sha(listing.encode())
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "pytorch_model.bin").write_bytes(b"weights")
    (bins / "training_args.bin").write_bytes(b"not weights")
    expected = _sha(f"{_sha(b'weights')}  pytorch_model.bin\n".encode())
    assert weights_sha256(bins, cache_dir=tmp_path / "cache") == expected
    with pytest.raises(TorsionError, match="holds no .*weight files"):
        weights_sha256(tmp_path / "cache", cache_dir=tmp_path / "cache")


def test_weights_hash_cache_is_keyed_by_path_size_and_mtime(tmp_path):
    import json
    import os

    from torsion.weights import weights_sha256

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"abc")
    cache_dir = tmp_path / "cache"
    expected = _sha(f"{_sha(b'abc')}  model.safetensors\n".encode())
    assert weights_sha256(model, cache_dir=cache_dir) == expected
    cache_file = cache_dir / "weights_sha256.json"
    cache = json.loads(cache_file.read_text())  # JSON, keyed by the real path
    entry = cache[str(weights.resolve())]
    assert entry["sha256"] == _sha(b"abc") and entry["size"] == 3
    entry["sha256"] = "0" * 64  # a planted digest proves the next call reads the cache
    cache_file.write_text(json.dumps(cache))
    assert weights_sha256(model, cache_dir=cache_dir) == _sha(f"{'0' * 64}  model.safetensors\n".encode())
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size, newer mtime: rehash
    assert weights_sha256(model, cache_dir=cache_dir) == expected
    cache_file.write_text("{not json")  # a corrupt cache is only a cache
    assert weights_sha256(model, cache_dir=cache_dir) == expected


def test_local_directory_and_hub_id_models_carry_a_weights_hash(tmp_path, monkeypatch, tiny_model_dir):
    from torsion.weights import hub_weights_sha256, weights_sha256

    monkeypatch.setenv("TORSION_CACHE", str(tmp_path / "torsion-cache"))
    lm = load_model(str(tiny_model_dir))
    expected = _sha(f"{assets.sha256_file(tiny_model_dir / 'model.safetensors')}  model.safetensors\n".encode())
    assert lm.weights_sha256 == expected == weights_sha256(tiny_model_dir)
    # a Hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert hub_weights_sha256("tiny-org/tiny-llama", cache_dir=tmp_path / "hub") == expected
    with pytest.warns(UserWarning, match="no weights hash for tiny-org/other"):
        assert hub_weights_sha256("tiny-org/other", cache_dir=tmp_path / "hub") is None
