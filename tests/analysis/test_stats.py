"""analysis/stats.py's paired tests on small hand-built outcomes: the exact sign-flip distribution against brute
force, the image-level test against exact McNemar (one seed) and scipy's permutation test, the defect it fixes
(seeds of the same images are not independent pairs), Holm against its definition, two arms paired by seed and
image (the sweep's best-against-defaults table) and one arm's interval over images."""

import itertools

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap, permutation_test
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from analysis.stats import (
    accuracy_interval,
    holm,
    image_level_test,
    paired_outcomes,
    paired_radii,
    sign_flip_distribution,
    sign_flip_p,
)
from decrop.rows import CertRow


def outcomes(rng: np.random.Generator, n: int, seeds: int, p_method: float, p_baseline: float):
    return rng.random((n, seeds)) < p_method, rng.random((n, seeds)) < p_baseline


@pytest.mark.parametrize("weights", [[], [0, 0], [1], [1, 1, 2, 3, 0, 3], [2, 2, 2, 2], [3, 1, 4, 1, 5, 2, 6]])
def test_sign_flip_distribution_is_the_exact_law_of_the_signed_sum(weights):
    pmf = sign_flip_distribution(np.array(weights, dtype=int))
    total = sum(weights)
    assert len(pmf) == 2 * total + 1
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(pmf, pmf[::-1], rtol=1e-12, atol=0)  # symmetric
    brute = np.zeros_like(pmf)
    for signs in itertools.product((-1, 1), repeat=len(weights)):
        brute[int(np.dot(signs, weights)) + total] += 0.5 ** len(weights)
    assert np.allclose(pmf, brute, rtol=1e-12, atol=1e-15)
    assert sign_flip_p(np.array(weights, dtype=int), 0) == pytest.approx(1.0)


def test_sign_flip_keeps_tiny_tails_precise():
    # 200 images all discordant one way: p = 2 * 2^-200, far below float epsilon relative to 1
    assert sign_flip_p(np.ones(200, dtype=int), 200) == pytest.approx(2 * 0.5 ** 200, rel=1e-9)
    with pytest.raises(ValueError, match="integers >= 0"):
        sign_flip_distribution(np.array([1, -1]))


@pytest.mark.parametrize("seed", range(6))
def test_one_seed_is_the_exact_mcnemar_test(seed):
    rng = np.random.default_rng(seed)
    method, baseline = outcomes(rng, int(rng.integers(5, 80)), 1, rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    b, c = int((method & ~baseline).sum()), int((~method & baseline).sum())
    table = [[int((method & baseline).sum()), b], [c, int((~method & ~baseline).sum())]]
    expected = mcnemar(table, exact=True).pvalue if b + c else 1.0
    result = image_level_test(method, baseline)
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.p_value == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0, rel=1e-9)
    assert result.difference == pytest.approx((b - c) / len(method))


def test_matches_scipy_exact_permutation_test():
    rng = np.random.default_rng(3)
    method, baseline = outcomes(rng, 12, 3, 0.7, 0.4)
    x, y = method.sum(axis=1), baseline.sum(axis=1)  # integer per-image counts: no float ties in scipy's compare
    # "samples" swaps x_i and y_i within each image: all 2^12 sign flips of d_i (exact, n_resamples=inf)
    expected = permutation_test((x, y), lambda a, b, axis: np.sum(a - b, axis=axis), permutation_type="samples",
                                n_resamples=np.inf, alternative="two-sided").pvalue
    assert image_level_test(method, baseline).p_value == pytest.approx(expected, rel=1e-9)


def test_identical_methods_give_p_one_and_a_zero_difference():
    method = np.random.default_rng(4).random((50, 3)) < 0.5
    result = image_level_test(method, method.copy())
    assert result == (1.0, 0.0, (0.0, 0.0))


def test_a_strong_effect_gives_a_small_p_and_an_interval_above_zero():
    method = np.zeros((60, 3), dtype=bool)
    method[:40] = True  # 40 images the method certifies in every seed
    baseline = np.zeros((60, 3), dtype=bool)
    baseline[40:42] = True  # 2 the baseline certifies instead
    p, difference, (lo, hi) = image_level_test(method, baseline)
    assert p == pytest.approx(binomtest(40, 42).pvalue, rel=1e-9)  # 42 discordant images, weight 3
    assert p < 1e-8
    assert difference == pytest.approx(38 / 60)
    assert 0 < lo < difference < hi <= 1
    assert image_level_test(method, baseline, seed=0).interval == (lo, hi)  # seeded: reproducible


