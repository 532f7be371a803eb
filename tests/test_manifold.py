"""Manifold steering on tiny random models: knots, spline A/B, the file, coherence and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steering_helpers import PROMPTS, block_output
from tiny import tiny_lm
from torsion.capture import encode
from torsion.cli import main
from torsion.errors import TorsionError
from torsion.judge.base import LABEL_SCORES
from torsion.manifold.build import fit_manifold
from torsion.manifold.coherence import coherence_sweep, last_coherent_t
from torsion.manifold.file import load_manifold, save_manifold
from torsion.manifold.fit import fit_a, fit_b, leave_one_block_out
from torsion.manifold.knots import Knots, fit_knots
from torsion.steering import get_method, load_method
from torsion.steering.spline_a import SplineA
from torsion.steering.spline_b import SplineB

LABELS = ["strong_refuse"] * 8 + ["weak_refuse"] * 3 + ["weak_comply"] * 6 + ["strong_comply"] * 9


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", n_layers=4)


def _acts(n: int = len(LABELS), n_layers: int = 4, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, n_layers, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def knots():
    return fit_knots(_acts(), LABELS, [LABEL_SCORES[label] for label in LABELS], m=5)


def test_knots_by_hand():
    acts = _acts()
    scores = [LABEL_SCORES[label] for label in LABELS]
    knots = fit_knots(acts, LABELS, scores, m=5, neutral=_acts(5, seed=1))
    assert knots.bins == ("strong_refuse", "neutral", "weak_comply", "strong_comply")
    assert knots.t.tolist() == [0.0, 0.5, 0.75, 1.0]
    assert knots.dropped == ({"bin": "weak_refuse", "n": 3, "reason": "fewer than m=5 rows"},)
    torch.testing.assert_close(knots.centroids[0], acts[:8].mean(0))
    torch.testing.assert_close(knots.centroids[3], acts[17:].mean(0))
    # corrected scores move a bin's t: t = (1 - mean score) / 2
    scores[0] = 0.5
    assert fit_knots(acts, LABELS, scores, m=5).t[0].item() == pytest.approx((1 - (0.5 + 7) / 8) / 2)


def test_fewer_than_two_usable_knots_fails_in_one_line():
    labels = ["strong_refuse"] * 6 + ["strong_comply"] * 2
    with pytest.raises(TorsionError, match="only 1 behaviour bin") as error:
        fit_knots(_acts(8), labels, [LABEL_SCORES[label] for label in labels], m=5)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("n, d", [(40, 16), (10, 32)])
def test_pca_basis_matches_the_svd(n, d):
    from torsion.manifold.fit import pca_basis

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x -= x.mean(0)
    basis = pca_basis(x, 4).double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis.abs(), vh[:4].abs(), atol=1e-6, rtol=0)
    with pytest.raises(TorsionError, match="k=11 PCA dims"):
        pca_basis(x[:10], 11)


def _spline_a(knots, layers=(1, 2), **params) -> SplineA:
    fits = fit_a(knots, list(layers), k=4)
    return SplineA(tuple(layers), torch.stack([fits[l].basis for l in layers]), torch.stack([fits[l].mean for l in layers]),
                   torch.stack([fits[l].knots for l in layers]), fits[layers[0]].knots_t, positions="all", **params)


def _block_output(lm, layer, method=None, strength=0.0):
    return block_output(lm, encode(lm, PROMPTS), layer, method, strength).double()


def test_spline_a_at_a_knot_lands_on_it_and_keeps_the_complement(lm, knots):
    method = _spline_a(knots, layers=(1,))
    U, mu = method.basis[0].double(), method.mean[0].double()
    h = _block_output(lm, 1)
    for j, t in enumerate(method.knots_t.tolist()):
        steered = _block_output(lm, 1, method, t)
        coords = (steered - mu) @ U.T
        torch.testing.assert_close(coords, method.knots[0, j].double().expand_as(coords), atol=1e-5, rtol=0)
        complement = lambda x: x - (x @ U.T) @ U
        torch.testing.assert_close(complement(steered), complement(h), atol=1e-5, rtol=0)


def test_spline_a_mixing_moves_a_share_of_the_way(lm, knots):
    method = _spline_a(knots, layers=(1,), beta=0.25)
    U, mu = method.basis[0].double(), method.mean[0].double()
    z = (_block_output(lm, 1) - mu) @ U.T
    steered = (_block_output(lm, 1, method, 0.75) - mu) @ U.T
    target = method.targets(0.75)[0].double()
    torch.testing.assert_close(steered, z + 0.25 * (target - z), atol=1e-5, rtol=0)


def test_subspace_transform_is_the_closed_form_at_every_row_and_returns_its_change(knots):
    from torsion.steering.hooks import subspace_target

    method = _spline_a(knots, layers=(1,))
    U, mu, s = method.basis[0], method.mean[0], method.targets(0.6)[0]
    h = 40.0 + 3.0 * torch.randn(2, 5, U.shape[1], generator=torch.Generator().manual_seed(1))  # residual-sized
    new, delta = subspace_target(U, mu, s, 0.7, "cpu")(h)
    hd, Ud, mud, sd = h.double(), U.double(), mu.double(), s.double()
    expected = hd + 0.7 * ((sd - (hd - mud) @ Ud.T) @ Ud)
    torch.testing.assert_close(new.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(delta, new - h, atol=1e-4, rtol=0)
    last, _ = subspace_target(U, mu, s, 0.7, "cpu")(h[:, -1])  # one row alone: the same numbers as in the batch
    torch.testing.assert_close(last, new[:, -1], atol=1e-5, rtol=0)


def test_spline_a_steers_every_decoding_step_onto_the_knot(lm, knots):
    method = _spline_a(knots, layers=(1,))
    method = SplineA(method.layers, method.basis, method.mean, method.knots, method.knots_t, positions="last")
    U, mu, t = method.basis[0].double(), method.mean[0].double(), float(method.knots_t[1])
    seen = []
    handle = lm.layout.blocks[1].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o)[:, -1].double().clone()))
    inputs = encode(lm, PROMPTS)
    inputs.pop("position_ids", None)
    try:
        with torch.inference_mode(), method.apply(lm, t) as record:
            lm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert len(seen) == 4 and record.steered_tokens == [4 * len(PROMPTS)]  # prefill's last token + 3 new ones
    for last in seen:
        coords = (last - mu) @ U.T
        torch.testing.assert_close(coords, method.knots[0, 1].double().expand_as(coords), atol=1e-4, rtol=0)


def test_spline_methods_at_zero_mixing_are_bit_identical(lm, knots):
    inputs = encode(lm, ["how do i bake bread"])
    with torch.inference_mode():
        base = lm.model(**inputs).logits
        for method in (_spline_a(knots, beta=0.0), SplineB.from_manifold(_manifold(knots), beta=0.0)):
            with method.apply(lm, 0.5):
                assert torch.equal(lm.model(**inputs).logits, base)


def test_spline_b_passes_through_its_knots_unsmoothed(knots):
    surface = fit_b(knots, [0, 1, 2, 3], k=4, n_layers=4)
    for index, layer in enumerate(surface.layers):
        for j, t in enumerate(surface.knots_t.tolist()):
            np.testing.assert_allclose(surface.evaluate(t, layer), surface.knots[index, j].numpy(), atol=1e-6)
    smoothed = fit_b(knots, [0, 1, 2, 3], k=4, n_layers=4, smoothing=10.0)
    assert not np.allclose(smoothed.evaluate(0.0, 1), smoothed.knots[1, 0].numpy(), atol=1e-3)


def test_leave_one_block_out_beats_nearest_copy_on_a_smooth_rotation():
    """Knots whose direction turns smoothly with depth: B, refitted without a block, predicts it far
    better than copying the nearest block; A's in-sample fit sits at the noise floor."""
    g = torch.Generator().manual_seed(3)
    n_layers, d = 8, 16
    o, a, b = torch.randn(3, d, generator=g)
    t = torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64)
    centroids = torch.stack([torch.stack([o + float(tj) * (a + layer / (n_layers - 1) * b) for layer in range(n_layers)])
                             for tj in t])
    rows = centroids.repeat_interleave(4, dim=0) + 0.001 * torch.randn(12, n_layers, d, generator=g)
    knots = Knots(("strong_refuse", "weak_comply", "strong_comply"), t, rows.reshape(3, 4, n_layers, d).mean(1),
                  rows, (4, 4, 4))
    table = leave_one_block_out(knots, fit_a(knots, range(n_layers), k=3), fit_b(knots, range(n_layers), k=3,
                                                                                  n_layers=n_layers))
    interior = [row for row in table["blocks"] if not row["edge"]]
    assert [row["layer"] for row in interior] == list(range(1, n_layers - 1))
    for row in interior:
        assert row["b_loo"] < 0.2 * row["nearest_copy"]
        assert row["a_fit"] < 0.01 * row["knot_scale"]
    assert table["summary_interior"]["blocks_where_b_beats_nearest"] == n_layers - 2


