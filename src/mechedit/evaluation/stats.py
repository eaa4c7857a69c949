"""Confidence intervals, in one place: Wilson for rates, Student's t for means.

* A **rate** (k successes in n trials: efficacy success, exact-output locality) gets the Wilson score interval,
  which stays inside [0, 1] and is sensible at k = 0 or k = n where the normal approximation collapses to a point
  (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it for small n).
* A **mean** of real values (magnitudes, fluency, KL) gets the t interval ``mean ± t(0.975, n-1) · sd/√n``.
  scipy is not a dependency, so the t quantile comes from the Cornish-Fisher expansion around the normal
  quantile (error < 0.01 from 4 degrees of freedom on; exact table values for 1-3).

:func:`interval` picks between them: values that are all 0 or 1 are a rate, anything else a mean.

>>> lo, hi = wilson(9, 10)
>>> round(lo, 3), round(hi, 3)
(0.596, 0.982)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # standard normal 0.975 quantile


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for ``k`` successes out of ``n`` (``(nan, nan)`` when n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); the formula gives it only up to rounding.
    return (0.0 if k <= 0 else max(0.0, centre - half)), (1.0 if k >= n else min(1.0, centre + half))


def t_quantile(df: int, z: float = Z95) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom."""
    if df <= 0:
        return math.nan
    exact = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263}
    if df in exact and z == Z95:
        return exact[df]
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the t interval of the mean; lo = hi = mean for one value (no spread to estimate)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def clip(ci: tuple[float, float, float], bounds: tuple[float, float] | None) -> tuple[float, float, float]:
    """A t interval cut to the range the quantity can take (a rate's t interval over few edits can pass 1)."""
    if bounds is None:
        return ci
    lo_b, hi_b = bounds
    return ci[0], max(lo_b, ci[1]), min(hi_b, ci[2])


def rate_over_units(rates: Sequence[float], counts: Sequence[int]) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-unit rates (e.g. each edit's locality over its ``counts`` prompts): the t interval
    of the per-unit rates (the units are the independent draws), cut to [0, 1] and widened to contain the
    Wilson interval of the pooled count, so that units that all agree (every edit kept every sum) still get an
    interval that reflects how many prompts were asked, never a single point."""
    mean, lo, hi = clip(mean_ci(list(rates)), (0.0, 1.0))
    k = sum(round(r * n) for r, n in zip(rates, counts))
    w_lo, w_hi = wilson(k, sum(counts))
    return mean, min(lo, w_lo), max(hi, w_hi)


def interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi) of ``values`` (Nones dropped): Wilson when every value is 0 or 1, else t (cut to
    ``bounds``, the range the quantity can take, when given)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, math.nan
    if all(v in (0.0, 1.0) for v in vals):
        k, n = sum(vals), len(vals)
        return (k / n, *wilson(k, n))
    return clip(mean_ci(vals), bounds)
