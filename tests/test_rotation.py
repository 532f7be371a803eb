"""Axis rotation and its controls on synthetic activations whose geometry is known."""

import json
import math
import statistics

import numpy as np
import pytest
import torch

from torsion.analysis import rotation
from torsion.analysis.rotation import (
    ANGLE_RANGE,
    analyze_rotation,
    batched_mean_difference,
    equal_tailed_p_value,
    dispersion_bootstrap,
    prompt_bootstrap,
    rotation_summary,
    shuffled_label_null,
    split_half_reliability,
)
from torsion.errors import TorsionError
from torsion.geometry import adjacent_angles, angle_deg, cosine, random_angle_reference
from torsion.stats import basic_interval
from torsion.vectors import mean_difference


def planted(n_refused=200, n_complied=200, n_layers=6, d=8, turn_deg=60.0, signal=4.0, noise=1.0,
            prompt_noise=0.5, offset=50.0, seed=0):
    """Activations ``[n, n_layers, d]`` whose refused rows add ``signal · u_l``; labels ``[n]`` (refused first).

    ``angle(u_l, u_{l+1}) = turn_deg``: the unit axes turn in a random plane. Every prompt
    carries a large per-layer offset (the residual stream's shared mean), a prompt-level noise
    shared across layers, and independent noise per layer.
    """
    g = torch.Generator().manual_seed(seed)
    frame = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # two orthonormal rows
    turns = torch.deg2rad(torch.arange(n_layers) * turn_deg)
    axes = torch.cos(turns)[:, None] * frame[0] + torch.sin(turns)[:, None] * frame[1]  # [n_layers, d]
    n = n_refused + n_complied
    x = (offset * torch.randn(1, n_layers, d, generator=g) + prompt_noise * torch.randn(n, 1, d, generator=g)
         + noise * torch.randn(n, n_layers, d, generator=g))
    x[:n_refused] += signal * axes
    labels = torch.zeros(n, dtype=torch.long)
    labels[:n_refused] = 1
    return x, labels


def classes(x, labels):
    return x[labels == 1], x[labels == 0]


# ----- geometry -----

def test_geometry_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    assert adjacent_angles(v).tolist() == pytest.approx([45.0, 135.0, 90.0])  # a zero vector sits at 90°
    assert float(cosine(v[0], v[2])) == -1.0 and float(angle_deg(v[0], v[2])) == 180.0
    batch = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(adjacent_angles(batch), angle_deg(batch[:, :-1], batch[:, 1:]), atol=1e-10)


