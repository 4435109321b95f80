"""Inference over training runs: is one training *procedure* better than (or as good as) another?

A claim of the paper is about a procedure (DE-CROP against the baseline, one level of a factor against another),
so its unit of replication is the training run: a seed draws its own k% subset, initialisation and noise. Two arms
are paired by seed (same subset, same certification noise) and certify the same test images, so the paired
outcome d_is = c^A_is - c^B_is (c = certified correct at radius r, image i, seed s) sits in a crossed design:
every image under every seed. Its mean is modelled as

    d_is = mu + a_s + b_i + e_is,   a_s ~ (0, s2_seed), b_i ~ (0, s2_image), e_is ~ (0, s2_resid),

the crossed random-effects model (seeds and images both random draws from their populations). In a balanced
design (every image under every seed, which `certified_matrix` guarantees) its variance components have the
closed-form ANOVA (method of moments) estimates, which equal the REML estimates when none is negative (a negative
one is set to 0, and the variance below uses what remains). The variance of the mean difference is

    Var(mean d) = s2_seed / S + s2_image / I + s2_resid / (S I),

estimated from the mean squares; its degrees of freedom by Satterthwaite, never more than those of MS_seed +
MS_image: the seed component rests on S - 1 degrees of freedom, and when its estimate falls below 0 and is
dropped from the variance, that uncertainty remains (without the cap the test is more liberal with few seeds).
The test of mu = 0 is the t test with that standard error and those degrees of freedom, and the 95% interval is
built from the same two numbers, so the interval excludes 0 exactly when p < 0.05. A verdict needs `MIN_SEEDS`
seeds: with 2 the test is too liberal whatever its degrees of freedom (`tests/analysis/test_inference.py`
simulates its error rate). "No difference" claims get two one-sided tests (TOST) against a
declared margin, which agree with the 90% interval lying inside (-margin, +margin).

`seeds_for_power` turns estimated components into the number of seeds that detects a given difference with a
given power (non-central t, Satterthwaite degrees of freedom at the expected mean squares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import nct, t as student_t


MIN_SEEDS = 3  # the fewest paired seeds whose seed-level test a verdict rests on


@dataclass(frozen=True)
class Components:
    """Variance components of the crossed model (fractions squared: d is in [-1, 1])."""

    seed: float
    image: float
    resid: float


@dataclass(frozen=True)
class SeedLevelTest:
    """The seed-level test of two paired arms at one radius. Differences are fractions in [-1, 1]."""

    difference: float  # mean of d over seeds and images
    per_seed: tuple[float, ...]  # mean of d over images, seed by seed (the seeds' order as given)
    se: float  # standard error of `difference` under the crossed model
    df: float  # Satterthwaite degrees of freedom
    p_value: float  # two-sided, H0: mu = 0
    interval: tuple[float, float]  # 95%, from the same se and df
    components: Components
    n_seeds: int
    n_images: int

    def equivalence(self, margin: float) -> tuple[float, tuple[float, float]]:
        """TOST of |mu| < `margin`: (p, the 90% interval from the same se and df). p < 0.05 exactly when the
        90% interval lies inside (-margin, margin)."""
        if self.se == 0:
            inside = abs(self.difference) < margin
            return (0.0 if inside else 1.0), (self.difference, self.difference)
        lower = student_t.sf((self.difference + margin) / self.se, self.df)  # H0: mu <= -margin
        upper = student_t.cdf((self.difference - margin) / self.se, self.df)  # H0: mu >= +margin
        half = student_t.ppf(0.95, self.df) * self.se
        return float(max(lower, upper)), (self.difference - half, self.difference + half)


def _mean_squares(d: np.ndarray) -> tuple[float, float, float, int, int, int]:
    images, seeds = d.shape
    grand = d.mean()
    by_image, by_seed = d.mean(axis=1), d.mean(axis=0)
    ms_seed = images * ((by_seed - grand) ** 2).sum() / (seeds - 1)
    ms_image = seeds * ((by_image - grand) ** 2).sum() / (images - 1)
    resid = d - by_image[:, None] - by_seed[None, :] + grand
    ms_resid = (resid ** 2).sum() / ((images - 1) * (seeds - 1))
    return ms_seed, ms_image, ms_resid, seeds - 1, images - 1, (images - 1) * (seeds - 1)


def _variance_and_df(ms: tuple[float, float, float], dfs: tuple[int, int, int], images: int, seeds: int
                     ) -> tuple[float, float, Components]:
    """Var(mean d) and its Satterthwaite df from the mean squares (seed, image, residual), with the variance
    components truncated at 0 (the terms of a truncated component leave the linear combination); the df never
    more than those of MS_seed + MS_image (the module's docstring says why)."""
    ms_seed, ms_image, ms_resid = ms
    seed_part, image_part = ms_seed > ms_resid, ms_image > ms_resid
    # I*s2_seed + S*s2_image + s2_resid as a combination of the mean squares (E[MS_seed] = s2_resid +
    # I*s2_seed, E[MS_image] = s2_resid + S*s2_image, E[MS_resid] = s2_resid), a truncated component left out.
    if seed_part and image_part:
        coef = (1.0, 1.0, -1.0)
    elif seed_part:
        coef = (1.0, 0.0, 0.0)
    elif image_part:
        coef = (0.0, 1.0, 0.0)
    else:
        coef = (0.0, 0.0, 1.0)
    combo = sum(c * m for c, m in zip(coef, ms))
    terms = sum((c * m) ** 2 / df for c, m, df in zip(coef, ms, dfs) if c != 0 and df > 0)
    df = combo ** 2 / terms if terms > 0 else math.inf
    held = ((ms_seed, dfs[0]), (ms_image, dfs[1]))  # the mean squares that carry the seed and image terms
    if ms_seed + ms_image > 0:
        df = min(df, (ms_seed + ms_image) ** 2 / sum(m ** 2 / k for m, k in held if k > 0))
    components = Components(seed=max(0.0, (ms_seed - ms_resid) / images),
                            image=max(0.0, (ms_image - ms_resid) / seeds), resid=ms_resid)
    return combo / (images * seeds), df, components


def crossed_test(method: np.ndarray, reference: np.ndarray) -> SeedLevelTest:
    """Seed-level paired test of two arms: `method` and `reference` are (images, seeds) arrays of 0/1 outcomes,
    row i the same image, column s the same seed in both (paired by seed). Needs at least 2 seeds and 2 images
    (ValueError otherwise): with one seed there is no seed-to-seed variance to estimate. A verdict needs
    `MIN_SEEDS`."""
    m, r = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if m.shape != r.shape or m.ndim != 2:
        raise ValueError(f"crossed_test needs two (images, seeds) arrays of one shape, got {m.shape}, {r.shape}")
    images, seeds = m.shape
    if seeds < 2 or images < 2:
        raise ValueError(f"crossed_test needs at least 2 seeds and 2 images, got {seeds} seeds, {images} images")
    d = m - r
    mean = float(d.mean())
    *ms, df_seed, df_image, df_resid = _mean_squares(d)
    variance, df, components = _variance_and_df(tuple(ms), (df_seed, df_image, df_resid), images, seeds)
    se = math.sqrt(max(variance, 0.0))
    if se == 0:
        p, interval = (1.0 if mean == 0 else 0.0), (mean, mean)
    else:
        p = float(2 * student_t.sf(abs(mean) / se, df))
        half = float(student_t.ppf(0.975, df)) * se
        interval = (mean - half, mean + half)
    return SeedLevelTest(mean, tuple(float(x) for x in d.mean(axis=0)), se, float(df), p, interval, components,
                         seeds, images)


def power(components: Components, seeds: int, images: int, effect: float, alpha: float = 0.05) -> float:
    """Power of the two-sided `crossed_test` at level `alpha` to detect a mean difference `effect` (a fraction)
    with `seeds` seeds and `images` images, when the true variance components are `components` (0 below
    `MIN_SEEDS`, where no verdict rests on the test)."""
    if seeds < MIN_SEEDS:
        return 0.0
    c = components
    e_seed, e_image, e_resid = c.resid + images * c.seed, c.resid + seeds * c.image, c.resid
    variance, df, _ = _variance_and_df((e_seed, e_image, e_resid), (seeds - 1, images - 1,
                                                                    (images - 1) * (seeds - 1)), images, seeds)
    if variance <= 0:
        return 1.0
    crit = student_t.ppf(1 - alpha / 2, df)
    shift = effect / math.sqrt(variance)
    return float(nct.sf(crit, df, shift) + nct.cdf(-crit, df, shift))


def seeds_for_power(components: Components, images: int, effect: float = 0.05, alpha: float = 0.05,
                    target: float = 0.8, most: int = 100) -> int | None:
    """The fewest seeds (>= `MIN_SEEDS`) whose `power` reaches `target`; None when even `most` seeds do not (the
    image component alone can make an effect undetectable on a fixed number of test images)."""
    for seeds in range(MIN_SEEDS, most + 1):
        if power(components, seeds, images, effect, alpha) >= target:
            return seeds
    return None
