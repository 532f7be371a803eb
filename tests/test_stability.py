"""Learning-curve stability: planted curves, planted topic bins, vectorised draws against a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torsion.analysis.learning_curve import (centred_gram, fit_learning_curve, learning_curve_entry, pool_sizes,
                                             profile_fit, proportional_split, reference_sizes, split_counts,
                                             subsample_angles)
from torsion.analysis.stability import analyze_stability, bin_contamination, eta_squared, first_pc_scores
from torsion.errors import TorsionError
from torsion.geometry import angle_deg
from torsion.vectors import mean_difference


def test_pool_sizes_are_geometric_from_m_to_n():
    assert pool_sizes(256, m=5) == [round(5 * (256 / 5) ** (i / 7)) for i in range(8)]
    assert pool_sizes(6, m=5) == [5, 6]  # rounded duplicates are dropped
    with pytest.raises(TorsionError, match="lower m"):
        pool_sizes(4, m=5)


def test_proportional_split_keeps_class_shares_and_one_of_each():
    assert proportional_split(10, 30, 70) == (3, 7)
    assert proportional_split(5, 1, 99) == (1, 4)
    assert proportional_split(5, 99, 1) == (4, 1)


@pytest.mark.parametrize("k, a, floor", [(40.0, 0.6, 12.0), (80.0, 0.5, 3.0), (25.0, 1.2, 30.0)])
def test_planted_learning_curve_is_recovered(k, a, floor):
    sizes = pool_sizes(512, m=5)[:-1]
    n = np.asarray(sizes, dtype=float)
    noise = np.random.default_rng(0).normal(0, 0.05, len(n))
    fit = fit_learning_curve(sizes, k / n**a + floor + noise)
    assert fit["floor_deg"] == pytest.approx(floor, rel=0.10)
    assert fit["a"] == pytest.approx(a, rel=0.15)
    exact = fit_learning_curve(sizes, k / n**a + floor)
    assert (exact["k"], exact["a"], exact["floor_deg"]) == pytest.approx((k, a, floor), rel=1e-3)


def test_profile_fit_honours_the_bounds():
    sizes = [5, 9, 15, 27, 48, 84, 146]
    rising = np.linspace(1.0, 20.0, len(sizes))  # the best unconstrained fit has k < 0
    k, a, floor = profile_fit(sizes, rising[None])
    assert k[0] >= 0 and floor[0] >= 0 and 0 <= a[0] <= 4
    assert k[0] == 0 and floor[0] == pytest.approx(rising.mean())  # the k = 0 edge: the mean


def _naive_angles(x, first, second, sizes, B, seed, resample_second):
    """The definition, one draw at a time, with the same draws as the vectorised path."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.tensor(first), torch.tensor(second)
    full = mean_difference(x[first], x[second])
    out = torch.zeros(len(sizes), B, x.shape[1], dtype=torch.float64)
    n_pool = len(first) + (len(second) if resample_second else 0)
    for s, size in enumerate(sizes):
        if size >= n_pool:
            continue
        n_first = proportional_split(size, len(first), len(second))[0] if resample_second else size
        order_first = torch.argsort(torch.rand(B, len(first), generator=generator, dtype=torch.float64), dim=1)
        if resample_second:
            n_second = proportional_split(size, len(first), len(second))[1]
            order_second = torch.argsort(torch.rand(B, len(second), generator=generator, dtype=torch.float64), dim=1)
        for b in range(B):
            pick_first = first[order_first[b, :n_first]]
            pick_second = second[order_second[b, :n_second]] if resample_second else second
            out[s, b] = angle_deg(mean_difference(x[pick_first], x[pick_second]), full)
    return out


