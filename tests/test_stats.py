"""search/stats.py against fixed numbers and scipy, and A/A simulations: identical arms are
declared different no more often than alpha."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from support import within_binomial_bounds

from search.stats import (
    ACCURACY_RANGE,
    ALPHA,
    Difference,
    holm,
    look_share,
    mean_interval,
    paired_difference,
    rank_agreement,
    sequential_p,
    verdict,
    wilson_interval,
    worse_than_another,
)


def test_wilson_interval_of_one_run() -> None:
    ci = wilson_interval(0.94, 100)
    assert (ci.n, ci.estimate) == (100, 0.94)
    assert ci.low == pytest.approx(0.8753, abs=1e-4) and ci.high == pytest.approx(0.9722, abs=1e-4)
    # 300 validation images (the demo's split): one image is a third of a point.
    assert wilson_interval(0.94, 300).bounds == pytest.approx([0.9072, 0.9617], abs=1e-4)
    assert wilson_interval(1.0, 50).high == 1.0 and wilson_interval(0.0, 50).low == 0.0
    assert wilson_interval(0.5, 0).bounds is None


def test_mean_interval_is_students_t() -> None:
    values = [0.90, 0.92, 0.95]
    ci = mean_interval(values)
    se = np.std(values, ddof=1) / math.sqrt(3)
    half = scipy_stats.t.ppf(0.975, 2) * se
    assert ci.estimate == pytest.approx(0.923333, abs=1e-6)
    assert ci.bounds == pytest.approx([ci.estimate - half, ci.estimate + half])
    assert mean_interval([0.9]).bounds is None and mean_interval([0.9]).n == 1
    assert mean_interval([0.9, 0.9]).bounds == [0.9, 0.9]
    # Near 100 %, t's symmetric interval passes it; an accuracy's is cut at the range's end.
    near_top = [0.99, 1.0, 0.97]
    assert mean_interval(near_top).high > 1.0
    cut = mean_interval(near_top, within=ACCURACY_RANGE)
    assert cut.high == 1.0 and cut.low == mean_interval(near_top).low


def test_paired_difference_is_the_paired_t_test() -> None:
    a = [0.95, 0.94, 0.96, 0.93, 0.95]
    b = [0.93, 0.93, 0.94, 0.93, 0.92]
    diff = paired_difference(a, b)
    reference = scipy_stats.ttest_rel(a, b)
    assert diff.n == 5 and diff.estimate == pytest.approx(0.016)
    assert diff.p_value == pytest.approx(reference.pvalue)
    ci = reference.confidence_interval(0.95)
    assert diff.bounds == pytest.approx([ci.low, ci.high])
    assert paired_difference([0.9], [0.8]).p_value is None
    same = paired_difference([0.9, 0.8], [0.8, 0.7])  # every seed 0.1 apart: the sign test
    assert same.estimate == pytest.approx(0.1) and same.bounds is None
    assert same.p_value == pytest.approx(scipy_stats.binomtest(2, 2).pvalue) == 0.5
    six = paired_difference([0.9] * 6, [0.8] * 6)
    assert six.p_value == pytest.approx(2 * 0.5**6) and verdict(six, six.p_value) == "better"
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([0.9, 0.8], [0.8])


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_the_t_tests_equal_scipy_stats_on_random_samples(n: int) -> None:
    """Our t tests call scipy.special's t functions directly (scipy.stats' argument handling
    costs more than the test): the same p-values and intervals as ttest_rel / ttest_1samp."""
    rng = np.random.default_rng(n)
    for _ in range(200):
        a = rng.normal(0.9, rng.uniform(0.001, 0.05), n)
        b = a + rng.normal(rng.uniform(-0.03, 0.03), rng.uniform(0.001, 0.05), n)
        confidence = float(rng.choice([0.9, 0.95, 0.99]))
        diff = paired_difference(a, b, confidence)
        reference = scipy_stats.ttest_rel(a, b)
        ci = reference.confidence_interval(confidence)
        assert diff.p_value == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-300)
        assert diff.bounds == pytest.approx([ci.low, ci.high], rel=1e-9)
        mean_ci = scipy_stats.ttest_1samp(a, 0.0).confidence_interval(confidence)
        assert mean_interval(a, confidence).bounds == pytest.approx(
            [mean_ci.low, mean_ci.high], rel=1e-9
        )


def test_holm_step_down() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, None, 0.01]) == [pytest.approx(0.2), None, pytest.approx(0.02)]
    assert holm([]) == []
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_a_race_spends_half_its_alpha_on_the_last_look() -> None:
    shares = [look_share(n, 2, 5) for n in range(2, 6)]
    assert shares == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2]) and sum(shares) == 1
    assert look_share(3, 3, 3) == 1.0 and look_share(1, 2, 5) == pytest.approx(1 / 6)
    assert sequential_p(0.01, 2, 2, 5) == pytest.approx(0.06)
    assert sequential_p(0.01, 5, 2, 5) == pytest.approx(0.02)
    assert sequential_p(0.4, 2, 2, 5) == 1.0 and sequential_p(None, 2, 2, 5) is None
    with pytest.raises(ValueError, match="looks"):
        look_share(2, 3, 2)


def test_verdicts() -> None:
    better = Difference(5, 0.02, 0.01, 0.03, 0.001)
    assert verdict(better, 0.004) == "better"
    assert verdict(Difference(5, -0.02, -0.03, -0.01, 0.001), 0.004) == "worse"
    assert verdict(better, 0.06) == "tied"
    assert verdict(Difference(1, 0.02, None, None, None), None) == "untested"


def test_rank_agreement() -> None:
    scores = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    perfect = rank_agreement(scores, [s * 2 for s in scores])
    assert perfect.estimate == 1.0 and perfect.bounds is None
    first = [0.1, 0.4, 0.3, 0.9, 0.7, 0.6, 0.8, 0.2]
    second = [0.2, 0.3, 0.5, 0.8, 0.9, 0.4, 0.7, 0.1]
    rho = rank_agreement(first, second)
    assert rho.estimate == pytest.approx(scipy_stats.spearmanr(first, second).statistic)
    assert rho.low < rho.estimate < rho.high
    assert rank_agreement([0.5, 0.6, 0.7], [0.1, 0.3, 0.2]).bounds is None
    assert math.isnan(rank_agreement([0.5, 0.5, 0.5], [0.1, 0.3, 0.2]).estimate)


def _seed_scores(rng: np.random.Generator, draws: int, seeds: int, arms: int) -> np.ndarray:
    """(draws, arms, seeds) accuracies of identical arms: a shared effect per seed (the seed
    moves every arm alike) plus each run's own noise."""
    seed_effect = rng.normal(0.0, 0.02, size=(draws, 1, seeds))
    run_noise = rng.normal(0.0, 0.01, size=(draws, arms, seeds))
    return 0.9 + seed_effect + run_noise


