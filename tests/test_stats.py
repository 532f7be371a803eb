import math

import pytest

from torsion.stats import wilson_interval


def test_wilson_hand_values():
    # k=5, n=10, z=1.96: centre = (0.5 + 0.19208)/1.38416 = 0.5, half = 1.96*sqrt(0.025+0.0096040)/1.38416
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