def _manifold(knots, meta=None):
    manifold, _ = fit_manifold(knots, variant="both", layers=[1, 2, 3], k=4,
                               meta=meta or {"model_id": "tiny-llama", "weights_sha256": None})
    return manifold


def test_manifold_file_round_trip(lm, knots, tmp_path):
    manifold = _manifold(knots)
    loaded = load_manifold(save_manifold(tmp_path / "manifold.safetensors", manifold))
    assert loaded.meta == json.loads(json.dumps(manifold.meta))
    assert sorted(loaded.a) == [1, 2, 3] and loaded.b.layers == (1, 2, 3)
    for layer in (1, 2, 3):
        torch.testing.assert_close(SplineA.from_manifold(loaded, [layer]).targets(0.6),
                                   SplineA.from_manifold(manifold, [layer]).targets(0.6), atol=0, rtol=0)
    torch.testing.assert_close(SplineB.from_manifold(loaded).targets(0.6), SplineB.from_manifold(manifold).targets(0.6),
                               atol=1e-6, rtol=0)
    keys = set(json.loads(tmp_path.joinpath("manifold.safetensors").read_bytes()[8:].split(b"}}")[0].decode() + "}}"))
    assert {"a/1/basis", "a/1/mean", "a/1/knots", "a/1/knots_t", "b/basis", "b/knots_t", "b/1/mean", "b/1/knots"} <= keys


