import math

import numpy as np
import pytest
import torch

from torsion.analysis.rotation import (
    analyze_rotation,
    dispersion_bootstrap,
    prompt_bootstrap,
    rotation_summary,
    shuffled_label_null,
    split_half_reliability,
)
from torsion.geometry import adjacent_angles, angle_deg, random_angle_reference
from torsion.vectors import mean_difference


def planted(n_refused=60, n_complied=60, n_layers=6, d=48, turn_deg=60.0, signal=3.0, noise=0.1, seed=0):
    """Refused = complied + signal·u_l, where u_l turns by ``turn_deg`` per layer in a fixed plane.

    Every prompt carries the same large offset (the residual stream's shared part) plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    frame = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # two orthonormal rows
    angles = torch.deg2rad(torch.arange(n_layers) * turn_deg)
    axes = torch.cos(angles)[:, None] * frame[0] + torch.sin(angles)[:, None] * frame[1]  # [L, d]
    n = n_refused + n_complied
    shared = torch.randn(1, 1, d, generator=g) * 5  # a large component carried across layers
    x = shared + noise * torch.randn(n, n_layers, d, generator=g)
    refused = torch.zeros(n, dtype=torch.bool)
    refused[:n_refused] = True
    x[refused] += signal * axes
    return x, refused


def test_geometry_helpers():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert adjacent_angles(v).tolist() == pytest.approx([45.0, 135.0])
    assert float(angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))) == 0.0


def test_random_reference_matches_monte_carlo():
    d = 256
    mean, sd = random_angle_reference(d)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, d, generator=g), torch.randn(20000, d, generator=g)
    angles = angle_deg(a, b)
    assert mean == 90.0 and sd == pytest.approx(57.2958 / math.sqrt(d), rel=1e-4)
    assert float(angles.mean()) == pytest.approx(90.0, abs=0.1)
    assert float(angles.std()) == pytest.approx(sd, rel=0.03)


def test_planted_turn_is_recovered_within_its_ci():
    covered, percentile_covered = [], []
    for seed in range(12):
        x, refused = planted(noise=0.3, seed=seed)
        summary = rotation_summary(mean_difference(x[refused], x[~refused]))
        assert summary["mean_deg"] == pytest.approx(60.0, abs=2.0)
        bootstrap = prompt_bootstrap(x, refused, B=200, seed=seed)
        lo, hi = bootstrap["mean_ci95_basic"]
        covered.append(lo <= 60.0 <= hi)
        percentile_covered.append(bootstrap["mean_ci95"][0] <= 60.0 <= bootstrap["mean_ci95"][1])
        assert bootstrap["bias_deg"] > 0 and hi - lo < 3
    assert sum(covered) >= 10  # the bias-corrected interval covers the planted angle
    assert sum(percentile_covered) <= 4  # the percentile interval sits above it: noise inflates angles


def test_vectorised_bootstrap_equals_a_loop():
    x, refused = planted(n_refused=7, n_complied=5, n_layers=4, d=8)
    result = prompt_bootstrap(x, refused, B=5, seed=3)
    g = torch.Generator().manual_seed(3)
    x_r, x_c = x[refused], x[~refused]
    expected = []
    for _ in range(5):  # the same draws in the same order, one resample at a time
        i_r = torch.randint(0, len(x_r), (1, len(x_r)), generator=g)[0]
        i_c = torch.randint(0, len(x_c), (1, len(x_c)), generator=g)[0]
        expected.append(float(adjacent_angles(mean_difference(x_r[i_r], x_c[i_c])).mean()))
    # one chunk of 5 draws: all refused indices first, then all complied ones
    g = torch.Generator().manual_seed(3)
    i_r = torch.randint(0, len(x_r), (5, len(x_r)), generator=g)
    i_c = torch.randint(0, len(x_c), (5, len(x_c)), generator=g)
    expected = [float(adjacent_angles(mean_difference(x_r[i_r[b]], x_c[i_c[b]])).mean()) for b in range(5)]
    assert result["means"] == pytest.approx(expected, abs=1e-3)


def test_null_p_values_are_not_concentrated_near_zero_for_noise():
    p_values = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 5, 16, generator=g) + torch.randn(40, 1, 16, generator=g)
        refused = torch.rand(40, generator=g) < 0.5
        p_values.append(shuffled_label_null(x, refused, P=100, seed=seed)["p_value"])
    p_values = np.array(p_values)
    assert (p_values < 0.05).mean() <= 0.25 and p_values.mean() > 0.3


def test_null_rejects_a_planted_structure():
    x, refused = planted(turn_deg=10.0, signal=2.0)
    null = shuffled_label_null(x, refused, P=200, seed=0)
    assert null["p_value"] < 0.02 and null["observed_deg"] < null["p2_5"]


def test_reliability_correction_recovers_the_planted_angle_under_noise():
    x, refused = planted(n_refused=150, n_complied=150, d=100, turn_deg=50.0, signal=1.5, noise=1.5)
    raw = rotation_summary(mean_difference(x[refused], x[~refused]))["mean_deg"]
    split = split_half_reliability(x, refused, n_splits=40, seed=0)
    assert raw > 60.0  # noise inflates the raw angle
    assert split["mean_corrected_angle_deg"] == pytest.approx(50.0, abs=8.0)
    assert split["reliable_pairs"] == 5


def test_dispersion_bootstrap_of_constant_angles_is_degenerate():
    result = dispersion_bootstrap(torch.full((7,), 88.0), B=100, seed=0)
    assert result["mean_ci95"] == pytest.approx([88.0, 88.0]) and "ignores prompt sampling" in result["note"]


def test_analyze_rotation_schema_and_verdict():
    x, refused = planted(n_layers=4, d=16, turn_deg=20.0)
    result = analyze_rotation({"resid": x, "mlp": x * 2}, refused, B=50, P=100, n_splits=5, seed=0)
    assert result["n_layers"] == 4 and result["n_refused"] == 60 and result["schema_version"] == 1
    component = result["components"]["resid"]
    assert len(component["pair_angles_deg"]) == 3 and len(component["prompt_bootstrap"]["pair_ci95"]) == 3
    assert component["differs_from_null"] and component["reliable"]
    assert component["verdict"].startswith("resid: mean adjacent angle") and "differs from" in component["verdict"]
