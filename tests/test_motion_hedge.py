"""Orthogonal motion and hedge geometry on planted geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torsion.analysis.hedge import hedge_geometry_test, position_and_bow, prompts_needed
from torsion.analysis.motion import compliance_destination, motion_stats, orthogonal_fraction
from torsion.stats import basic_interval


def test_orthogonal_fraction_of_planted_shifts():
    axis = torch.tensor([3.0, 0.0, 0.0, 0.0])
    assert float(orthogonal_fraction(torch.tensor([0.0, 2.0, -1.0, 0.0]), axis)) == pytest.approx(1.0)
    assert float(orthogonal_fraction(torch.tensor([-5.0, 0.0, 0.0, 0.0]), axis)) == pytest.approx(0.0)
    # 3-4-5: the perpendicular part is 4 of 5
    assert float(orthogonal_fraction(torch.tensor([3.0, 4.0, 0.0, 0.0]), axis)) == pytest.approx(0.8)


def test_basic_interval_reflects_the_percentiles():
    replicates = np.arange(1, 1001, dtype=float) / 100  # 0.01 … 10
    q_lo, q_hi = np.percentile(replicates, [2.5, 97.5])
    assert basic_interval(4.0, replicates) == pytest.approx([8 - q_hi, 8 - q_lo])
    assert basic_interval(4.0, replicates, lower=0.0)[0] == 0.0  # 8 − 9.75 < 0 is clipped


def test_motion_stats_on_a_planted_orthogonal_push():
    torch.manual_seed(0)
    n, d = 64, 32
    axis_s, axis_r, sideways = torch.eye(d)[0], torch.eye(d)[1], torch.eye(d)[2]
    unsteered = torch.randn(n, d) + 10.0
    steered = unsteered + 5.0 * sideways + 0.1 * torch.randn(n, d)  # the model moves perpendicular to both axes
    stats = motion_stats(steered, unsteered, axis_s, axis_r, B=400, seed=0)
    frac = stats["orthogonal_fraction_steered_axis"]
    assert frac["estimate"] > 0.99 and frac["ci95_basic"][1] == pytest.approx(1.0, abs=1e-3)
    assert stats["orthogonal_fraction_readout_axis"]["estimate"] > 0.99
    assert stats["u_norm"]["estimate"] == pytest.approx(5.0, rel=0.02)
    lo, hi = stats["u_dot_steered_axis"]["ci95_basic"]
    assert lo < 0 < hi
    torch.testing.assert_close(stats["u"], (steered - unsteered).mean(0))

    along = unsteered - 4.0 * axis_s + 0.1 * torch.randn(n, d)
    parallel = motion_stats(along, unsteered, axis_s, axis_r, B=400, seed=0)
    assert parallel["orthogonal_fraction_steered_axis"]["estimate"] < 0.05
    assert parallel["orthogonal_fraction_readout_axis"]["estimate"] > 0.99
    assert parallel["u_dot_steered_axis"]["estimate"] == pytest.approx(-4.0, rel=0.02)


def test_compliance_destination_angle():
    axis_r = torch.tensor([1.0, 0.0, 0.0])
    base = torch.zeros(4, 3)
    complied = torch.tensor([[-1.0, 1.0, 0.0]]).repeat(3, 1)  # 135° from the refusal axis
    assert compliance_destination(complied, base, axis_r) == pytest.approx(135.0)


def test_position_and_bow_by_hand():
    a, b = torch.zeros(3), torch.tensor([2.0, 0.0, 0.0])
    t, bow = position_and_bow(a, b, torch.tensor([0.5, 1.0, 0.0]))
    assert float(t) == pytest.approx(0.25) and float(bow) == pytest.approx(0.5)


def _planted(seed: int, off_line_sds: float, n: int = 30, d: int = 16):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(d), torch.zeros(d)
    b[0] = 6.0
    h = a + 0.4 * (b - a)
    h[1] += off_line_sds  # noise sd is 1
    states = torch.cat([c + torch.randn(n, d, generator=generator) for c in (a, b, h)])
    groups = ["refused"] * n + ["strong_comply"] * n + ["hedge"] * n
    return states, groups


def test_an_on_line_hedge_has_no_bow_and_an_uneventful_p_value():
    p_values, bows, positions = [], [], []
    for seed in range(20):
        states, groups = _planted(seed, 0.0)
        result = hedge_geometry_test(states, groups, B=200, P=200, seed=seed)
        p_values.append(result["bow_null"]["p_value"])
        bows.append(result["bow"]["estimate"])
        positions.append(result["t"]["estimate"])
    assert np.mean(np.array(p_values) < 0.05) <= 0.25
    assert np.median(bows) < 0.2  # only the centroids' noise: about sqrt(d / n) / |b − a| ≈ 0.12
    assert np.mean(positions) == pytest.approx(0.4, abs=0.05)


def test_a_hedge_off_the_line_by_three_sds_is_detected():
    detected = 0
    for seed in range(10):
        states, groups = _planted(seed, 3.0)
        result = hedge_geometry_test(states, groups, B=200, P=200, seed=seed)
        detected += result["bow_null"]["p_value"] < 0.05
        assert result["bow"]["estimate"] == pytest.approx(0.5, abs=0.15)  # 3 sds over a segment of 6
        assert result["centroid_wobble_deg"]["hedge"] > 0
    assert detected >= 9


def test_small_groups_get_counts_and_the_prompts_needed():
    states, groups = _planted(0, 0.0, n=10)
    groups = groups[:20] + ["hedge"] * 2 + ["other"] * 8
    result = hedge_geometry_test(states, groups, B=50, P=50, seed=0)
    assert result["geometry"] is None and result["counts"] == {"refused": 10, "strong_comply": 10, "hedge": 2}
    assert result["prompts_needed"] == 75  # 5 hedges at 2 in 30
    assert prompts_needed({"hedge": 0}, 30, 5) == 50  # rule of three
    assert "about 75 prompts at these rates" in result["note"]


def test_an_unseen_group_gives_a_lower_bound_not_an_estimate():
    states, groups = _planted(0, 0.0, n=10)
    groups = groups[:20] + ["other"] * 10
    result = hedge_geometry_test(states, groups, B=50, P=50, seed=0)
    assert result["counts"]["hedge"] == 0 and result["prompts_needed"] == 50  # 5 * 30 / 3
    assert "at least 50 prompts" in result["note"] and "about" not in result["note"]