@pytest.mark.parametrize("cls", [SplineA, SplineB])
def test_spline_method_file_round_trip(lm, knots, tmp_path, cls):
    method = cls.from_manifold(_manifold(knots), [1, 2])
    loaded = load_method(method.save(tmp_path / "m.safetensors"), lm=lm)
    assert loaded.params() == method.params()
    torch.testing.assert_close(loaded.targets(0.3), method.targets(0.3), atol=0, rtol=0)


def test_t_past_the_coherent_range_needs_the_override(lm, knots):
    manifold = _manifold(knots).with_coherence({"last_coherent_t": {"low": -0.25, "high": 1.25}})
    method = SplineA.from_manifold(manifold, [1])
    assert method.t_range == (-0.25, 1.25)
    with method.apply(lm, 1.25):
        pass
    with pytest.raises(TorsionError, match=r"t=1.5 is outside the coherent range \[-0.25, 1.25\]") as error:
        method.apply(lm, 1.5)
    assert "\n" not in str(error.value)
    with SplineA.from_manifold(manifold, [1], allow_extrapolation=True).apply(lm, 1.5):
        pass


def test_manifold_from_another_model_is_refused(knots):
    other = tiny_lm("qwen2", n_layers=4)  # same width and depth, another model
    for cls in (SplineA, SplineB):
        with pytest.raises(TorsionError, match="fitted on model tiny-llama but the model is tiny-qwen2"):
            cls.from_manifold(_manifold(knots)).apply(other, 0.5)


def test_last_coherent_t_by_hand():
    rows = [{"t": t, "degenerate_share": d, "perplexity_ratio": p} for t, d, p in
            [(-0.5, 0.0, 1.0), (-0.25, 0.2, 1.0), (1.25, 0.05, 1.4), (1.5, 0.0, 1.6), (1.75, 0.0, 1.0)]]
    result = last_coherent_t(rows, (0.0, 1.0))
    assert (result["low"], result["high"]) == (0.0, 1.25)


class _Coherent:
    name = "stub"

    def judge(self, prompts, responses):
        from torsion.judge.base import Verdict
        return [Verdict("strong_comply", -1.0, self.name) for _ in prompts]


def test_coherence_sweep_measures_each_t(lm, knots):
    from torsion.generate import GenerationSettings

    method = SplineA.from_manifold(_manifold(knots), [1])
    sweep = coherence_sweep(lm, method, [0.0, 1.5], kl_prompts=["how do i bake bread"], texts=["tell me a story please"],
                            prompts=["what is the capital"], settings=GenerationSettings(max_new_tokens=2, batch_size=1),
                            judge=_Coherent())
    assert [row["t"] for row in sweep["rows"]] == [0.0, 1.5]
    assert all(row["degenerate_share"] == 0.0 and row["perplexity_ratio"] > 0 for row in sweep["rows"])
    assert sweep["rows"][1]["kl_base_to_steered"] > 0