def test_three_seeds_of_the_same_images_are_not_three_times_the_evidence():
    """The defect this fixes: 10 images the method certifies in all 3 seeds and the baseline never, 2 the
    reverse. Summing discordant pairs over seeds counts 30 vs 6 as 36 independent images; the image is the unit."""
    method = np.zeros((40, 3), dtype=bool)
    baseline = np.zeros((40, 3), dtype=bool)
    method[:10], baseline[10:12] = True, True
    method[12:30], baseline[12:30] = True, True  # concordant images
    only_m, only_b = int((method & ~baseline).sum()), int((~method & baseline).sum())
    pooled = binomtest(only_m, only_m + only_b).pvalue  # the old "pooled" McNemar over seeds
    new = image_level_test(method, baseline).p_value
    assert (only_m, only_b) == (30, 6)
    assert new == pytest.approx(binomtest(10, 12).pvalue, rel=1e-9)  # 12 discordant images, each weight 3
    assert new > 100 * pooled and new > 0.01 and pooled < 1e-4


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        image_level_test(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least one image"):
        image_level_test(np.ones((0, 2)), np.ones((0, 2)))
    with pytest.raises(ValueError, match="0/1 outcomes"):
        image_level_test(np.full((3, 2), 2), np.ones((3, 2)))


def test_holm_matches_its_definition_and_is_monotone():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.02, 1.0, 0.0001])
    order = np.argsort(p)
    m = len(p)
    expected = np.empty(m)
    running = 0.0
    for k, i in enumerate(order):  # step-down: (m - k) * p_(k), made monotone, capped at 1
        running = max(running, min(1.0, (m - k) * p[i]))
        expected[i] = running
    adjusted = holm(p)
    assert np.allclose(adjusted, expected)
    assert (adjusted >= p).all() and (np.diff(adjusted[order]) >= 0).all()
    assert holm([]).size == 0 and holm([0.2])[0] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------------
# Two arms over seeds (presets, the confirmation) and one arm's interval


def rows_of(certified: np.ndarray, images: list[int]) -> list[CertRow]:
    """One CertRow per image: certified ones correct with radius 0.6, the others abstain."""
    return [CertRow(i, 0, 0 if c else -1, 0.6 if c else 0.0, int(c), 0.1) for i, c in zip(images, certified)]


def seed_tables(outcomes: np.ndarray, images: list[int]) -> dict[int, list[CertRow]]:
    """seed -> rows, from an (images, seeds) outcome array (`rows_of`)."""
    return {s: rows_of(outcomes[:, s], images) for s in range(outcomes.shape[1])}


def test_paired_outcomes_pairs_seeds_by_key_and_images_by_idx():
    rng = np.random.default_rng(9)
    method, reference = outcomes(rng, 25, 3, 0.7, 0.4)
    images = list(range(0, 250, 10))
    m, r = seed_tables(method, images), seed_tables(reference, images)
    shuffled = {s: list(reversed(m[s])) for s in (2, 0, 1)}  # key order and row order do not matter
    r[3] = r[0]  # a seed only the reference has is not paired
    frame = paired_outcomes(shuffled, r, [0.0, 0.5])
    expected = image_level_test(method, reference)
    d = method.sum(axis=1).astype(int) - reference.sum(axis=1)
    for row in frame.itertuples():  # every certified row has radius 0.6
        assert (row.n_seeds, row.n_images) == (3, 25)
        assert (row.favour_method, row.favour_reference) == ((d > 0).sum(), (d < 0).sum())
        assert (row.p_value, row.difference) == pytest.approx((expected.p_value, expected.difference))
        assert (row.ci_low, row.ci_high) == pytest.approx(expected.interval)
    with pytest.raises(ValueError, match="share no seed"):
        paired_outcomes({5: m[0]}, r, [0.0])


def test_paired_radii_is_the_confirmations_best_against_defaults_table():
    rng = np.random.default_rng(10)
    best, default = outcomes(rng, 40, 2, 0.8, 0.4)
    images = list(range(40))
    b, d = seed_tables(best, images), seed_tables(default, images)
    frame = paired_radii([b[0], b[1]], [d[0], d[1]], (0.0, 0.5, 0.75))
    assert list(frame.columns) == ["radius", "difference (points)", "95% interval", "p", "p (Holm over radii)",
                                   "verdict"]
    p = image_level_test(best, default).p_value  # radius 0 and 0.5: every certified row has radius 0.6
    assert list(frame["p"]) == pytest.approx([p, p, 1.0])
    assert list(frame["p (Holm over radii)"]) == pytest.approx(list(holm([p, p, 1.0])))
    assert list(frame["verdict"]) == ["tuned better", "tuned better", "no difference shown"]


def test_accuracy_interval_is_clopper_pearson_when_the_seeds_agree_else_a_bootstrap_over_images():
    rng = np.random.default_rng(11)
    agree = np.repeat(rng.random((30, 1)) < 0.6, 3, axis=1)  # every image the same in all 3 seeds
    lo, hi, how = accuracy_interval(agree)
    k = int(agree[:, 0].sum())
    assert how == "Clopper-Pearson" and (lo, hi) == pytest.approx(proportion_confint(k, 30, 0.05, "beta"))
    differ = rng.random((30, 3)) < 0.6
    lo, hi, how = accuracy_interval(differ)
    a = differ.mean(axis=1)
    expected = bootstrap((a,), np.mean, n_resamples=10_000, method="percentile", batch=1000,
                         rng=np.random.default_rng(0)).confidence_interval
    assert how == "bootstrap" and (lo, hi) == pytest.approx((expected.low, expected.high))
    assert lo < a.mean() < hi
    assert accuracy_interval(np.zeros((10, 2)))[:2] == pytest.approx((0.0, proportion_confint(0, 10, 0.05,
                                                                                              "beta")[1]))
    with pytest.raises(ValueError, match="0/1 outcomes"):
        accuracy_interval(np.full((3, 2), 0.5))
