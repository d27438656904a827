"""The report's one significance rule: 95% confidence intervals from Student's t.

- Paired seeds (claims): d_s = treatment_s - control_s in the paper's direction; the interval
  mean(d) ± t(0.975, n-1) · sd(d)/sqrt(n) (`paired`).
- Unpaired seeds (leaderboards, compare): the difference of two means with Welch's standard
  error and Welch-Satterthwaite degrees of freedom (`welch`).
- One timed job per arm (throughput): the half-width of the interleaved ratio's 95% interval
  (`ratio_ci95`, the throughput task's median CI over rounds, relative to the ratio) carried to
  the arm's rate; two arms differ when |a - b| exceeds sqrt(h_a² + h_b²) (`distinct`).
A difference is "beyond the noise" when its interval excludes 0. With n = 3 paired seeds the
critical value is t(0.975, 2) = 4.30 standard errors, not 2.

Torch-free and dependency-free: Student's t quantile by bisection on its CDF, written through
the regularised incomplete beta function (continued fraction, Numerical Recipes 6.4).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

LEVEL = 0.95  # two-sided confidence of every interval the report shows


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            if aa < 0 and abs(d * c - 1.0) < 3e-16:
                return h
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.cache  # 200 bisection steps per call; a report asks a few dofs
def t_critical(dof: float, level: float = LEVEL) -> float:
    """The two-sided critical value: t(1 - (1 - level)/2, dof); e.g. 4.303 for dof 2."""
    if not dof > 0:
        raise ValueError(f"dof={dof!r} must be > 0")
    target = 1.0 - (1.0 - level) / 2.0
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, dof) < target else (lo, mid)
    return (lo + hi) / 2.0


class Interval(NamedTuple):
    """A mean difference with its 95% interval; NaN bounds where it cannot be computed."""

    n: int  # paired seeds, or the smaller of the two groups
    mean: float
    se: float
    low: float
    high: float

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2.0

    def sign(self) -> int:
        """+1 when the interval lies above 0, -1 below, 0 when it holds 0 or is unknown."""
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0


def paired(differences: Sequence[float]) -> Interval:
    """Mean of the paired differences (NaNs dropped) and its t interval with n - 1 dof. An SE of
    0 (every pair gives the same d) gives the point interval [d, d]."""
    d = [float(x) for x in differences if not math.isnan(float(x))]
    n = len(d)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(d) / n
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = half_width(sd, n)
    return Interval(n, mean, se, mean - half, mean + half)


def half_width(sd: float, n: int) -> float:
    """Half-width of the 95% t interval of a mean of n values with sample sd `sd`:
    t(0.975, n-1) · sd / sqrt(n); NaN with fewer than 2 values or no sd."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return t_critical(n - 1) * sd / math.sqrt(n)


def detectable(sd: float, n: int) -> float:
    """The smallest mean difference whose interval would exclude 0 with n pairs at spread sd:
    the interval's half-width (`half_width`)."""
    return half_width(sd, n)


def seeds_needed(mean: float, sd: float, limit: int = 1000) -> int | None:
    """The fewest pairs whose interval at spread sd would exclude 0 for a true difference
    `mean` (t(0.975, n-1) · sd / sqrt(n) < |mean|); None when d = 0 or over `limit`."""
    if math.isnan(mean) or math.isnan(sd) or mean == 0:
        return None
    if sd == 0:
        return 2
    # detectable(sd, n) falls strictly with n (t shrinks, sqrt(n) grows): the first n below
    # |mean| by bisection, the same n a scan from 2 finds, in ~10 steps instead of up to `limit`
    ns = range(2, limit + 1)
    first = bisect.bisect_left(ns, True, key=lambda n: detectable(sd, n) < abs(mean))
    return ns[first] if first < len(ns) else None


class Estimate(NamedTuple):
    """One table cell before formatting: mean over seeds, their sample std and count, and the
    timing half-width (`spread`: half the 95% interval of one job's rate, same units as
    `mean`; NaN when the rows carry none)."""

    mean: float
    std: float = math.nan
    n: int = 1
    spread: float = math.nan

    @property
    def missing(self) -> bool:
        return math.isnan(self.mean)


def welch(a: Estimate, b: Estimate) -> Interval:
    """a - b with Welch's standard error and Welch-Satterthwaite dof (both n > 1)."""
    if a.n < 2 or b.n < 2 or math.isnan(a.std) or math.isnan(b.std):
        return Interval(min(a.n, b.n), a.mean - b.mean, math.nan, math.nan, math.nan)
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    diff = a.mean - b.mean
    if se == 0:
        return Interval(min(a.n, b.n), diff, 0.0, diff, diff)
    dof = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = t_critical(dof) * se
    return Interval(min(a.n, b.n), diff, se, diff - half, diff + half)


def distinct(a: Estimate, b: Estimate) -> bool | None:
    """Whether a and b differ beyond the noise: Welch's 95% interval of a - b excludes 0 when
    both have several seeds; else the timing intervals: |a - b| > sqrt(h_a² + h_b²). None: no
    noise measured."""
    interval = welch(a, b)
    if not math.isnan(interval.se):
        return interval.sign() != 0 if interval.se > 0 else a.mean != b.mean
    if not (math.isnan(a.spread) or math.isnan(b.spread)):
        return abs(a.mean - b.mean) > math.hypot(a.spread, b.spread)
    return None


class Verdict(NamedTuple):
    """The leader of a column among rankable rows: who, by how much over the runner-up, and
    whether that exceeds the noise (None: not measured, e.g. one seed without timing spread)."""

    leader: int  # row position
    runner_up: int | None
    margin: float  # leader - runner-up, in the column's units (NaN without a runner-up)
    beyond_noise: bool | None
    tied: list[int]  # rows within noise of the leader (the leader included) when not beyond


def verdict(
    cells: list[Estimate], better: str, rankable: list[bool], same: Callable[[float, float], bool]
) -> Verdict | None:
    """The best rankable cell, and whether it beats the runner-up beyond the noise. `same`
    says when two means print alike (then they are a tie whatever the noise)."""
    sign = 1.0 if better == "max" else -1.0
    order = sorted(
        (i for i, c in enumerate(cells) if rankable[i] and not c.missing),
        key=lambda i: -sign * cells[i].mean,
    )
    if len(order) < 2:
        return None
    lead, second = order[0], order[1]
    beyond = distinct(cells[lead], cells[second])
    if same(cells[lead].mean, cells[second].mean):
        beyond = False
    tied = [lead]
    if beyond is False:
        tied += [
            i
            for i in order[1:]
            if same(cells[lead].mean, cells[i].mean) or distinct(cells[lead], cells[i]) is False
        ]
    margin = cells[lead].mean - cells[second].mean
    return Verdict(lead, second, margin, beyond, tied)
