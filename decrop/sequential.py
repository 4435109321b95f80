"""Anytime-valid early stopping for CERTIFY: stop sampling an image once its outcome is decided.

Cohen's CERTIFY draws a fixed n. Most images do not need it: an image the smoothed classifier clearly gets
wrong, abstains on, or certifies at a radius between two reported radii is decided after a few hundred
samples. Peeking at a Clopper-Pearson bound after every batch and stopping when it looks good is *not* valid
(the bound holds at a fixed n, not at a data-dependent one). This module uses the simplest valid alternative,
an **alpha split over a fixed schedule of looks**:

- looks at m_1 < m_2 < ... < m_K = n (doubling from `first`), fixed before any sample is drawn;
- look k uses a one-sided Clopper-Pearson bound at level alpha_k, with sum_k alpha_k = alpha (half of alpha at
  the final look, so a full-length image loses little radius, the other half spread evenly over earlier looks);
- union bound: P(some look's lower bound exceeds pA) <= sum_k alpha_k = alpha, so whichever look an image
  stops at, its certificate holds with probability >= 1 - alpha, the same guarantee as fixed-n CERTIFY.

An image stops at the first look where no reported threshold t = Phi(r / sigma) (t = 1/2 for r = 0, the
abstain line) lies in (lower, upper]: more samples would (with high probability) change none of its
certified-at-r outcomes. The stopping rule may use the upper bound freely: stopping early can only lose
power, never validity, since the certificate uses the lower bound alone. The reported radius comes from the
bound at the stopping look, so ACR is lower than with fixed n; certified accuracy at the reported radii is what
this mode preserves.

The sampling loop is `decrop.smooth.Smooth.certify_sequential`; this module holds the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from scipy.stats import norm


def look_schedule(n: int, first: int = 100) -> list[int]:
    """Sample counts at which the bound is checked: first, 2 first, 4 first, ..., n."""
    looks = []
    m = min(first, n)
    while m < n:
        looks.append(m)
        m *= 2
    return looks + [n]


def alpha_split(alpha: float, num_looks: int) -> list[float]:
    """Per-look levels summing to alpha: alpha / 2 at the final look, alpha / 2 spread over the others."""
    if num_looks == 1:
        return [alpha]
    early = alpha / 2 / (num_looks - 1)
    return [early] * (num_looks - 1) + [alpha / 2]


def thresholds(radii: Sequence[float], sigma: float) -> list[float]:
    """pA levels at which the certified-at-r outcome flips: Phi(r / sigma), with 1/2 (abstain) always included."""
    return sorted({0.5, *(float(norm.cdf(r / sigma)) for r in radii)})


def decided(lower: float, upper: float, levels: Sequence[float]) -> bool:
    """True when no level t lies in (lower, upper]: every certified-at-r outcome is settled."""
    return not any(lower < t <= upper for t in levels)