@pytest.mark.parametrize("d", [64, 896])
def test_random_reference_matches_monte_carlo(d):
    mean, sd = random_angle_reference(d)
    assert mean == 90.0 and sd == pytest.approx(57.2958 / math.sqrt(d), rel=1e-6)
    g = torch.Generator().manual_seed(d)
    n = 10_000
    angles = angle_deg(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    assert float(angles.mean()) == pytest.approx(90.0, abs=4 * sd / math.sqrt(n))
    assert float(angles.std()) == pytest.approx(sd, rel=0.03)  # the sd's own sampling error is ~0.7%


# ----- summary and batched MD -----

def test_rotation_summary_by_hand():
    degrees = torch.deg2rad(torch.tensor([0.0, 30.0, 90.0, 100.0]))
    vectors = torch.stack([torch.cos(degrees), torch.sin(degrees)], dim=1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    summary = rotation_summary(vectors)
    assert summary["pair_angles_deg"] == pytest.approx([30.0, 60.0, 10.0], abs=1e-4)
    assert summary["mean_deg"] == pytest.approx(100.0 / 3, abs=1e-4)
    assert summary["depth_sigma_deg"] == pytest.approx(statistics.stdev([30.0, 60.0, 10.0]), abs=1e-4)
    assert rotation_summary(vectors[:2])["depth_sigma_deg"] is None


def test_batched_mean_difference_equals_mean_difference_despite_a_large_offset():
    x, labels = planted(n_refused=30, n_complied=20, offset=1000.0)
    refused = (labels == 1).float()
    weights = torch.stack([refused, refused * 3])  # a refused row counted three times is the same mean
    batched = batched_mean_difference(x, weights, 1.0 - weights / weights.amax(-1, keepdim=True))
    expected = mean_difference(*classes(x, labels))
    assert batched.shape == (2, 6, 8)
    assert torch.allclose(batched, expected.expand(2, -1, -1), atol=2e-4)


# ----- prompt bootstrap -----

def test_planted_turn_is_recovered_inside_the_prompt_bootstrap_ci():
    inside = []
    for seed in range(10):
        x, labels = planted(seed=seed)
        summary = rotation_summary(mean_difference(*classes(x, labels)))
        assert summary["mean_deg"] == pytest.approx(60.0, abs=2.0)
        lo, hi = prompt_bootstrap(x, labels, B=200, seed=seed)["mean_ci95"]
        assert lo < summary["mean_deg"] < hi and hi - lo < 4.0
        inside.append(lo <= 60.0 <= hi)
    assert sum(inside) >= 8  # a 95% interval


def test_vectorised_bootstrap_equals_a_loop_over_the_same_draws(monkeypatch):
    monkeypatch.setattr(rotation, "CHUNK_FLOATS", 2 * 4 * 8)  # two resamples per chunk: exercise chunking
    x, labels = planted(n_refused=7, n_complied=5, n_layers=4, d=8, seed=1)
    result = prompt_bootstrap(x, labels, B=9, seed=3)
    x_r, x_c = classes(x, labels)
    g = torch.Generator().manual_seed(3)
    draws_r = torch.randint(0, len(x_r), (9, len(x_r)), generator=g)
    draws_c = torch.randint(0, len(x_c), (9, len(x_c)), generator=g)
    angles = np.array([adjacent_angles(mean_difference(x_r[draws_r[b]], x_c[draws_c[b]])).numpy() for b in range(9)])
    assert result["B"] == 9
    assert result["means_deg"] == pytest.approx(angles.mean(1).tolist(), abs=1e-3)
    assert result["mean_ci95"] == pytest.approx(np.percentile(angles.mean(1), [2.5, 97.5]).tolist(), abs=1e-3)
    assert np.allclose(result["pair_ci95"], np.percentile(angles, [2.5, 97.5], axis=0).T, atol=1e-3)


# ----- dispersion bootstrap -----

def test_dispersion_bootstrap_resamples_the_pair_angles():
    constant = dispersion_bootstrap(torch.full((7,), 88.0), B=100, seed=0)
    assert constant["mean_ci95"] == pytest.approx([88.0, 88.0]) and constant["B"] == 100
    assert constant["note"] == "resamples per-pair angles; ignores prompt sampling"
    assert dispersion_bootstrap([0.0, 10.0], B=400, seed=0)["mean_ci95"] == pytest.approx([0.0, 10.0])


# ----- shuffled-label null -----

def test_vectorised_null_equals_a_loop_over_the_same_permutations(monkeypatch):
    monkeypatch.setattr(rotation, "CHUNK_FLOATS", 3 * 4 * 8)
    x, labels = planted(n_refused=7, n_complied=5, n_layers=4, d=8, seed=2)
    result = shuffled_label_null(x, labels, P=11, seed=5)
    order = torch.argsort(torch.rand(11, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=1)
    null = np.array([float(adjacent_angles(mean_difference(x[p[:7]], x[p[7:]])).mean()) for p in order])
    observed = float(adjacent_angles(mean_difference(*classes(x, labels))).mean())
    assert result["null_deg"] == pytest.approx(null.tolist(), abs=1e-3)
    assert result["observed_deg"] == pytest.approx(observed)
    assert result["mean_deg"] == pytest.approx(null.mean(), abs=1e-3)
    assert [result["p2_5"], result["p97_5"]] == pytest.approx(np.percentile(null, [2.5, 97.5]).tolist(), abs=1e-3)
    # the equal-tailed p, recounted from the loop's null: the smaller tail, +1 corrected, doubled
    below, above = int((null <= observed).sum()), int((null >= observed).sum())
    assert result["p_value"] == pytest.approx(min(1.0, 2 * (1 + min(below, above)) / 12))


def test_equal_tailed_p_value_by_hand_on_a_planted_skewed_null():
    # P = 9, a long upper tail: the null's mean is 170 / 9 = 18.9, its median 12
    null = np.array([10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5, 76.0])
    # 9.0: below every draw. Smaller tail 0 -> p = 2 * (1 + 0) / 10 = 0.2. (Distance from the mean,
    # |9 - 18.9| = 9.9, counts only the 76 as extreme: (1 + 1) / 10, also 0.2, so the next case matters.)
    assert equal_tailed_p_value(null, 9.0) == pytest.approx(0.2)
    # 13.2: 7 draws <= it, 2 >= it -> p = 2 * 3 / 10 = 0.6. Distance from the mean (|13.2 - 18.9| = 5.7)
    # counts 8 draws as at least as far: (1 + 8) / 10 = 0.9, which this must not return.
    assert equal_tailed_p_value(null, 13.2) == pytest.approx(0.6)
    # 12.0 sits on a draw: 5 <= it, 5 >= it (the tie counts in both tails) -> 2 * 6 / 10 = 1.2 -> clipped to 1
    assert equal_tailed_p_value(null, 12.0) == 1.0
    # 80.0: above every draw -> 0.2; 40.0: 8 <= it, 1 >= it -> 2 * 2 / 10 = 0.4
    assert equal_tailed_p_value(null, 80.0) == pytest.approx(0.2)
    assert equal_tailed_p_value(null, 40.0) == pytest.approx(0.4)


def test_shuffled_label_null_reports_the_equal_tailed_p_of_its_own_draws(monkeypatch):
    """Plant the null draws; the reported p is the hand count against them, not a distance from their mean."""
    x, labels = planted(n_refused=6, n_complied=6, n_layers=3, d=8, seed=3)
    observed = float(adjacent_angles(mean_difference(*classes(x, labels))).mean())
    planted_null = torch.tensor([observed - 1.0] * 3 + [observed + 0.5] * 5 + [observed + 60.0] * 2)  # P = 10
    real = rotation._map_mean_differences
    monkeypatch.setattr(rotation, "_map_mean_differences",
                        lambda x_, first, second, statistic: planted_null if first.shape[0] == 10
                        else real(x_, first, second, statistic))
    result = shuffled_label_null(x, labels, P=10, seed=0)
    assert result["null_deg"] == pytest.approx(planted_null.tolist())
    # 3 draws below, 7 above: p = 2 * (1 + 3) / 11 = 8/11. (The null's mean is observed + 11.95; distance
    # from it counts the 3 low and 2 high draws as extreme: (1 + 5) / 11.)
    assert result["p_value"] == pytest.approx(8 / 11)


def test_null_p_values_are_not_concentrated_near_zero_for_pure_noise():
    p_values = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 5, 16, generator=g) + torch.randn(40, 1, 16, generator=g)
        labels = (torch.rand(40, generator=g) < 0.5).long()  # independent of x
        p_values.append(shuffled_label_null(x, labels, P=100, seed=seed)["p_value"])
    p_values = np.array(p_values)
    assert (p_values < 0.05).mean() <= 0.25 and p_values.mean() > 0.3


def test_null_rejects_a_planted_slow_turn():
    x, labels = planted(n_refused=60, n_complied=60, d=48, turn_deg=10.0, signal=2.0, noise=0.5)
    null = shuffled_label_null(x, labels, P=200, seed=0)
    # equal-tailed: no null draw is as low, so p = 2 * (1 + 0) / 201
    assert null["observed_deg"] < null["p2_5"] and null["p_value"] == pytest.approx(2 / 201)


# ----- split-half reliability -----

def test_reliability_correction_recovers_the_planted_angle_under_heavy_noise():
    for seed in range(3):
        x, labels = planted(n_refused=150, n_complied=150, d=400, turn_deg=50.0, signal=3.0, noise=1.2,
                            prompt_noise=0.0, seed=seed)
        raw = rotation_summary(mean_difference(*classes(x, labels)))["mean_deg"]
        split = split_half_reliability(x, labels, n_splits=40, seed=seed)
        assert raw > 60.0  # noise inflates the raw angle
        assert split["mean_corrected_angle_deg"] == pytest.approx(50.0, abs=5.0)
        assert split["reliable_pairs"] == 5 and min(split["same_layer_cos"]) > 0
        assert split["corrected_angle_deg"] == pytest.approx(
            [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in split["corrected_cos"]])


def test_vectorised_split_half_equals_a_loop_over_the_same_halves():
    x, labels = planted(n_refused=7, n_complied=6, n_layers=4, d=8, seed=4)
    result = split_half_reliability(x, labels, n_splits=6, seed=9)
    g = torch.Generator().manual_seed(9)
    refused_rows, complied_rows = torch.nonzero(labels == 1).flatten(), torch.nonzero(labels == 0).flatten()
    order_r = refused_rows[torch.argsort(torch.rand(6, 7, generator=g, dtype=torch.float64), dim=1)]
    order_c = complied_rows[torch.argsort(torch.rand(6, 6, generator=g, dtype=torch.float64), dim=1)]
    same, cross = [], []
    for r, c in zip(order_r, order_c):
        v_a, v_b = mean_difference(x[r[:3]], x[c[:3]]), mean_difference(x[r[3:]], x[c[3:]])
        same.append(cosine(v_a, v_b))
        cross.append((cosine(v_a[:-1], v_b[1:]) + cosine(v_b[:-1], v_a[1:])) / 2)
    same, cross = torch.stack(same), torch.stack(cross).mean(0)
    reliability = same.mean(0)
    expected = cross / (reliability[:-1] * reliability[1:]).sqrt()
    assert result["same_layer_cos"] == pytest.approx(reliability.tolist(), abs=1e-4)
    assert result["same_layer_angle_deg"] == pytest.approx(torch.rad2deg(torch.arccos(same)).mean(0).tolist(), abs=1e-2)
    assert result["corrected_cos"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_layer_without_signal_is_flagged_unreliable():
    x, labels = planted(n_refused=20, n_complied=20, n_layers=5)
    x[:, 2] = 1.0  # every prompt identical at layer 2: its MD is zero in every half, reliability 0
    split = split_half_reliability(x, labels, n_splits=5, seed=0)
    assert split["same_layer_cos"][2] == 0.0
    assert split["corrected_cos"][1] is None and split["corrected_cos"][2] is None
    assert split["corrected_angle_deg"][1:3] == [None, None] and split["reliable_pairs"] == 2


# ----- the analysis -----

COMPONENT_KEYS = {"pair_angles_deg", "mean_deg", "depth_sigma_deg", "prompt_bootstrap", "dispersion_bootstrap",
                  "null", "split_half", "differs_from_null", "reliable", "verdict"}


def test_analyze_rotation_schema_and_verdicts():
    x, labels = planted(n_refused=60, n_complied=60, n_layers=4, d=16, turn_deg=20.0, noise=0.5)
    noise = torch.randn(120, 4, 16, generator=torch.Generator().manual_seed(1))  # unrelated to the labels
    result = analyze_rotation({"mlp": x, "resid": noise}, labels.tolist(), B=50, P=100, n_splits=5, seed=0)
    json.dumps(result, allow_nan=False)  # JSON-ready
    assert {k: result[k] for k in ("schema_version", "analysis", "seed", "n_refused", "n_complied", "d_model",
                                   "n_layers")} == {"schema_version": 1, "analysis": "rotation", "seed": 0,
                                                    "n_refused": 60, "n_complied": 60, "d_model": 16, "n_layers": 4}
    assert result["conventions"] == {"layer_indexing": "block", "axis": "md", "angle": "degrees of signed cosine",
                                     "pairs": "(l, l+1)"}
    assert result["random_reference"] == {"mean_deg": 90.0, "sd_deg": pytest.approx(57.2958 / 4, rel=1e-6)}
    assert list(result["components"]) == ["resid", "mlp"]  # methods.md order
    planted_axis, unrelated = result["components"]["mlp"], result["components"]["resid"]
    for component in (planted_axis, unrelated):
        assert set(component) == COMPONENT_KEYS
        assert set(component["prompt_bootstrap"]) == {"B", "mean_ci95", "pair_ci95", "mean_ci95_basic",
                                                      "pair_ci95_basic", "bias_deg"}
        assert set(component["null"]) == {"P", "statistic", "mean_deg", "p2_5", "p97_5", "p_value"}
        assert set(component["split_half"]) == {"n_splits", "same_layer_angle_deg", "same_layer_cos", "corrected_cos",
                                                "corrected_angle_deg", "mean_corrected_angle_deg", "reliable_pairs"}
        assert len(component["pair_angles_deg"]) == 3 and len(component["prompt_bootstrap"]["pair_ci95"]) == 3
        assert len(component["split_half"]["same_layer_angle_deg"]) == 4
    assert planted_axis["mean_deg"] == pytest.approx(20.0, abs=2.0)
    assert planted_axis["differs_from_null"] and planted_axis["reliable"]
    assert planted_axis["null"]["p_value"] == pytest.approx(2 / 101)
    verdict = planted_axis["verdict"]
    assert verdict.startswith("mlp: the mean adjacent angle") and "differs from its shuffled-label null" in verdict
    assert "p = 0.0198 < 0.05" in verdict and "reliable at 60 refused / 60 complied prompts" in verdict
    assert not unrelated["differs_from_null"] and not unrelated["reliable"]
    assert "is indistinguishable from" in unrelated["verdict"] and "noise-dominated" in unrelated["verdict"]
    assert unrelated["dispersion_bootstrap"]["note"] == "resamples per-pair angles; ignores prompt sampling"


def test_bad_inputs_fail_with_the_fix_in_the_message():
    x, labels = planted(n_refused=5, n_complied=1, n_layers=3)
    with pytest.raises(TorsionError, match="at least 2 refused and 2 complied"):
        analyze_rotation({"resid": x}, labels, B=5, P=5, n_splits=2)
    with pytest.raises(TorsionError, match=r"values in \{0, 1\}"):
        prompt_bootstrap(x, labels * 2, B=5, seed=0)
    with pytest.raises(TorsionError, match="takes components"):
        analyze_rotation({"residual": x}, labels)


def test_percentile_interval_sits_above_a_noisy_angle_and_the_basic_one_covers_it():
    """Noise inflates angles twice in a resample, so only the basic interval covers."""
    g = torch.Generator().manual_seed(0)
    frame = torch.linalg.qr(torch.randn(48, 2, generator=g))[0].T
    turns = torch.deg2rad(torch.arange(6) * 60.0)
    axes = torch.cos(turns)[:, None] * frame[0] + torch.sin(turns)[:, None] * frame[1]
    covered_basic, covered_percentile = 0, 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x = 0.3 * torch.randn(120, 6, 48, generator=g)
        labels = torch.arange(120) < 60
        x[labels] += 3.0 * axes
        result = prompt_bootstrap(x, labels, B=200, seed=seed)
        lo, hi = result["mean_ci95_basic"]
        covered_basic += lo <= 60.0 <= hi
        covered_percentile += result["mean_ci95"][0] <= 60.0 <= result["mean_ci95"][1]
        assert result["bias_deg"] > 0
    assert covered_basic >= 10 and covered_percentile <= 4


def test_null_p_value_is_equal_tailed_for_a_skewed_null():
    """An observation below the null's 2.5th percentile is significant even with a long upper tail."""
    g = torch.Generator().manual_seed(0)
    frame = torch.linalg.qr(torch.randn(16, 2, generator=g))[0].T
    turns = torch.deg2rad(torch.arange(4) * 20.0)
    axes = torch.cos(turns)[:, None] * frame[0] + torch.sin(turns)[:, None] * frame[1]
    x = 5 * torch.randn(1, 1, 16, generator=g) + 0.1 * torch.randn(120, 4, 16, generator=g)
    labels = torch.arange(120) < 60
    x[labels] += 3.0 * axes
    null = shuffled_label_null(x, labels, P=100, seed=0)
    assert null["observed_deg"] < null["p2_5"]
    assert null["p_value"] < 0.05


def test_basic_interval_by_hand_and_clipped_to_the_angle_range():
    # two replicates a < b: q2.5 = a + 0.025 (b - a), q97.5 = a + 0.975 (b - a)
    np.testing.assert_allclose(basic_interval(30.0, np.array([28.0, 68.0]), **ANGLE_RANGE), [0.0, 31.0])  # [-7, 31]
    np.testing.assert_allclose(basic_interval(30.0, np.array([20.0, 60.0])), [1.0, 39.0])  # [60 - 59, 60 - 21]
    np.testing.assert_allclose(basic_interval(175.0, np.array([165.0, 185.0]), **ANGLE_RANGE),
                               [165.5, 180.0])  # [350 - 184.5, 350 - 165.5] = [165.5, 184.5]
    np.testing.assert_allclose(basic_interval(np.array([10.0, 30.0]), np.array([[0.0, 20.0], [40.0, 60.0]])),
                               [[-19.0, 19.0], [1.0, 39.0]])  # per column: [20 - 39, 20 - 1], [60 - 59, 60 - 21]


def test_basic_interval_of_a_near_zero_angle_stays_non_negative():
    """Parallel axes under noise: θ̂ is small and the resamples sit above it, so 2θ̂ − q97.5 < 0."""
    x, labels = planted(n_refused=8, n_complied=8, n_layers=4, d=8, turn_deg=0.0, signal=3.0, noise=1.0,
                        prompt_noise=0.0, seed=1)
    result = prompt_bootstrap(x, labels, B=200, seed=1)
    observed = rotation_summary(mean_difference(*classes(x, labels)))
    assert 2 * observed["mean_deg"] - result["mean_ci95"][1] < 0  # the unclipped lower end would be negative
    assert result["mean_ci95_basic"][0] == 0.0 and result["mean_ci95_basic"][1] > 0
    assert all(0.0 <= lo <= hi <= 180.0 for lo, hi in result["pair_ci95_basic"])


def test_verdict_names_the_basic_interval_and_records_the_reliability_threshold():
    x, labels = planted(n_refused=30, n_complied=30, n_layers=4, d=16, turn_deg=20.0, noise=1.0)
    result = analyze_rotation({"resid": x}, labels, B=20, P=20, n_splits=5, seed=0)
    component = result["components"]["resid"]
    assert "basic prompt-bootstrap 95% CI" in component["verdict"] and "bias" not in component["verdict"]
    assert result["parameters"]["reliable_median_split_half_angle_below_deg"] == 45.0
    median = float(np.median(component["split_half"]["same_layer_angle_deg"]))
    strict = analyze_rotation({"resid": x}, labels, B=20, P=20, n_splits=5, seed=0, reliable_below_deg=median / 2)
    assert component["reliable"] and not strict["components"]["resid"]["reliable"]
    assert strict["parameters"]["reliable_median_split_half_angle_below_deg"] == median / 2
    assert "< 45°)" in component["verdict"] and f"≥ {median / 2:g}°)" in strict["components"]["resid"]["verdict"]
