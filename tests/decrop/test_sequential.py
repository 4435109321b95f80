"""The statistics of the sequential certification mode (decrop.sequential): the exact boundary-crossing
recursion against simulation, the calibration, the per-image test, and soundness with power: the valid test
passes at level alpha where its failure probability is close to alpha, invalid variants fail."""

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from decrop.bounds import lower_confidence_bound
from decrop.sequential import (SequentialTest, _boundaries, calibrated_level, certifiable, crossing_probability,
                               final_critical, futility_boundary, log_kt_ratio, rejection_boundary, thresholds)


def test_thresholds_map_each_threshold_to_its_radius():
    assert thresholds([0.5, 0.0, 0.25, 0.25], sigma=0.25) == {0.5: 0.0, norm.cdf(1.0): 0.25, norm.cdf(2.0): 0.5}
    for bad in ([], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match="radi"):
            thresholds(bad, sigma=0.25)


@pytest.mark.parametrize("level", [0.1, math.log(50)])
def test_rejection_boundary_is_the_first_k_where_the_kt_ratio_reaches_the_level(level):
    t, n = 0.8, 120
    b = rejection_boundary(t, n, level)
    for m in range(1, n + 1):
        ks = [k for k in range(m + 1) if k > t * m and log_kt_ratio(m, k, t) >= level]
        raw = ks[0] if ks else m + 1
        assert b[m] <= raw  # regularised: never later than the raw boundary ...
        assert b[m] == min(raw, b[m - 1] + 1) if m > 1 else b[m] == raw  # ... and only by b[m-1] + 1
    assert np.all(np.diff(b - np.arange(n + 1)) <= 0)
    c = futility_boundary(t, n, level)
    assert np.all(np.diff(c) >= 0) and np.all(c < t * np.arange(n + 1) + 1e-9)


@pytest.mark.parametrize("p", [0.7, 0.85])
def test_crossing_probability_matches_simulation(p):
    """The recursion against 200,000 simulated paths of a boundary with several crossing times."""
    n, t = 60, 0.7
    b = rejection_boundary(t, n, math.log(8))
    exact = crossing_probability(b, p)
    rng = np.random.default_rng(0)
    paths = np.cumsum(rng.random((200_000, n)) < p, axis=1)
    simulated = np.mean(np.any(paths >= b[1:], axis=1))
    assert 0.01 < exact < 0.99
    assert simulated == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 200_000))


def test_crossing_probability_of_a_single_look_is_the_binomial_tail():
    n, p = 300, 0.9
    b = np.full(n + 1, n + 1)
    b[n] = 280
    assert crossing_probability(b, p) == pytest.approx(binom.sf(279, n, p), rel=1e-9)


def test_crossing_probability_increases_with_p():
    b = rejection_boundary(0.9, 400, 4.0)
    probs = [crossing_probability(b, p) for p in (0.8, 0.85, 0.9, 0.92)]
    assert probs == sorted(probs) and probs[0] < probs[-1]


def test_calibration_spends_alpha_exactly_and_no_more():
    """The calibrated boundary crosses with probability <= alpha at p = t; 0.02 nats lower it would not be
    valid any more; Ville's level is far more conservative."""
    t, n, alpha = 0.95, 2000, 0.001
    level = calibrated_level(t, n, alpha)
    assert level < math.log(1 / alpha) - 1  # the calibration pays: Ville's level is loose here
    assert crossing_probability(rejection_boundary(t, n, level), t) <= alpha
    assert crossing_probability(rejection_boundary(t, n, level - 0.02), t) > alpha * 0.9


def test_final_critical_is_the_clopper_pearson_duality():
    n, alpha = 500, 0.01
    for t in (0.5, 0.8, 0.97, 0.99):
        k = final_critical(t, n, alpha)
        assert k <= n and lower_confidence_bound(k, n, alpha) >= t
        assert k == 0 or lower_confidence_bound(k - 1, n, alpha) < t
    assert final_critical(0.9999, 100, 0.001) == 101  # 100 of 100 cannot certify it


def run(test: SequentialTest, p: float, rng: np.random.Generator, batch: int = 50) -> SequentialTest:
    while not test.done:
        draw = test.next_draw(batch)
        assert 1 <= draw <= min(batch, test.n - test.drawn)
        test.observe(int(rng.binomial(draw, p)), draw)
    return test