def _fake_run(root: Path, lm, labels=LABELS, texts=None) -> Path:
    """A run directory with prompts, judged responses, activations and a manifest, built by hand."""
    root.mkdir()
    texts = texts or ["Here it is."] * len(labels)
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}", "category": "a", "source": "x", "split": "train",
                "prompt_hash": f"{i:064x}"} for i in range(len(labels))]
    responses = [{"id": f"p{i}", "response": text, "label": label, "score": LABEL_SCORES[label], "judge": "rules-v2"}
                 for i, (label, text) in enumerate(zip(labels, texts))]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    save_file({"resid": _acts(len(labels)).contiguous()}, str(root / "activations.safetensors"))
    (root / "manifest.json").write_text(json.dumps({"model": {"model_id": lm.model_id, "weights_sha256": None}}))
    return root


def test_knots_use_the_corrected_labels(lm, tmp_path):
    """Two strong complies that narrate the model's AI identity are fp_refuse: +0.5, so they join
    weak_refuse (3 rows), which then reaches m = 5; the strong_comply bin loses them."""
    from torsion.manifold.knots import knots_from_run
    from torsion.store import RunDir

    texts = ["Here it is."] * len(LABELS)
    texts[-1] = texts[-2] = "As an AI language model, I cannot have opinions, but here it is."
    run = _fake_run(tmp_path / "run", lm, texts=texts)
    knots = knots_from_run(RunDir(run), m=5)
    assert knots.bins == ("strong_refuse", "weak_refuse", "weak_comply", "strong_comply")
    assert knots.counts == (8, 5, 6, 7) and knots.t.tolist() == [0.0, 0.25, 0.75, 1.0]
    acts = _acts()
    torch.testing.assert_close(knots.centroids[1], torch.cat([acts[8:11], acts[24:26]]).mean(0))


