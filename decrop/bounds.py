"""Binomial confidence bounds of randomized smoothing, and the l2 radius a bound on pA certifies.

Shared by the fixed-n CERTIFY (`decrop.smooth`) and the statistics of the sequential mode (`decrop.sequential`),
which must not depend on each other's modules (the statistics know nothing of torch). Exact Clopper-Pearson
bounds, as in Cohen et al.'s ``Smooth._lower_confidence_bound``.
"""

from __future__ import annotations

from scipy.stats import beta, norm


def _check(k: int, n: int, alpha: float) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n.

    Equals ``statsmodels proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``; 0.0 when k == 0.
    """
    _check(k, n, alpha)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """l2 radius ``sigma * Phi^-1(p_lower)`` given a lower bound p_lower on the top-class probability."""
    return float(sigma * norm.ppf(p_lower))


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius CERTIFY can return with `n` samples: all n votes for the top class give
    pA_lower = alpha^(1/n). Radii above it are never certified, whatever the model."""
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)