@pytest.mark.parametrize("resample_second", [True, False])
def test_vectorised_instability_equals_a_naive_loop(resample_second):
    torch.manual_seed(1)
    x = torch.randn(40, 3, 16) + 5.0  # a shared offset, as the residual stream has
    first = list(range(0, 40, 3))
    second = list(range(40)) if not resample_second else [i for i in range(40) if i % 3]
    n_pool = len(first) + (len(second) if resample_second else 0)
    sizes = pool_sizes(n_pool, m=5, n_sizes=5)
    vectorised = subsample_angles(centred_gram(x), first, second, sizes, B=12, seed=3,
                                  resample_second=resample_second)
    naive = _naive_angles(x, first, second, sizes, 12, 3, resample_second)
    assert vectorised[-1].abs().max() == 0  # the full pool
    torch.testing.assert_close(vectorised, naive, atol=2e-3, rtol=1e-5)  # float32 means in the loop
    assert vectorised[0].mean() > vectorised[-2].mean()  # smaller pools are less stable


def test_eta_squared_matches_a_hand_computation():
    values = torch.tensor([1.0, 2.0, 3.0, 7.0, 8.0, 9.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    # group means 2 and 8, grand mean 5: between = 6 * 9 = 54; total = 54 + 4 (within) = 58
    assert float(eta_squared(values, groups)) == pytest.approx(54 / 58)


def test_a_bin_whose_first_pc_is_the_category_gets_eta2_near_one():
    torch.manual_seed(0)
    n, d = 40, 24
    categories = ["drugs" if i % 2 else "fraud" for i in range(n)]
    topic = torch.randn(d)
    sign = torch.tensor([1.0 if c == "drugs" else -1.0 for c in categories])
    x = 3.0 * sign[:, None, None] * topic + 0.1 * torch.randn(n, 2, d)  # [n, 2 layers, d]
    assert eta_squared(first_pc_scores(centred_gram(x)), categories).min() > 0.98
    noise_only = torch.randn(n, 2, d)
    assert eta_squared(first_pc_scores(centred_gram(noise_only)), categories).max() < 0.5


def test_bin_contamination_spread_and_eta2():
    torch.manual_seed(0)
    n, d = 60, 32
    categories = [["a", "b", "c"][i % 3] for i in range(n)]
    x = torch.randn(n, 1, d)
    bin_rows = list(range(20))
    x[bin_rows] += 4.0 * torch.randn(d)  # a tight cluster away from the rest
    result = bin_contamination(centred_gram(x), bin_rows, categories, seed=0)
    assert result["spread_deg"][0] < result["spread_random_deg"][0] - 20
    assert result["eta2_category"][0] < 0.5  # the bin's spread is noise, not topic


def test_analyze_stability_separates_a_steady_vector_from_a_noisy_one():
    torch.manual_seed(0)
    n, d = 120, 64
    scores = [1.0 if i % 2 else -1.0 for i in range(n)]
    labels = ["strong_refuse" if s > 0 else "strong_comply" for s in scores]
    categories = [["a", "b"][i % 4 // 2] for i in range(n)]
    axis = torch.randn(d)
    refused = torch.tensor([s > 0 for s in scores])
    x = torch.randn(n, 2, d)
    x[refused, 0] += 3.0 * axis  # block 0: a strong refusal direction; block 1: none
    result = analyze_stability({"resid": x}, scores, labels, categories, B=40, n_replicates=50, seed=0,
                               reference="pool")
    assert result["parameters"]["reference"] == "pool" and result["parameters"]["methods_md_definition"]
    md = {e["block"]: e for e in result["entries"] if e["kind"] == "global"}
    assert md[0]["floor_deg"] < 5 and md[0]["structural"] is False
    assert md[1]["instability_deg"][0] > md[0]["instability_deg"][0] + 20
    assert md[0]["sizes"] == pool_sizes(n) and md[0]["instability_deg"][-1] == 0
    lo, hi = md[0]["floor_ci"]
    assert lo <= md[0]["floor_deg"] + 1e-6 and hi >= lo
    kinds = {(e["kind"], e["name"]) for e in result["entries"]}
    assert kinds == {("global", "md"), ("category", "a"), ("category", "b"), ("bin", "strong_refuse"),
                     ("bin", "strong_comply")}
    bins = [e for e in result["entries"] if e["kind"] == "bin"]
    assert all("eta2_category" in e and "spread_deg" in e for e in bins)
    assert any("weak_comply" in s for s in result["skipped"])
    again = analyze_stability({"resid": x}, scores, labels, categories, B=40, n_replicates=50, seed=0,
                              reference="pool")
    assert again["entries"] == result["entries"]


def _naive_split_angles(x, first, second, sizes, B, seed, resample_second):
    """The split reference one draw at a time: two disjoint subsamples, the same draws as the vectorised path."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.tensor(first), torch.tensor(second)
    centre = x.double().mean(0)
    out = torch.zeros(len(sizes), B, x.shape[1], dtype=torch.float64)
    for s, size in enumerate(sizes):
        n_first, n_second = split_counts(size, len(first), len(second)) if resample_second else (size, 0)
        order_first = torch.argsort(torch.rand(B, len(first), generator=generator, dtype=torch.float64), dim=1)
        if resample_second:
            order_second = torch.argsort(torch.rand(B, len(second), generator=generator, dtype=torch.float64), dim=1)
        for b in range(B):
            halves = []
            for start in (0, n_first):
                rows = first[order_first[b, start:start + n_first]]
                if resample_second:
                    start_second = 0 if start == 0 else n_second
                    other = second[order_second[b, start_second:start_second + n_second]]
                    halves.append((rows, mean_difference(x[rows].double(), x[other].double())))
                else:
                    halves.append((rows, x[rows].double().mean(0) - centre))
            assert not set(halves[0][0].tolist()) & set(halves[1][0].tolist())  # disjoint
            out[s, b] = angle_deg(halves[0][1], halves[1][1])
    return out


@pytest.mark.parametrize("resample_second", [True, False])
def test_split_reference_equals_a_naive_loop_over_disjoint_subsamples(resample_second):
    torch.manual_seed(2)
    x = torch.randn(41, 3, 16) + 5.0
    first = list(range(0, 41, 3))
    second = [i for i in range(41) if i % 3] if resample_second else []
    n_pool = len(first) + len(second)
    sizes = reference_sizes(n_pool, "split", m=3, n_sizes=5)
    assert sizes[-1] == n_pool // 2
    vectorised = subsample_angles(centred_gram(x), first, second, sizes, B=10, seed=5,
                                  resample_second=resample_second, reference="split")
    naive = _naive_split_angles(x, first, second, sizes, 10, 5, resample_second)
    torch.testing.assert_close(vectorised, naive, atol=1e-6, rtol=1e-6)
    assert vectorised[-1].min() > 0  # nothing forces the largest size to 0


def test_split_counts_keep_proportions_and_leave_room_for_two():
    assert split_counts(10, 30, 70) == (3, 7)
    assert split_counts(7, 7, 7) == (3, 3)  # proportional_split gives (4, 3): capped at half of the class
    with pytest.raises(TorsionError, match="two disjoint"):
        subsample_angles(centred_gram(torch.randn(10, 1, 4)), [0, 1, 2], list(range(3, 10)), [8], B=2, seed=0,
                         reference="split")
    with pytest.raises(TorsionError, match="choose pool or split"):
        reference_sizes(40, "half", m=5, n_sizes=8)


def test_split_over_pool_follows_the_finite_population_formula():
    """Small angles: the split curve is sqrt(2 / (1 - n/N)) times the pool curve (variances 2S²/n and S²(1/n - 1/N))."""
    torch.manual_seed(0)
    n, d = 200, 64
    first, second = list(range(0, n, 2)), list(range(1, n, 2))
    axis = torch.nn.functional.normalize(torch.randn(d), dim=0)
    x = torch.randn(n, 1, d) + 5.0
    x[first, 0] += 17.0 * axis  # a strong direction: angles of a few degrees to 25
    gram, sizes = centred_gram(x), [10, 20, 40, 80]
    pool = subsample_angles(gram, first, second, sizes, B=400, seed=1, reference="pool").mean(1)[:, 0]
    split = subsample_angles(gram, first, second, sizes, B=400, seed=2, reference="split").mean(1)[:, 0]
    expected = torch.tensor([(2 / (1 - size / n)) ** 0.5 for size in sizes], dtype=torch.float64)
    torch.testing.assert_close(split / pool, expected, rtol=0.06, atol=0)


def test_a_planted_floor_is_recovered_through_the_split_curve():
    """Per-draw angles around k/n^a + floor at the split sizes of a pool of 400: the floor within 10%, in its CI."""
    sizes = reference_sizes(400, "split", m=5, n_sizes=8)
    n = np.asarray(sizes, dtype=float)
    rng = np.random.default_rng(0)
    planted = np.stack([40.0 / n**0.6 + 12.0, 80.0 / n**0.5 + 3.0], axis=-1)  # [n_sizes, 2 layers]
    angles = planted[:, None, :] + rng.normal(0, 2.0, (len(sizes), 200, 2))
    entries = learning_curve_entry(sizes, angles, n_replicates=200, seed=0, threshold_deg=15.0, reference="split")
    for entry, floor in zip(entries, (12.0, 3.0)):
        assert entry["floor_deg"] == pytest.approx(floor, rel=0.10)
        assert entry["floor_ci"][0] <= floor <= entry["floor_ci"][1]
        assert len(entry["instability_deg"]) == len(sizes)  # every size is fitted and reported
    assert [e["structural"] for e in entries] == [False, False]
    assert learning_curve_entry(sizes, angles + 20.0, n_replicates=200, seed=0, threshold_deg=15.0,
                                reference="split")[0]["structural"] is True


def test_a_steady_direction_has_no_floor_and_a_few_dominant_rows_do_under_split_only():
    torch.manual_seed(0)
    n, d = 200, 64
    first, second = list(range(0, n, 2)), list(range(1, n, 2))
    axis = torch.nn.functional.normalize(torch.randn(d), dim=0)
    x = torch.randn(n, 2, d) + 5.0
    x[first] += 8.5 * axis  # both blocks: signal plus iid noise
    x[first[:4], 1] += 100.0 * torch.randn(4, d)  # block 1: four rows dominate the estimate
    gram = centred_gram(x)
    floors = {}
    for reference in ("pool", "split"):
        sizes = reference_sizes(n, reference, m=5, n_sizes=8)
        angles = subsample_angles(gram, first, second, sizes, B=200, seed=1, reference=reference)
        entries = learning_curve_entry(sizes, angles.numpy(), n_replicates=100, seed=0, threshold_deg=15.0,
                                       reference=reference)
        floors[reference] = [e["floor_deg"] for e in entries]
        if reference == "pool":
            assert angles[-1].abs().max() == 0  # n = N is the pool itself
    assert floors["split"][0] < 1.0 and floors["pool"][0] < 1.0  # iid noise: no floor either way
    assert floors["split"][1] > 30.0 and floors["pool"][1] < 1.0  # the pool reference cannot see it


def test_analyze_stability_split_is_the_default_and_says_so():
    torch.manual_seed(0)
    n, d = 60, 16
    scores = [1.0 if i % 2 else -1.0 for i in range(n)]
    labels = ["strong_refuse" if s > 0 else "strong_comply" for s in scores]
    labels[:8] = ["weak_comply"] * 8  # 8 rows: a knot under pool (m = 5), too few for split (2m)
    categories = ["a"] * n
    x = torch.randn(n, 1, d)
    result = analyze_stability({"resid": x}, scores, labels, categories, B=10, n_replicates=10, seed=0)
    assert result["parameters"] == {"reference": "split", "methods_md_definition": False}
    assert "deviates from methods.md" in result["conventions"]["reference"]
    md = next(e for e in result["entries"] if e["kind"] == "global")
    assert md["sizes"] == pool_sizes(n // 2) and md["instability_deg"][-1] > 0
    assert any("weak_comply" in s and "reference split" in s for s in result["skipped"])
    assert not any(e["name"] == "weak_comply" for e in result["entries"])
    with pytest.raises(TorsionError, match="unknown reference"):
        analyze_stability({"resid": x}, scores, labels, categories, B=10, n_replicates=10, reference="full")