def test_clear_images_stop_early_and_report_the_exact_radius():
    rng = np.random.default_rng(1)
    radii, sigma, n = (0.0, 0.25, 0.5), 0.25, 2000
    sure = run(SequentialTest(radii, sigma, n, 0.001), 0.999, rng)  # above every threshold
    assert sure.drawn < n / 3 and sure.certified == [True] * 3 and sure.radius == 0.5
    middle = run(SequentialTest(radii, sigma, n, 0.001), 0.9, rng)  # between Phi(1) and Phi(2)
    assert middle.drawn < n / 2 and middle.radius == 0.25
    wrong = run(SequentialTest(radii, sigma, n, 0.001), 0.2, rng)
    assert wrong.drawn < 100 and wrong.radius is None
    tie = run(SequentialTest(radii, sigma, n, 0.001), 0.5, rng)  # on the abstain line: nothing settles early
    assert tie.drawn > n / 2 and tie.radius is None


def test_a_radius_no_n_can_certify_is_settled_before_any_sample():
    """r = 1 at sigma 0.25 needs pA > Phi(4); with n = 10,000 even all successes give CP 0.9993 < Phi(4)."""
    test = SequentialTest([1.0], 0.25, 10_000, 0.001)
    assert test.done and test.drawn == 0 and test.radius is None
    rng = np.random.default_rng(2)
    both = run(SequentialTest([0.0, 1.0], 0.25, 10_000, 0.001), 1.0, rng)
    assert both.drawn < 100 and both.radius == 0.0


def test_a_threshold_that_rounds_to_one_is_not_certified_and_does_not_crash():
    """sigma 0.12 with the default radii: Phi(1.0 / 0.12) rounds to 1.0, and calibrating it took log(1 - 1)."""
    assert norm.cdf(1.0 / 0.12) == 1.0
    test = SequentialTest([0, 1.0], 0.12, 10_000, 0.001)  # raised "math domain error"
    assert test.levels == [0.5, 1.0] and test.certified == [False, False] and test.settled == [False, True]
    with pytest.raises(ValueError, match="threshold"):
        calibrated_level(1.0, 10_000, 0.0002)
    rng = np.random.default_rng(4)
    sure = run(SequentialTest([0, 1.0], 0.12, 10_000, 0.001), 1.0, rng)  # even pA = 1: certified at 0 only
    assert sure.certified == [True, False] and sure.radius == 0.0 and sure.drawn < 100
    wrong = run(SequentialTest([0, 1.0], 0.12, 10_000, 0.001), 0.2, rng)
    assert wrong.certified == [False, False] and wrong.radius is None and wrong.drawn < 100
    # the r = 0 line behaves exactly as in a test without the uncertifiable radius
    alone = run(SequentialTest([0], 0.12, 10_000, 0.001), 1.0, np.random.default_rng(5))
    paired = run(SequentialTest([0, 1.0], 0.12, 10_000, 0.001), 1.0, np.random.default_rng(5))
    assert (alone.drawn, alone.successes, alone.radius) == (paired.drawn, paired.successes, paired.radius)


def test_uncertifiable_thresholds_are_exactly_those_the_calibrated_boundaries_never_certify():
    """The shortcut for t^n > max(alpha_seq, alpha_fin) changes no answer: there the full calibration (where it
    can run, t < 1) certifies nothing either, and below that cap the boundaries are the calibrated ones."""
    n, alpha_seq, alpha_fin, fut = 200, 0.002, 0.008, 0.01
    cap = alpha_fin ** (1 / n)  # = lower_confidence_bound(n, n, alpha_fin): ~0.9762
    assert lower_confidence_bound(n, n, alpha_fin) == pytest.approx(cap)
    for t in (0.9, 0.97, cap - 1e-6, cap + 1e-6, 0.98, 0.999, 1.0):
        assert certifiable(t, n, alpha_seq, alpha_fin) == (t <= cap)
        certify, futile, _ = _boundaries(t, n, alpha_seq, alpha_fin, fut)
        if t >= 1.0:
            assert np.all(certify == n + 1)
            continue
        full = np.minimum(rejection_boundary(t, n, calibrated_level(t, n, alpha_seq)),
                          final_critical(t, n, alpha_fin))
        if t <= cap:
            assert np.array_equal(certify, full) and certify[n] <= n
            assert np.array_equal(futile, futility_boundary(t, n, calibrated_level(t, n, fut, upper=False)))
        else:
            assert np.all(full > np.arange(n + 1)) and np.all(certify == n + 1)  # never certified either way
            test = SequentialTest([norm.ppf(t)], 1.0, n, alpha_seq + alpha_fin)
            assert test.done and test.drawn == 0 and test.radius is None


