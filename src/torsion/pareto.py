"""Two-objective Pareto fronts (both minimised): dominance, the 2-D hypervolume, the knee and pick rules.

Points are ``(refusal_rate, kl)`` pairs in the multi-objective search (:mod:`torsion.optimize_multi`),
but nothing here knows that: any two minimised objectives.

- :func:`hypervolume_2d`: the area dominated by the points and bounded by ``reference`` (points
  not strictly better than the reference in both objectives add nothing).
- :func:`knee_index`: each objective min–max normalised over the points, then the point closest
  (Euclidean) to the ideal corner ``(0, 0)``; ties go to the lower index.
- :func:`pick_index`: ``refusal<=X`` (among points whose first objective is ≤ X, the lowest second
  objective; ties to the lower first objective, then index), ``knee``, or an index.

Example::

    hypervolume_2d([(0.1, 0.5), (0.4, 0.2)], reference=(1.0, 1.0))   # 0.9*0.5 + 0.6*0.3 = 0.63
    pick_index([(0.1, 0.5), (0.4, 0.2)], "refusal<=0.2")              # 0
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from torsion.errors import TorsionError

Point = tuple[float, float]
PICK_RULE = re.compile(r"^refusal\s*<=\s*([0-9]*\.?[0-9]+)$")


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in both objectives and better in one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def front_indices(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (equal points all stay), ascending."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """Area of ``{y : some point p ≤ y ≤ reference}`` (minimisation), by a sweep over the front."""
    inside = [(float(x), float(y)) for x, y in points
              if math.isfinite(x) and math.isfinite(y) and x < reference[0] and y < reference[1]]
    front = sorted({inside[i] for i in front_indices(inside)})  # x ascending, so y descending
    area, ceiling = 0.0, float(reference[1])
    for x, y in front:
        area += (reference[0] - x) * (ceiling - y)
        ceiling = y
    return area


def knee_index(points: Sequence[Point]) -> int:
    """The point closest to the ideal corner after min–max normalising each objective over ``points``."""
    if not points:
        raise TorsionError("the front has no points; run the search first")
    scaled = []
    for axis in (0, 1):
        values = [p[axis] for p in points]
        low, span = min(values), max(values) - min(values)
        scaled.append([(v - low) / span if span > 0 else 0.0 for v in values])
    distances = [math.hypot(a, b) for a, b in zip(*scaled)]
    return min(range(len(points)), key=lambda i: (distances[i], i))


def check_pick(rule: str) -> str:
    """``rule`` if it is ``refusal<=X`` (0 ≤ X ≤ 1), ``knee`` or a non-negative index, else a one-line error."""
    text = rule.strip()
    if text == "knee" or text.isdigit():
        return text
    match = PICK_RULE.match(text)
    if match and 0.0 <= float(match.group(1)) <= 1.0:
        return text
    raise TorsionError(f"--pick {rule!r} is not a rule; pass 'refusal<=X' with X in [0, 1], knee, or a front "
                       "index such as 0")


def pick_index(points: Sequence[Point], rule: str) -> int:
    """The index of the point ``rule`` picks (see the module docstring); one line when none matches."""
    text = check_pick(rule)
    if text == "knee":
        return knee_index(points)
    if text.isdigit():
        index = int(text)
        if index >= len(points):
            raise TorsionError(f"--pick {index}: the front has {len(points)} points (indices 0..{len(points) - 1}); "
                               "pass one of those")
        return index
    bound = float(PICK_RULE.match(text).group(1))
    eligible = [i for i, p in enumerate(points) if p[0] <= bound]
    if not eligible:
        lowest = min((p[0] for p in points), default=float("nan"))
        raise TorsionError(f"no front point has held-out refusal rate <= {bound:g} (the lowest is {lowest:.3f}); "
                           "loosen the bound, or pass knee or an index")
    return min(eligible, key=lambda i: (points[i][1], points[i][0], i))
