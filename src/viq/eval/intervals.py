"""Confidence intervals for the figures viq reports: Wilson intervals of accuracies, Student-t
intervals of means (pure Python, no scipy).

Every evaluation and benchmark that shows a figure with an interval takes it from here, so one method
is behind every "± x" in the docs.
"""

from __future__ import annotations

import math

__all__ = ["Z95", "mean_ci95", "t_quantile_975", "wilson_interval"]

#: the 0.975 quantile of the standard normal
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> list[float]:
    """95 % (``z`` = 1.96) Wilson score interval ``[lo, hi]`` of the proportion ``correct / n``;
    ``[0.0, 1.0]`` when ``n == 0``."""
    if n < 0 or not 0 <= correct <= max(n, 0):
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 (or n) successes the bound is exactly 0 (1); computed, it can come out a rounding error away.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return [lo, hi]


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (12.706 for df = 1).

    Solves ``P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2) = 0.05`` by bisection on ``x = df/(df+t^2)``
    (pure Python, no scipy); accurate to ~1e-9.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    lo, hi = 0.0, 1.0  # I_x is increasing in x; want I_x = 0.05
    for _ in range(100):  # the bracket shrinks below one ulp long before 100 halvings
        mid = 0.5 * (lo + hi)
        if _betainc(df / 2.0, 0.5, mid) < 0.05:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


def mean_ci95(values: list[float]) -> tuple[float, list[float | None]]:
    """Mean and two-sided 95 % Student-t interval of the mean (``[None, None]`` below two values
    or when some value is infinite, e.g. the PSNR of an exact reconstruction)."""
    n = len(values)
    if n == 0:
        return math.nan, [None, None]
    if any(math.isinf(v) for v in values):  # an exact reconstruction (PSNR only): mean is inf
        return sum(values) / n, [None, None]
    mean = math.fsum(values) / n
    if n < 2:
        return mean, [None, None]
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(var / n)
    return mean, [mean - half, mean + half]
