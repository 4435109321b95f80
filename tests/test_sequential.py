"""The statistics of the sequential (early-stopping) certification mode."""

import math

import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from decrop.bounds import upper_confidence_bound
from decrop.sequential import alpha_split, decided, look_schedule, thresholds


def test_looks_double_and_end_at_n():
    assert look_schedule(10_000) == [100, 200, 400, 800, 1600, 3200, 6400, 10_000]
    assert look_schedule(100) == [100] and look_schedule(50) == [50]


@pytest.mark.parametrize("k", [1, 2, 8])
def test_alpha_split_sums_to_alpha_and_keeps_half_for_the_last_look(k):
    parts = alpha_split(0.001, k)
    assert len(parts) == k and math.isclose(sum(parts), 0.001)
    assert parts[-1] == (0.001 if k == 1 else 0.0005)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (9, 10), (10, 10), (990, 1000)])
def test_upper_bound_matches_statsmodels(k, n):
    expected = proportion_confint(k, n, alpha=2 * 0.01, method="beta")[1]
    assert math.isclose(upper_confidence_bound(k, n, 0.01), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_thresholds_include_the_abstain_line():
    levels = thresholds([0.0, 0.25, 0.5], sigma=0.25)
    assert levels == sorted([0.5, norm.cdf(1.0), norm.cdf(2.0)])


def test_decided_when_no_threshold_is_inside_the_interval():
    levels = [0.5, 0.84, 0.98]
    assert decided(0.9, 0.95, levels)  # certified at r=0.25, surely not at 0.5
    assert decided(0.1, 0.3, levels)  # abstain either way
    assert decided(0.985, 1.0, levels)  # certified at the largest radius
    assert not decided(0.45, 0.6, levels)  # abstain or not is still open
    assert not decided(0.9, 0.99, levels)  # r = 0.5 is still open