def test_the_reported_bound_is_the_nested_thresholds_or_the_final_clopper_pearson():
    """p_lower = max(top of the certified prefix, CP(successes, n, alpha_fin)); at n that is Cohen's bound."""
    rng = np.random.default_rng(3)
    radii, sigma, n, alpha = [0.0, 0.5, 1.0], 1.0, 400, 0.01
    for p in (0.3, 0.55, 0.7, 0.75, 0.86, 0.99):
        test = run(SequentialTest(radii, sigma, n, alpha), p, rng)
        prefix = [level for level, ok in zip(test.levels, np.cumprod(test.certified)) if ok]
        final = lower_confidence_bound(test.successes, n, 0.8 * alpha)
        assert test.p_lower == max(prefix[-1] if prefix else 0.0, final)
        if test.p_lower < 0.5:
            assert test.radius is None
        elif test.p_lower == final and final not in test.radii:
            assert test.radius == pytest.approx(sigma * norm.ppf(final))
        else:
            assert test.radius == test.radii[test.p_lower]


def test_observe_rejects_impossible_counts():
    test = SequentialTest([0.0], 0.25, 100, 0.01)
    for successes, trials in [(3, 2), (-1, 5), (0, 101)]:
        with pytest.raises(ValueError, match="successes"):
            test.observe(successes, trials)
    with pytest.raises(ValueError, match="alpha"):
        SequentialTest([0.0], 0.25, 100, 1.5)


# --- soundness with power ------------------------------------------------------------------------------------
# alpha = 0.1 and pA placed just below a threshold t = CP(170 of 200) at the final look's level: both the
# sequential boundary (calibrated to cross with probability ~alpha_seq at p = t) and the final Clopper-Pearson
# bound (probability ~alpha_fin of reaching 170) are then nearly exact, so the valid test fails ~8.5% of the
# time: close enough to alpha that a certifier at 2 x alpha (~16%) or one that peeks at Clopper-Pearson fails.

ALPHA, N, REPS = 0.1, 200, 4000
T_STAR = lower_confidence_bound(170, N, 0.8 * ALPHA)
P_TRUE = T_STAR - 1e-6


def failures(certify) -> int:
    """How many of REPS independent runs report a lower bound above the true pA."""
    rng = np.random.default_rng(0)
    return sum(certify(rng) > P_TRUE for _ in range(REPS))


def sequential(alpha: float):
    return lambda rng: run(SequentialTest([norm.ppf(T_STAR)], 1.0, N, alpha), P_TRUE, rng).p_lower


def peeking_clopper_pearson(rng: np.random.Generator) -> float:
    """Invalid: look at the fixed-n bound after every 20 samples and stop as soon as it clears t."""
    k = 0
    for m in range(20, N + 1, 20):
        k += rng.binomial(20, P_TRUE)
        bound = lower_confidence_bound(k, m, ALPHA)
        if bound >= T_STAR:
            break
    return bound


LIMIT = binom.ppf(0.999, REPS, ALPHA)  # ~459: failures of a level-alpha test stay below this


def test_the_sequential_certificate_holds_at_level_alpha_where_it_is_nearly_exact():
    found = failures(sequential(ALPHA))
    assert 0.06 * REPS < found <= LIMIT  # ~8.5%: sharp, so the test below has power


@pytest.mark.parametrize("invalid", [sequential(2 * ALPHA), peeking_clopper_pearson], ids=["2alpha", "peeking"])
def test_invalid_certificates_fail_the_same_check(invalid):
    assert failures(invalid) > LIMIT


def test_fixed_n_clopper_pearson_fails_at_2_alpha_and_holds_at_alpha():
    """The exact mode's bound where its failure probability is alpha to 1e-5 (vectorised counts)."""
    p = lower_confidence_bound(170, N, ALPHA) - 1e-6
    assert binom.sf(169, N, p) == pytest.approx(ALPHA, abs=1e-5)
    counts = np.random.default_rng(0).binomial(N, p, size=REPS)
    for alpha, valid in ((ALPHA, True), (2 * ALPHA, False)):
        found = sum(lower_confidence_bound(int(k), N, alpha) > p for k in counts)
        assert (found <= LIMIT) == valid