@pytest.mark.parametrize("seeds", [2, 3, 8])
def test_aa_identical_arms_are_declared_different_at_most_alpha_of_the_time(seeds: int) -> None:
    rng = np.random.default_rng(seeds)
    draws = 2000
    scores = _seed_scores(rng, draws, seeds, 2)
    found = sum(verdict(d := paired_difference(a, b), d.p_value) != "tied" for a, b in scores)
    assert within_binomial_bounds(found, draws, ALPHA), found / draws
    assert found / draws > ALPHA / 3  # the test is not vacuously conservative either


def test_aa_holm_bounds_a_pages_family_of_comparisons() -> None:
    """One candidate against three references, all identical: any false verdict on the page
    counts, and Holm keeps that below alpha."""
    rng = np.random.default_rng(7)
    draws, seeds = 1500, 5
    scores = _seed_scores(rng, draws, seeds, 4)
    pages_wrong = 0
    for arms in scores:
        diffs = [paired_difference(arms[0], reference) for reference in arms[1:]]
        adjusted = holm([d.p_value for d in diffs])
        pages_wrong += any(verdict(d, p) != "tied" for d, p in zip(diffs, adjusted, strict=True))
    assert within_binomial_bounds(pages_wrong, draws, ALPHA), pages_wrong / draws


def test_every_pair_not_only_against_the_best_keeps_alpha() -> None:
    """Six identical arms on five seeds: each against the sample's best (Holm over five) finds
    one worse 8-9 % of the time, since the best was chosen for its luck; every pair with Holm
    across all fifteen stays within alpha. ``worse_than_another`` is the latter."""
    rng = np.random.default_rng(3)
    draws, against_best, every_pair = 2000, 0, 0
    for _ in range(draws):
        s = 0.9 + rng.normal(0, 0.02, 5) + rng.normal(0, 0.01, (6, 5))
        best = int(np.argmax(s.mean(1)))
        diffs = [paired_difference(s[a], s[best]) for a in range(6) if a != best]
        adjusted = holm([d.p_value for d in diffs])
        against_best += any(
            p is not None and p < ALPHA and d.estimate < 0
            for d, p in zip(diffs, adjusted, strict=True)
        )
        pairs = [
            (a, b, paired_difference(s[a], s[b])) for a, b in itertools.combinations(range(6), 2)
        ]
        every_pair += bool(worse_than_another(pairs, ALPHA))
    assert not within_binomial_bounds(against_best, draws, ALPHA), against_best / draws
    assert within_binomial_bounds(every_pair, draws, ALPHA), every_pair / draws
    assert every_pair > 0
    found = worse_than_another([("a", "b", paired_difference([0.9, 0.92, 0.91], [0.8, 0.81, 0.8]))])
    assert found == {"b"}


def test_a_real_difference_is_found() -> None:
    rng = np.random.default_rng(3)
    draws, seeds = 500, 5
    scores = _seed_scores(rng, draws, seeds, 2)
    scores[:, 0] += 0.03  # a three-point gain, three times the run noise
    found = sum(verdict(d := paired_difference(a, b), d.p_value) == "better" for a, b in scores)
    assert found / draws > 0.9
