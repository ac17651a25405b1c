"""Exact (Clopper-Pearson) binomial confidence bounds, without scipy.

    k successes in n trials ─ solve I_p(a, b) = alpha for p by bisection ─► bound on the rate

I_x(a, b) is the regularized incomplete beta function, evaluated with the continued fraction
of Numerical Recipes (modified Lentz) and `math.lgamma`; P(Binomial(n, p) >= k) =
I_p(k, n - k + 1), so the one-sided lower bound at confidence 1 - alpha is the p where that
tail probability equals alpha (and symmetrically for the upper bound).
"""

from __future__ import annotations

import math
from functools import lru_cache

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 10_000


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast here
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def binom_sf(k: float, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return betainc(k, n - k + 1, p)


def _check(k: float, n: int, confidence: float) -> None:
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")


@lru_cache(maxsize=65536)
def clopper_pearson_lower(k: float, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a success rate after k successes in n trials.

    With probability at least `confidence` (over the sample), the true rate is >= this
    bound. 0 when k = 0 (or n = 0: nothing observed, nothing promised). A fractional k
    gives the same beta quantile (what `samples_needed` uses).
    """
    _check(k, n, confidence)
    if k == 0:
        return 0.0
    alpha = 1.0 - confidence
    if k == n:  # closed form: p**n = alpha
        return float(alpha ** (1.0 / n))
    lo, hi = 0.0, k / n  # P(X >= k | p) rises with p; at p = k/n it is > alpha
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binom_sf(k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return lo


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate after k events in n trials (1 when n = 0)."""
    _check(k, n, confidence)
    if n == 0:
        return 1.0
    return 1.0 - clopper_pearson_lower(n - k, n, confidence)


def samples_needed(
    rate: float, margin: float, confidence: float = 0.95, *, limit: int = 10**9
) -> int | None:
    """Fewest trials n at which the lower bound at an observed success `rate` lies within
    `margin` of it: rate - clopper_pearson_lower(rate * n, n, confidence) <= margin.

    The successes rate * n are taken as a real number, so the width falls steadily with n
    and bisection finds the least n. None when the margin is not positive or no n up to
    `limit` is enough.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if margin <= 0.0:
        return None

    def wide(n: int) -> bool:
        return rate - clopper_pearson_lower(rate * n, n, confidence) > margin

    lo, hi = 0, 1  # wide(lo) (or lo = 0), not wide(hi)
    while wide(hi):
        lo, hi = hi, 2 * hi
        if hi > limit:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if wide(mid) else (lo, mid)
    return hi
