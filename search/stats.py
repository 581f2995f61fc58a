"""The statistics every comparison cbam-nas shows rests on, from scipy.stats.

- :func:`wilson_interval`: one run's accuracy on ``n`` validation images is a binomial
  proportion; its Wilson interval is the noise floor no single-seed difference can beat.
- :func:`mean_interval`: an architecture's mean accuracy over its seeds, with Student's t
  interval (n >= 2; a single seed has only its Wilson interval).
- :func:`paired_difference`: two architectures run on the same seeds (seed s fixes the
  initialisation, data order and augmentation of both) compared by their per-seed differences,
  which cancel what the seed does to both: Student's paired t, its interval and p-value (n >= 2),
  equal to ``scipy.stats.ttest_rel``'s but from scipy.special's t functions (faster; see
  :func:`_one_sample_t`).
- :func:`holm`: the p-values of the comparisons one page makes, corrected together (Holm's
  step-down method: family-wise error at most alpha, never less powerful than Bonferroni);
  :func:`sequential_p` first, for a race's p-values (a race tests after every round).
- :func:`verdict`: ``better`` / ``worse`` / ``tied`` / ``untested`` from a corrected p-value;
  :func:`worse_than_another`: which of several are significantly worse than another (every
  pair, Holm), what a race stops and what the top group leaves out.
- :func:`rank_agreement`: Spearman's rho with a Fisher-z interval (Bonett and Wright's variance).

"Tied" is not "equal": it says the data cannot tell the two apart at ``alpha``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import numpy as np

T = TypeVar("T")
ALPHA = 0.05
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "tied", "untested")
ACCURACY_RANGE = (0.0, 1.0)
# Accuracies closer than this are equal (float round-off of fractions of a validation split).
_TIE = 1e-12


@functools.cache
def _scipy_special() -> ModuleType:
    """scipy.special, imported on first use (see :func:`_scipy_stats`)."""
    from scipy import special

    return special


@functools.cache
def _scipy_stats() -> ModuleType:
    """scipy.stats, imported on first use: its import takes about a second of CPU, which every
    worker process and CLI command would pay at start while most never test anything."""
    from scipy import stats

    return stats


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; ``low``/``high`` None where there is none."""

    n: int
    estimate: float
    low: float | None
    high: float | None

    @property
    def bounds(self) -> list[float] | None:
        return None if self.low is None or self.high is None else [self.low, self.high]


@dataclass(frozen=True)
class Difference(Interval):
    """A paired difference (first minus second) with its two-sided p-value (None: untested)."""

    p_value: float | None = None


def wilson_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of an accuracy measured on ``n`` images."""
    if n < 1:
        return Interval(0, accuracy, None, None)
    correct = min(n, max(0, round(accuracy * n)))
    ci = (
        _scipy_stats()
        .binomtest(correct, n)
        .proportion_ci(confidence_level=confidence, method="wilson")
    )
    return Interval(n, accuracy, float(ci.low), float(ci.high))


def mean_interval(
    values: Sequence[float],
    confidence: float = CONFIDENCE,
    within: tuple[float, float] | None = None,
) -> Interval:
    """Mean of ``values`` with Student's t interval (none below two values; a zero spread
    gives a zero-width interval). ``within``: the range the mean cannot leave (accuracies:
    :data:`ACCURACY_RANGE`), which the interval is cut to: t's interval is symmetric and can
    pass 100 % at a mean of 98 % on three seeds; the cut keeps its coverage, since the mean
    was never outside."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return Interval(0, math.nan, None, None)
    mean = math.fsum(data) / n
    if n < 2:
        return Interval(n, mean, None, None)
    if max(data) - min(data) <= _TIE:
        return Interval(n, mean, mean, mean)
    _, low, high = _one_sample_t(data, confidence)
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return Interval(n, mean, low, high)


def _one_sample_t(data: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """Student's one-sample t against zero: the two-sided p-value and the interval of the mean,
    as ``scipy.stats.ttest_1samp`` gives them (tests/test_stats.py holds them equal), from the
    t distribution's ufuncs in scipy.special that scipy.stats uses. Called directly because
    ``ttest_1samp`` spends ~0.6 ms a call checking and broadcasting its arguments, and a race
    replays its rounds' tests on every claim (thousands of calls in a leaderboard's A/A
    simulation); the mean and spread of a race's 2-10 values in plain floats, where numpy's
    per-call overhead would be most of the time. Needs two values or more, not all equal."""
    n = len(data)
    mean = math.fsum(data) / n
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in data) / (n - 1) / n)
    special = _scipy_special()
    p = float(2 * special.stdtr(n - 1, -abs(mean) / se))
    half = float(special.stdtrit(n - 1, 0.5 + confidence / 2)) * se
    return min(1.0, p), mean - half, mean + half