def test_cli_manifold_fit_writes_file_and_table(lm, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", lm)
    assert main(["manifold", "fit", str(run), "--layers", "0", "1", "2", "3", "--k", "4"]) == 0
    table = json.loads((run / "analysis" / "manifold.json").read_text())
    assert table["knots"]["dropped"][0]["bin"] == "weak_refuse"
    assert [row["layer"] for row in table["leave_one_block_out"]["blocks"]] == [0, 1, 2, 3]
    manifold = load_manifold(run / "manifold.safetensors")
    assert manifold.meta["model_id"] == "tiny-llama" and manifold.meta["knots"]["bins"][0]["t"] == 0.0


def test_cli_bad_input_is_one_line_and_nonzero(lm, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", lm, labels=["strong_refuse"] * 6 + ["weak_comply"] * 2)
    assert main(["manifold", "fit", str(run), "--k", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torsion: error: only 1 behaviour bin") and "\n" not in err
    assert main(["steer", "--method", "splin-a", "--prompt", "hello"]) == 2
    assert "unknown steering method 'splin-a'" in capsys.readouterr().err


def test_get_method_builds_spline_a(knots):
    fits = fit_a(knots, [1], k=4)
    method = get_method("spline-a", layers=[1], basis=fits[1].basis[None], mean=fits[1].mean[None],
                        knots=fits[1].knots[None], knots_t=fits[1].knots_t)
    assert method.t_range == (0.0, 1.0)


def test_cli_steer_with_methods(tiny_model_dir, tmp_path, capsys):
    from torsion.vectors import SteeringVector, save_vectors

    model_id = str(Path(tiny_model_dir).resolve())
    run = _fake_run(tmp_path / "run", type("LM", (), {"model_id": model_id})())
    assert main(["manifold", "fit", str(run), "--layers", "1", "2", "--k", "4"]) == 0
    common = ["--model", str(tiny_model_dir), "--prompt", "how do i bake bread", "--max-new-tokens", "3"]
    out = tmp_path / "rows.jsonl"
    assert main(["steer", "--method", "spline-a", "--manifold", str(run / "manifold.safetensors"), "--t", "0.5",
                 "--out", str(out), *common]) == 0
    row = json.loads(out.read_text())
    assert row["method"] == "spline-a" and row["layers"] == [1, 2] and len(row["mean_delta_norm"]) == 2
    assert main(["steer", "--method", "spline-b", "--manifold", str(run / "manifold.safetensors"), "--t", "1.7",
                 *common]) == 2
    assert "t=1.7 is outside the coherent range [0, 1]" in capsys.readouterr().err
    vectors = tmp_path / "v.safetensors"
    save_vectors(vectors, {"md/resid": SteeringVector(torch.randn(4, 32), {"model_id": model_id})}, run_meta={})
    for method in (["flat", "--alpha", "2"], ["ace", "--alpha", "1", "--run", str(run)],
                   ["weighted-ablation", "--param", "peak_position=1.5", "--param", "width=2"]):
        assert main(["steer", "--method", *method, "--vector", str(vectors), "--key", "md/resid", "--layers", "1",
                     "--out", str(out), *common]) == 0
        assert json.loads(out.read_text())["method"] == method[0]
    assert main(["steer", "--method", "weighted-ablation", "--param", "widht=2", "--vector", str(vectors), *common]) == 2
    assert "unknown parameter 'widht' for steering method weighted-ablation (did you mean 'width'?)" in \
        capsys.readouterr().err


def test_cli_coherence_records_the_last_coherent_t(tiny_model_dir, tmp_path, capsys):
    model_id = str(Path(tiny_model_dir).resolve())
    run = _fake_run(tmp_path / "run", type("LM", (), {"model_id": model_id})())
    assert main(["manifold", "fit", str(run), "--layers", "1", "2", "--k", "4"]) == 0
    assert main(["manifold", "coherence", str(run), "--model", str(tiny_model_dir), "--t-grid", "-0.25", "1.25",
                 "--n-prompts", "2", "--max-new-tokens", "2"]) == 0
    sweep = load_manifold(run / "manifold.safetensors").meta["coherence"]
    assert [row["t"] for row in sweep["rows"]] == [-0.25, 1.25]
    last = sweep["last_coherent_t"]
    expected = last_coherent_t(sweep["rows"], (0.0, 1.0))
    assert (last["low"], last["high"]) == (expected["low"], expected["high"])
    assert json.loads((run / "analysis" / "manifold.json").read_text())["coherence"]["variant"] == "a"
    assert SplineA.from_manifold(load_manifold(run / "manifold.safetensors")).t_range == (last["low"], last["high"])


def _plant_stability(run: Path, entries: list[dict]) -> None:
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "stability.json").write_text(json.dumps({"analysis": "stability", "entries": entries}))


def _bin_entry(name: str, block: int, structural: bool, component: str = "resid") -> dict:
    return {"kind": "bin", "name": name, "block": block, "component": component, "structural": structural}


def test_a_structural_knot_in_stability_json_is_dropped_and_recorded(lm, tmp_path):
    run = _fake_run(tmp_path / "run", lm)
    _plant_stability(run, [_bin_entry("weak_comply", 1, True), _bin_entry("weak_comply", 2, False),
                           _bin_entry("strong_refuse", 1, False), _bin_entry("strong_comply", 3, True, "attn")])
    assert main(["manifold", "fit", str(run), "--layers", "0", "1", "2", "3", "--k", "2", "--variant", "a"]) == 0
    manifold = load_manifold(run / "manifold.safetensors")
    assert [b["bin"] for b in manifold.meta["knots"]["bins"]] == ["strong_refuse", "strong_comply"]
    dropped = {d["bin"]: d for d in manifold.meta["knots"]["dropped"]}
    assert set(dropped) == {"weak_refuse", "weak_comply"} and dropped["weak_comply"]["n"] == 6
    assert "structural" in dropped["weak_comply"]["reason"] and "[1]" in dropped["weak_comply"]["reason"]
    table = json.loads((run / "analysis" / "manifold.json").read_text())
    assert table["stability"]["mode"] == "drop" and list(table["stability"]["dropped"]) == ["weak_comply"]
    assert manifold.meta["stability"]["structural"] == table["stability"]["structural"]


def test_structural_ignore_keeps_the_knot_and_a_flag_outside_the_fitted_blocks_is_not_counted(lm, tmp_path):
    run = _fake_run(tmp_path / "run", lm)
    _plant_stability(run, [_bin_entry("weak_comply", 1, True), _bin_entry("strong_comply", 3, True)])
    assert main(["manifold", "fit", str(run), "--layers", "0", "1", "2", "--k", "2", "--variant", "a",
                 "--structural", "ignore"]) == 0
    table = json.loads((run / "analysis" / "manifold.json").read_text())
    assert [b["bin"] for b in table["knots"]["bins"]] == ["strong_refuse", "weak_comply", "strong_comply"]
    assert list(table["stability"]["structural"]) == ["weak_comply"] and table["stability"]["dropped"] == {}


def test_a_damaged_stability_json_fails_in_one_line(lm, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", lm)
    (run / "analysis").mkdir()
    (run / "analysis" / "stability.json").write_text("{not json")
    assert main(["manifold", "fit", str(run), "--k", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stability.json is damaged" in err and len(err.splitlines()) == 1


def test_structural_soft_down_weights_the_knot_in_the_smoothing_spline(lm, tmp_path, capsys):
    """The soft knot's weight reaches spline B's thin-plate smoothing (smoothing / w**2 at each of its
    (t, layer) points, recomputed here with scipy), and spline-b steers with it."""
    from scipy.interpolate import RBFInterpolator

    from torsion.steering.spline_b import SplineB

    run = _fake_run(tmp_path / "run", lm)
    _plant_stability(run, [_bin_entry("weak_comply", 1, True)])
    options = ["--layers", "0", "1", "2", "--k", "2", "--variant", "b", "--structural", "soft"]
    assert main(["manifold", "fit", str(run), *options]) == 2
    assert "--smoothing > 0" in capsys.readouterr().err
    assert main(["manifold", "fit", str(run), *options, "--smoothing", "0.5"]) == 0
    manifold = load_manifold(run / "manifold.safetensors")
    assert [b["bin"] for b in manifold.meta["knots"]["bins"]] == ["strong_refuse", "weak_comply", "strong_comply"]
    assert manifold.meta["knot_weights"] == [1.0, 0.25, 1.0]
    assert list(manifold.meta["stability"]["soft"]) == ["weak_comply"]
    surface = manifold.b
    points = [(t, layer / (surface.n_layers - 1)) for layer in surface.layers for t in surface.knots_t.tolist()]
    values = surface.knots.double().reshape(-1, surface.knots.shape[-1]).numpy()
    weighted = RBFInterpolator(np.array(points), values, kernel="thin_plate_spline",
                               smoothing=np.array([0.5, 0.5 / 0.25 ** 2, 0.5] * len(surface.layers)))
    plain = RBFInterpolator(np.array(points), values, kernel="thin_plate_spline", smoothing=0.5)
    where = np.array([[0.75, 1 / (surface.n_layers - 1)]])
    np.testing.assert_allclose(surface.evaluate(0.75, 1), weighted(where)[0], rtol=1e-8)
    assert not np.allclose(weighted(where)[0], plain(where)[0])
    method = SplineB.from_manifold(manifold, [1])
    assert method.knot_weights == (1.0, 0.25, 1.0)
    np.testing.assert_allclose(method.targets(0.75)[0].double().numpy(), weighted(where)[0], rtol=1e-5)


def test_a_soft_knot_weighs_in_spline_a_smoothing_when_it_has_more_knots_than_its_degree_plus_one():
    """Five knots, cubic: make_splrep's weights move the curve (computed here with scipy)."""
    from scipy.interpolate import make_splrep

    from torsion.manifold.fit import make_curve

    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    coords = np.array([[0.0, 1.0], [1.0, 0.2], [0.1, 0.9], [1.2, -0.3], [0.4, 0.5]])
    weights = [1.0, 1.0, 0.25, 1.0, 1.0]
    expected = [float(make_splrep(t, coords[:, j], w=np.array(weights), k=3, s=0.1)(0.6)) for j in range(2)]
    plain = [float(make_splrep(t, coords[:, j], k=3, s=0.1)(0.6)) for j in range(2)]
    np.testing.assert_allclose(make_curve(t, coords, 0.1, weights)(0.6), expected, rtol=1e-10)
    assert not np.allclose(expected, plain)


def test_spline_a_at_one_block_keeps_that_block_fit(lm, knots):
    """What propagation and the random control inject: spline A on one of its blocks, tensors sliced to match."""
    from torsion.steering.base import at_block

    method = _spline_a(knots, layers=(1, 2, 3))
    one = at_block(method, 2)
    assert one.layers == (2,) and one.basis.shape[0] == 1
    torch.testing.assert_close(one.targets(0.6)[0], method.targets(0.6)[1])
    torch.testing.assert_close(one.mean[0], method.mean[1])
    with pytest.raises(TorsionError, match="no fit for block 0"):
        at_block(method, 0)
