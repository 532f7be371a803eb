"""Steering-vector methods, fit_vectors, the SteeringVector value and its file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.optimize
import torch
from safetensors.torch import save_file

from torsion.errors import TorsionError
from torsion.vectors import (
    METHODS,
    SteeringVector,
    clip_outliers,
    fit_vectors,
    harm_direction,
    load_run_meta,
    load_vector,
    load_vectors,
    mean_difference,
    pca_direction,
    probe_direction,
    rmd,
    save_vectors,
    wrmd,
)


def _random_classes(seed: int, n_r: int = 20, n_c: int = 15, n_layers: int = 3, d: int = 5):
    generator = torch.Generator().manual_seed(seed)
    refused = torch.randn(n_r, n_layers, d, generator=generator) + 1.0
    complied = torch.randn(n_c, n_layers, d, generator=generator) * torch.linspace(0.5, 2.0, d)
    return refused, complied


def _numpy_ridge(x_r, x_c, w_r, w_c, lam, lam_mode):
    """Independent (weighted) RMD with numpy: np.cov for C, np.linalg.solve for the system."""
    out = []
    for l in range(x_r.shape[1]):
        r, c = x_r[:, l].astype(np.float64), x_c[:, l].astype(np.float64)
        diff = np.average(r, axis=0, weights=w_r) - np.average(c, axis=0, weights=w_c)
        cov = np.cov(c.T, aweights=w_c, ddof=1)
        ridge = lam * np.trace(cov) / c.shape[1] if lam_mode == "relative" else lam
        out.append(np.linalg.solve(cov + ridge * np.eye(c.shape[1]), diff))
    return np.stack(out)


# RMD by hand, d = 2, two layers, 3 refused and 3 complied points per layer.
#
# Layer 0: complied (0,0) (2,0) (1,3): mean (1,1); deviations (-1,-1) (1,-1) (0,2);
#   Σ outer = [[1,1],[1,1]] + [[1,-1],[-1,1]] + [[0,0],[0,4]] = [[2,0],[0,6]]; C = /2 = [[1,0],[0,3]].
#   refused (3,1) (5,1) (4,4): mean (4,2). μ_n = complied mean, so r̄ - c̄ = (4,2) - (1,1) = (3,1).
#   trace(C)/d = 4/2 = 2, so relative lam 0.5 -> λ = 1: (C + I) = diag(2,4) -> v = (1.5, 0.25).
#   absolute lam 0.5 -> (C + 0.5 I) = diag(1.5, 3.5) -> v = (2, 2/7).
# Layer 1: complied (0,0) (2,3) (1,3): mean (1,2); deviations (-1,-2) (1,1) (0,1);
#   Σ outer = [[1,2],[2,4]] + [[1,1],[1,1]] + [[0,0],[0,1]] = [[2,3],[3,6]]; C = [[1,1.5],[1.5,3]].
#   trace(C)/d = 2 again, so relative 0.5 -> λ = 1: C + I = [[2,1.5],[1.5,4]].
#   refused (0.5,-0.5) (2.5,-0.5) (1.5,-0.5): mean (1.5,-0.5); r̄ - c̄ = (0.5,-2.5).
#   Solve [[2,1.5],[1.5,4]] v = (0.5,-2.5): v = (1,-1)  (check: 2 - 1.5 = 0.5, 1.5 - 4 = -2.5).
#   absolute 0.5: C + 0.5 I = [[1.5,1.5],[1.5,3.5]], det 3, inverse [[3.5,-1.5],[-1.5,1.5]]/3,
#   v = (1.75 + 3.75, -0.75 - 3.75)/3 = (11/6, -1.5).
HAND_COMPLIED = torch.tensor([[[0, 0], [0, 0]], [[2, 0], [2, 3]], [[1, 3], [1, 3]]], dtype=torch.float32)
HAND_REFUSED = torch.tensor([[[3, 1], [0.5, -0.5]], [[5, 1], [2.5, -0.5]], [[4, 4], [1.5, -0.5]]])


def test_harm_direction_by_hand():
    # one block, d = 2: harmful mean (3, 1), harmless mean (1, 0) -> difference (2, 1)
    harmful = torch.tensor([[[2.0, 0.0]], [[4.0, 2.0]]])
    harmless = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]])
    unprojected = harm_direction(harmful, harmless, project=False)
    torch.testing.assert_close(unprojected, torch.tensor([[2.0, 1.0]]) / 5 ** 0.5)
    # projected off the harmless mean's direction (1, 0): (0, 1/sqrt 5), renormalised -> (0, 1)
    torch.testing.assert_close(harm_direction(harmful, harmless), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(TorsionError, match="at least one harmful"):
        harm_direction(harmful[:0], harmless)


def test_harm_direction_matches_numpy_per_layer():
    rng = np.random.default_rng(3)
    harmful, harmless = rng.normal(size=(9, 3, 5)) + 0.5, rng.normal(size=(7, 3, 5))
    got = harm_direction(torch.from_numpy(harmful), torch.from_numpy(harmless)).numpy()
    for layer in range(3):
        g = harmless[:, layer].mean(0)
        d = harmful[:, layer].mean(0) - g
        d, g = d / np.linalg.norm(d), g / np.linalg.norm(g)
        expected = d - (d @ g) * g
        np.testing.assert_allclose(got[layer], expected / np.linalg.norm(expected), atol=1e-6)
        assert abs(got[layer] @ g) < 1e-6 and abs(np.linalg.norm(got[layer]) - 1) < 1e-6


def test_rmd_matches_hand_computation():
    relative = rmd(HAND_REFUSED, HAND_COMPLIED, lam=0.5, lam_mode="relative")
    torch.testing.assert_close(relative, torch.tensor([[1.5, 0.25], [1.0, -1.0]]))
    absolute_one = rmd(HAND_REFUSED, HAND_COMPLIED, lam=1.0, lam_mode="absolute")
    torch.testing.assert_close(absolute_one, relative)
    absolute_half = rmd(HAND_REFUSED, HAND_COMPLIED, lam=0.5, lam_mode="absolute")
    torch.testing.assert_close(absolute_half, torch.tensor([[2.0, 2 / 7], [11 / 6, -1.5]]))
    assert relative.dtype == torch.float32 and relative.shape == (2, 2)


def test_rmd_matches_numpy_solve_on_random_data():
    refused, complied = _random_classes(0)
    ones_r, ones_c = np.ones(len(refused)), np.ones(len(complied))
    for lam, mode in ((1e-2, "relative"), (0.3, "absolute"), (2.0, "relative")):
        expected = _numpy_ridge(refused.numpy(), complied.numpy(), ones_r, ones_c, lam, mode)
        np.testing.assert_allclose(rmd(refused, complied, lam=lam, lam_mode=mode).numpy(), expected, rtol=1e-5)
    # relative and absolute λ differ here (trace(C)/d != 1), so the mode matters
    assert not torch.allclose(rmd(refused, complied, lam=2.0, lam_mode="relative"),
                              rmd(refused, complied, lam=2.0, lam_mode="absolute"))


def test_rmd_with_fewer_complied_rows_than_dimensions_matches_numpy():
    """n_complied < d_model takes the n×n push-through solve; it must equal the d×d system."""
    refused, complied = _random_classes(5, n_r=12, n_c=8, d=40)
    ones_r, ones_c = np.ones(12), np.ones(8)
    weights_r, weights_c = np.linspace(0.2, 1.0, 12), np.linspace(0.5, 1.0, 8)
    for lam, mode in ((1e-2, "relative"), (0.3, "absolute")):
        expected = _numpy_ridge(refused.numpy(), complied.numpy(), ones_r, ones_c, lam, mode)
        np.testing.assert_allclose(rmd(refused, complied, lam=lam, lam_mode=mode).numpy(), expected, rtol=1e-4)
        expected = _numpy_ridge(refused.numpy(), complied.numpy(), weights_r, weights_c, lam, mode)
        got = wrmd(refused, complied, weights_r, -weights_c, lam=lam, lam_mode=mode)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_rmd_neutral_mean_cancels_in_the_difference():
    refused, complied = _random_classes(1)
    neutral = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(2)) * 10 + 4
    torch.testing.assert_close(rmd(refused, complied, neutral=neutral), rmd(refused, complied))


def test_rmd_errors():
    refused, complied = _random_classes(3, n_c=4, d=6)
    with pytest.raises(TorsionError, match="not positive definite.*larger lam"):
        rmd(refused, complied, lam=0.0)  # 4 samples in 6 dims: C is singular
    with pytest.raises(TorsionError, match="lam_mode"):
        rmd(refused, complied, lam_mode="percent")
    with pytest.raises(TorsionError, match="at least 2 complied"):
        rmd(refused, complied[:1])


def test_wrmd_with_equal_weights_is_rmd():
    refused, complied = _random_classes(4)
    for score in (1.0, 0.5):  # weights all 1, or all 0.5: the normalisations must cancel
        weighted = wrmd(refused, complied, [score] * len(refused), [-score] * len(complied), lam=0.1)
        torch.testing.assert_close(weighted, rmd(refused, complied, lam=0.1), rtol=1e-6, atol=1e-7)


def test_wrmd_matches_numpy_weighted_computation():
    refused, complied = _random_classes(5)
    s_r = np.where(np.arange(len(refused)) % 3 == 0, 0.5, 1.0)
    s_c = np.where(np.arange(len(complied)) % 2 == 0, -0.5, -1.0)
    expected = _numpy_ridge(refused.numpy(), complied.numpy(), np.maximum(s_r, 0.01), np.maximum(-s_c, 0.01),
                            0.05, "relative")
    weighted = wrmd(refused, complied, s_r.tolist(), s_c.tolist(), lam=0.05, lam_mode="relative")
    np.testing.assert_allclose(weighted.numpy(), expected, rtol=1e-5)
    assert not torch.allclose(weighted, rmd(refused, complied, lam=0.05), rtol=1e-3)


def test_pca_matches_numpy_svd_and_aligns_with_md():
    refused, complied = _random_classes(6, n_layers=4)
    direction = pca_direction(refused, complied)
    md = mean_difference(refused, complied)
    for l in range(4):
        r, c = refused[:, l].double().numpy(), complied[:, l].double().numpy()
        pooled = np.concatenate([r - r.mean(0), c - c.mean(0)])
        top = np.linalg.svd(pooled)[2][0]
        top *= np.sign(top @ md[l].double().numpy())
        np.testing.assert_allclose(direction[l].numpy(), top, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(direction.norm(dim=1), torch.ones(4))
    assert bool(((direction * md).sum(1) > 0).all())
    # swapping the classes leaves the pooled data alone and negates MD, so the PC must flip
    torch.testing.assert_close(pca_direction(complied, refused), -direction)


def test_probe_recovers_planted_direction_deterministically():
    generator = torch.Generator().manual_seed(7)
    n, n_layers, d = 60, 2, 32
    planted = torch.nn.functional.normalize(torch.randn(n_layers, d, generator=generator), dim=1)
    refused = torch.randn(n, n_layers, d, generator=generator) + 3 * planted
    complied = torch.randn(n, n_layers, d, generator=generator) - 3 * planted
    direction = probe_direction(refused, complied)
    cosine = torch.nn.functional.cosine_similarity(direction, planted, dim=1)
    assert bool((cosine > 0.9).all()), cosine
    assert torch.equal(direction, probe_direction(refused, complied))
    # sign alignment: swapping the classes flips the weights
    torch.testing.assert_close(probe_direction(complied, refused), -direction, rtol=1e-4, atol=1e-5)


def test_probe_matches_scipy_logistic_regression():
    refused, complied = _random_classes(8, n_r=25, n_c=20, n_layers=2, d=5)
    l2 = 0.7
    direction = probe_direction(refused, complied, l2=l2)
    for l in range(2):
        x = torch.cat([refused[:, l], complied[:, l]]).double().numpy()
        y = np.r_[np.ones(len(refused)), np.zeros(len(complied))]

        def objective(theta):
            z = x @ theta[:-1] + theta[-1]
            loss = np.logaddexp(0, z).sum() - y @ z + 0.5 * l2 * theta[:-1] @ theta[:-1]
            p = 1 / (1 + np.exp(-z))
            return loss, np.r_[x.T @ (p - y) + l2 * theta[:-1], (p - y).sum()]

        fitted = scipy.optimize.minimize(objective, np.zeros(6), jac=True, method="BFGS", options={"gtol": 1e-10})
        np.testing.assert_allclose(direction[l].numpy(), fitted.x[:-1], rtol=1e-4, atol=1e-5)


def test_clip_outliers_per_dimension():
    x = torch.zeros(101, 2, 3)
    x[:, 1, 2] = torch.arange(101.0)  # percentiles 1 and 99 of 0..100 are 1 and 99
    x[:, 0, 0] = torch.arange(101.0) * -2
    clipped = clip_outliers(x)
    assert clipped[:, 1, 2].min() == 1 and clipped[:, 1, 2].max() == 99
    assert clipped[:, 0, 0].min() == -198 and clipped[:, 0, 0].max() == -2
    torch.testing.assert_close(clipped[1:-1], x[1:-1])
    with pytest.raises(TorsionError, match="percentiles"):
        clip_outliers(x, lo=50, hi=10)


def _labelled(seed: int = 9):
    """Rows: category a has 3 refused + 3 complied, b has 3 refused + 2 complied, c only complied."""
    scores = [1.0, 0.5, 1.0, -1.0, -0.5, -1.0,  # a
              0.5, 1.0, 1.0, -1.0, -0.5,  # b
              -1.0, -1.0]  # c
    categories = ["a"] * 6 + ["b"] * 5 + ["c"] * 2
    activations = torch.randn(len(scores), 3, 4, generator=torch.Generator().manual_seed(seed))
    return activations, scores, categories


def test_fit_vectors_category_anchors():
    activations, scores, categories = _labelled()
    vectors = fit_vectors(activations, scores, method="md", categories=categories)
    assert list(vectors) == ["", "a", "b"]
    all_complied = activations[[3, 4, 5, 9, 10, 11, 12]]
    torch.testing.assert_close(vectors[""].directions, mean_difference(activations[[0, 1, 2, 6, 7, 8]], all_complied))
    torch.testing.assert_close(vectors["a"].directions, mean_difference(activations[[0, 1, 2]], activations[[3, 4, 5]]))
    torch.testing.assert_close(vectors["b"].directions, mean_difference(activations[[6, 7, 8]], all_complied))
    assert (vectors["a"].meta["anchor"], vectors["a"].meta["n_complied"]) == ("category", 3)
    assert (vectors["b"].meta["anchor"], vectors["b"].meta["n_complied"]) == ("global", 7)
    assert vectors["b"].meta["n_refused"] == 3 and vectors["b"].meta["category"] == "b"
    assert vectors[""].meta["skipped_categories"] == ["c"]
    assert vectors[""].meta["layer_indexing"] == "block" and vectors[""].meta["method"] == "md"


def test_fit_vectors_wrmd_uses_each_subsets_scores():
    activations, scores, categories = _labelled()
    vectors = fit_vectors(activations, scores, method="wrmd", categories=categories, lam=0.2, lam_mode="absolute")
    refused_a, complied_a = [0, 1, 2], [3, 4, 5]
    expected = wrmd(activations[refused_a], activations[complied_a], [scores[i] for i in refused_a],
                    [scores[i] for i in complied_a], lam=0.2, lam_mode="absolute")
    torch.testing.assert_close(vectors["a"].directions, expected)
    assert vectors["a"].meta["params"] == {"lam": 0.2, "lam_mode": "absolute", "neutral": "complied"}


def test_fit_vectors_excludes_degenerate_and_judge_errors():
    activations, scores, _ = _labelled()
    extra = torch.full((2, 3, 4), 1e6)
    polluted = fit_vectors(torch.cat([activations, extra]), scores + [2.0, None], method="rmd")
    torch.testing.assert_close(polluted[""].directions, fit_vectors(activations, scores, method="rmd")[""].directions)
    assert (polluted[""].meta["n_refused"], polluted[""].meta["n_complied"]) == (6, 7)


def test_fit_vectors_errors():
    activations, scores, _ = _labelled()
    with pytest.raises(TorsionError, match=r"no complied samples \(0 of 13 responses were labelled comply\)"):
        fit_vectors(activations, [1.0] * 11 + [2.0, None], method="md")
    with pytest.raises(TorsionError, match=r"no refused samples \(0 of 13"):
        fit_vectors(activations, [-1.0] * 13, method="md")
    with pytest.raises(TorsionError, match="unknown method 'lda'; choose one of md, rmd, wrmd, pca, probe"):
        fit_vectors(activations, scores, method="lda")
    with pytest.raises(TorsionError, match="takes no option"):
        fit_vectors(activations, scores, method="md", l2=1.0)
    with pytest.raises(TorsionError, match="neutral"):
        fit_vectors(activations, scores, method="pca", neutral=activations)
    with pytest.raises(TorsionError, match="13 activation rows but 12 scores"):
        fit_vectors(activations, scores[:-1], method="md")
    assert set(METHODS) == {"md", "rmd", "wrmd", "pca", "probe"}


def test_fit_vectors_passes_method_options_and_clips():
    activations, scores, _ = _labelled()
    probe = fit_vectors(activations, scores, method="probe", l2=0.5)[""]
    assert probe.meta["params"] == {"l2": 0.5}
    refused, complied = activations[[0, 1, 2, 6, 7, 8]], activations[[3, 4, 5, 9, 10, 11, 12]]
    torch.testing.assert_close(probe.directions, probe_direction(refused, complied, l2=0.5))
    clipped = fit_vectors(activations, scores, method="md", clip=True)[""]
    torch.testing.assert_close(clipped.directions, mean_difference(clip_outliers(refused), clip_outliers(complied)))
    assert clipped.meta["clip_percentiles"] == [1.0, 99.0]
    assert fit_vectors(activations, scores, method="md")[""].meta["clip_percentiles"] is None


def _vector(seed: int, shape=(3, 4), **meta) -> SteeringVector:
    return SteeringVector(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),
                          {"model_id": "tiny", **meta})


def test_vector_algebra_identities():
    v, w = _vector(0), _vector(1, model_id="other")
    assert torch.equal((v - v).directions, torch.zeros(3, 4))
    assert torch.equal((-(-v)).directions, v.directions)
    assert torch.equal((2 * v).directions, (v + v).directions)
    assert torch.equal((v * 2).directions, (v / 0.5).directions)
    torch.testing.assert_close((v - 0.5 * w).directions, v.directions - 0.5 * w.directions)
    torch.testing.assert_close(v.normalized().norms(), torch.ones(3))
    torch.testing.assert_close(v.norms(), v.directions.norm(dim=1))
    assert (v.n_layers, v.d_model) == (3, 4) and torch.equal(v.layer(2), v.directions[2])
    assert (v - v).meta["op"] == "a - b" and (v - v).meta["model_id"] == "tiny"
    assert "model_id" not in (v + w).meta and (v + w).meta["operands"] == [v.meta, w.meta]
    assert (3 * v).meta["scale"] == 3.0


def test_vector_algebra_edges():
    v = SteeringVector(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(v.normalized().directions, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    with pytest.raises(TorsionError, match=r"shape \[3, 4\] and \[3, 5\]"):
        _vector(0) + _vector(1, shape=(3, 5))
    with pytest.raises(TorsionError, match="out of range"):
        v.layer(2)
    with pytest.raises(TorsionError, match="n_layers, d_model"):
        SteeringVector(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError):
        _vector(0) * _vector(1)


def test_vector_file_round_trip(tmp_path):
    path = tmp_path / "vectors.safetensors"
    vectors = {"md/resid": _vector(0, method="md"), "md/resid/a": _vector(1, anchor="global", n_refused=3)}
    save_vectors(path, vectors, run_meta={"seed": 0, "config": {"methods": ["md"]}})
    loaded = load_vectors(path, d_model=4)
    assert list(loaded) == list(vectors)
    for key, vector in vectors.items():
        assert torch.equal(loaded[key].directions, vector.directions)
        assert loaded[key].meta == vector.meta
    assert load_run_meta(path) == {"seed": 0, "config": {"methods": ["md"]}}
    assert torch.equal(load_vector(path, "md/resid/a").directions, vectors["md/resid/a"].directions)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file
    single = tmp_path / "one.safetensors"
    vectors["md/resid"].save(single)
    again = SteeringVector.load(single)
    assert torch.equal(again.directions, vectors["md/resid"].directions) and again.meta == vectors["md/resid"].meta


def test_vector_file_errors(tmp_path):
    path = tmp_path / "vectors.safetensors"
    save_vectors(path, {"md/resid": _vector(0), "pca/resid": _vector(1)}, run_meta={})
    with pytest.raises(TorsionError, match=f"vector file {path} has d_model=4 but the model has 896; "
                                           "use vectors computed for this model"):
        load_vectors(path, d_model=896)
    with pytest.raises(TorsionError, match="holds 2 vectors .*md/resid, pca/resid"):
        load_vector(path)
    with pytest.raises(TorsionError, match="no vector 'rmd/resid'; choose one of md/resid, pca/resid"):
        load_vector(path, "rmd/resid")
    with pytest.raises(TorsionError, match="not found"):
        load_vectors(tmp_path / "missing.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(TorsionError, match="empty"):
        load_vectors(tmp_path / "empty.safetensors")
    save_file({}, str(tmp_path / "none.safetensors"), metadata={"torsion:run": json.dumps({})})
    with pytest.raises(TorsionError, match="holds no vectors"):
        load_vectors(tmp_path / "none.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(TorsionError, match="not a safetensors"):
        load_vectors(tmp_path / "garbage.safetensors")
    save_file({"resid": torch.zeros(5, 3, 4)}, str(tmp_path / "acts.safetensors"))
    with pytest.raises(TorsionError, match="activations file"):
        load_vectors(tmp_path / "acts.safetensors")
    with pytest.raises(TorsionError, match="no vectors to save"):
        save_vectors(path, {}, run_meta={})