def paired_difference(
    first: Sequence[float], second: Sequence[float], confidence: float = CONFIDENCE
) -> Difference:
    """``first - second`` over the seeds both ran (same order), by Student's paired t: the mean
    difference, its interval and the two-sided p-value; untested below two pairs; the sign
    test's p-value and no interval when every pair differs by the same amount."""
    if len(first) != len(second):
        raise ValueError(f"paired samples differ in length: {len(first)} and {len(second)}")
    d = [float(a) - float(b) for a, b in zip(first, second, strict=True)]
    n = len(d)
    mean = math.fsum(d) / n if n else math.nan
    if n < 2:
        return Difference(n, mean, None, None, None)
    spread = max(d) - min(d)
    if abs(mean) <= _TIE and spread <= _TIE:  # the same accuracy on every seed
        return Difference(n, mean, mean, mean, 1.0)
    if spread <= _TIE:
        # The same difference on every seed (common on a small validation split, where
        # accuracies move in steps of one image): t is undefined and no interval can be
        # estimated, but the exact sign test says how often n differences of one sign arise by
        # chance: 2 * 0.5**n, weak evidence at a few seeds rather than a certainty.
        p = _scipy_stats().binomtest(sum(x > 0 for x in d), n, 0.5).pvalue
        return Difference(n, mean, None, None, float(p))
    p, low, high = _one_sample_t(d, confidence)  # the paired t is the one-sample t of d
    return Difference(n, mean, low, high, p)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None). Written here: scipy.stats offers
    only the false-discovery-rate corrections (``false_discovery_control``), and a page's
    verdicts need the family-wise error bounded."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def look_share(n: int, first: int, last: int) -> float:
    """The share of alpha a race spends on its look at ``n`` seeds, when it looks after every
    round from ``first`` to ``last`` seeds: half on the last look (where arms still tied are
    judged), the other half split evenly over the looks before it; all of it when it looks
    once. The shares sum to one, so a comparison tested at ``alpha * share`` on whatever
    number of seeds the race ended with is wrong at most alpha of the time (Bonferroni over
    the looks). Testing every look at alpha would not be: stopping at the first significant
    look declares identical arms different 13 % of the time at 2 to 5 seeds (simulated in
    tests/test_confirmation.py). The uneven split keeps the final verdicts' power: evenly,
    each of 4 looks would get alpha / 4. Fewer seeds than ``first`` (a failed run) count as
    the first look."""
    if not 1 <= first <= last:
        raise ValueError(f"looks from {first} to {last} seeds")
    if first == last:
        return 1.0
    return 0.5 if n >= last else 0.5 / (last - first)


def sequential_p(p_value: float | None, n: int, first: int, last: int) -> float | None:
    """A p-value from a race's look at ``n`` seeds, scaled to be compared with the whole
    alpha: ``p / look_share``, at most 1."""
    if p_value is None:
        return None
    return min(1.0, p_value / look_share(n, first, last))


def verdict(difference: Difference, adjusted_p: float | None, alpha: float = ALPHA) -> str:
    """``better``/``worse`` when the (corrected) difference is significant at ``alpha``,
    ``tied`` when it is not, ``untested`` without a test."""
    if adjusted_p is None or difference.p_value is None:
        return "untested"
    if adjusted_p >= alpha:
        return "tied"
    return "better" if difference.estimate > 0 else "worse"


def worse_than_another(
    differences: Sequence[tuple[T, T, Difference]],
    alpha: float = ALPHA,
    looks: tuple[int, int] | None = None,
) -> set[T]:
    """The items significantly worse than some other item, from every pair's difference
    (``(a, b, a - b)``): each p-value corrected for a race's ``looks`` (:func:`sequential_p`),
    then Holm across all the pairs. Not each item against the best alone: the best is chosen by
    its luck, and with six identical arms that found one worse 8 % of the time at alpha 5 %
    (tests/test_confirmation.py); across every pair the family-wise error stays within alpha."""
    adjusted = holm(
        [
            d.p_value if looks is None else sequential_p(d.p_value, d.n, *looks)
            for _, _, d in differences
        ]
    )
    worse: set[T] = set()
    for (first, second, d), p in zip(differences, adjusted, strict=True):
        found = verdict(d, p, alpha)
        if found == "worse":
            worse.add(first)
        elif found == "better":
            worse.add(second)
    return worse


def rank_agreement(
    first: Sequence[float], second: Sequence[float], confidence: float = CONFIDENCE
) -> Interval:
    """Spearman's rho between two scorings of the same items, with a Fisher-z interval using
    Bonett and Wright's variance (1 + rho^2 / 2) / (n - 3); no interval below four items or at
    a perfect agreement, and no rho below two items or where a scoring is constant."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    n = len(a)
    if n < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Interval(n, math.nan, None, None)
    rho = float(_scipy_stats().spearmanr(a, b).statistic)
    if n < 4 or abs(rho) >= 1:  # no interval: too few items, or Fisher's z is infinite
        return Interval(n, rho, None, None)
    z = math.atanh(rho)
    se = math.sqrt((1 + rho * rho / 2) / (n - 3))
    q = float(_scipy_stats().norm.ppf(0.5 + confidence / 2))
    return Interval(n, rho, math.tanh(z - q * se), math.tanh(z + q * se))
