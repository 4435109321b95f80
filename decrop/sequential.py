"""Anytime-valid sequential CERTIFY: stop sampling an image once each reported radius is settled.

Cohen's CERTIFY draws a fixed n and reports ``sigma * Phi^-1(pA_lower)``. What a study reports is certified
accuracy at a few radii r_j, i.e. for each threshold ``t_j = Phi(r_j / sigma)`` whether ``pA > t_j``. Most images
settle that long before n. Peeking at a Clopper-Pearson bound and stopping when it looks good is *not* valid;
this module gives the same guarantee as CERTIFY, ``P(reported radius > true radius) <= alpha``, at a data-dependent
stopping time.

**Method.** Given the n0 selection samples (independent, as in CERTIFY), the estimation samples are i.i.d.
Bernoulli(pA); K_m counts successes among the first m. For each threshold t:

- *Certify* (reject H0: p <= t) once ``K_m >= b_t(m)``. The boundary comes from the Krichevsky-Trofimov mixture
  likelihood ratio ``M_m = KT(K_m, m) / (t^K_m (1 - t)^(m - K_m))`` (Beta(1/2, 1/2) mixture, a plug-in test
  martingale with the KT estimate (k + 1/2)/(m + 1) as predictable alternative), crossing level 1/a on the side
  ``K_m > t m``. Ville's inequality makes a = alpha_seq valid. It is loose here: with the horizon capped at n,
  and near t ~ 1 where the mixture pays ~1/2 ln m of regret, the exact crossing probability of that boundary is
  often 100x smaller than a (2.9e-6 instead of 5e-4 at t = Phi(3), n = 10,000). So the level is **calibrated**:
  the smallest level whose boundary has exact crossing probability <= alpha_seq (`calibrated_level`).
- *Exact crossing probability* (`crossing_probability`): the boundary depends on (m, K_m) only, so
  ``P_p(exists m <= n: K_m >= b(m))`` is a forward recursion over the law of K_m on paths not yet absorbed
  (Armitage, McPherson & Rowe 1969, "Repeated significance tests on accumulating data", JRSS A). Coupling
  (X_i = 1[U_i < p]) makes every K_m nondecreasing in p, so the crossing event is monotone and
  ``sup_{p <= t} P_p(cross) = P_t(cross)``: the composite null is covered by its boundary point.
- *Futility* (stop caring about t): ``K_m <= c_t(m)``, the mirror test of H0: p >= t at level `futility`, also
  calibrated; or curtailment, when not even all-success continuations could certify t any more. Futility only
  stops sampling: it never makes a certificate, so it cannot hurt validity (an error costs a certificate).
- *Uncertifiable thresholds* (`certifiable`): any boundary that some path crosses by m <= n is crossed by the
  all-successes path, so its crossing probability at p = t is at least t^n; the final look certifies t only if
  t^n <= alpha_fin. A threshold with ``t^n > max(alpha_seq, alpha_fin)`` can therefore never be certified (the
  sequential test's form of `decrop.bounds.max_certifiable_radius`); it gets the "never" boundaries and is
  settled before any sample, without calibration. This covers t that rounds to 1.0 (r / sigma >~ 8.3, e.g.
  r = 1 at sigma = 0.12), whose log(1 - t) the calibration could not take.
- *Final look*: at the cap n, Cohen's Clopper-Pearson bound at alpha_fin = alpha - alpha_seq. Since K_m <= K_n,
  ``CP(K_m, n, alpha_fin)`` (pretending the n - m samples not drawn all failed) is below the final bound on the
  path continued to n, so it may be reported at any stopping time and certifies a threshold early when it passes
  it (then the final look would certify it anyway).

**Reported bound.** A threshold is certified when its boundary was crossed by the stopping time or the CP
bound passes it; report ``L = max(t_top, CP(K_tau, n, alpha_fin))`` where t_top is the largest threshold whose
lower thresholds are *all* certified (nested reporting), and the radius ``sigma * Phi^-1(L)`` (exactly r_j when
L = t_j), abstaining when L < 1/2.

**Validity.** Let t* be the smallest threshold >= pA. If L > pA then either t_top > pA, which by nesting means
t* was certified, by its boundary (event R, probability <= P_{t*}(cross) <= alpha_seq) or by the CP bound, or
the CP bound exceeds pA; both CP cases lie in F = {CP(K_n, n, alpha_fin) >= pA}, probability <= alpha_fin
(Clopper-Pearson's coverage at the fixed n, on the path continued to n). Union bound:
P(L > pA) <= alpha_seq + alpha_fin = alpha, whatever the stopping rule (R and F are events of the path to n;
stopping early only removes rejections), and whatever pA: each threshold's test uses the whole alpha_seq,
since only one of them, t*, can err. If cA is not the smoothed class then pA < 1/2 and a non-abstaining answer
is such an error too. With L <= pA, sigma * Phi^-1(L) is a valid radius by Cohen et al.'s Theorem 1.

**Efficiency.** An image with top-class probability pA needs about ln(1/a) / KL(pA || t) samples per threshold,
near the oracle ln(1/alpha) / KL(pA || t) of a test that knew pA (Wald). The alpha split keeps most of alpha for
the final look (`SEQUENTIAL_SHARE` = 0.2), where Clopper-Pearson at n is hard to beat for images just above a
threshold; `benchmarks/sequential.py` measures the split and the futility level (0.01: giving up a threshold
pA exceeds at most 1% of the time cost no measurable accuracy against fixed n).

Related: Voracek, "Treatment of statistical estimation problems in randomized smoothing for adversarial
robustness" (NeurIPS 2024) stops on KT likelihood-ratio thresholds at Ville's level; Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting" (JRSS B 2024) give plug-in/betting confidence sequences.

``SequentialTest`` holds one image's state and knows nothing of torch: `decrop.smooth.Smooth.certify_sequential`
drives it with model samples, `benchmarks/sequential.py` with simulated Bernoulli draws.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import betaln
from scipy.stats import binom, norm

from .bounds import lower_confidence_bound

SEQUENTIAL_SHARE = 0.2  # share of alpha spent by the sequential boundaries; the rest goes to the final CP at n
FUTILITY = 0.01  # level of the futility test: at most this chance to give up a threshold that pA exceeds
_TRIM = 1e-30  # probability mass below which the recursion drops a tail (and counts it as crossing)


def thresholds(radii: Sequence[float], sigma: float) -> dict[float, float]:
    """``{Phi(r / sigma): r}`` for the reported radii, sorted by threshold (the r = 0 line is pA = 1/2)."""
    if not radii:
        raise ValueError("the sequential mode needs at least one radius to decide (certify.radii is empty)")
    if any(not (math.isfinite(r) and r >= 0) for r in radii):
        raise ValueError(f"radii must be finite and >= 0, got {list(radii)}")
    return {float(norm.cdf(r / sigma)): float(r) for r in sorted(set(radii))}


def log_kt_ratio(m: np.ndarray, k: np.ndarray, t: float) -> np.ndarray:
    """log of the KT mixture likelihood ratio against Bernoulli(t) after k successes in m draws."""
    return betaln(k + 0.5, m - k + 0.5) - betaln(0.5, 0.5) - k * math.log(t) - (m - k) * math.log1p(-t)


def rejection_boundary(t: float, n: int, log_level: float) -> np.ndarray:
    """b of length n + 1: reject p <= t at m iff ``K_m >= b[m]``; ``b[m] = m + 1`` where no k rejects.

    b[m] is the smallest k > t m with ``log_kt_ratio(m, k, t) >= log_level`` (the ratio increases in k there).
    Returned regularised, ``b[m + 1] <= b[m] + 1``: a path at or above b[m] + 1 at m + 1 was at or above b[m] at
    m, so this changes no crossing event, and ``b[m] - m`` is nonincreasing (used to find the earliest decision).
    """
    m = np.arange(n + 1, dtype=float)
    lo, hi = np.floor(t * m), m + 1  # k = lo never rejects (k <= t m); k = m + 1 stands for "none"
    for _ in range(max(1, int(n).bit_length() + 1)):
        mid = np.floor((lo + hi) / 2)
        active = hi - lo > 1
        ok = (mid > t * m) & (log_kt_ratio(m, np.minimum(mid, m), t) >= log_level)
        hi, lo = np.where(active & ok, mid, hi), np.where(active & ~ok, mid, lo)
    ramp = np.arange(n + 1)
    return np.minimum.accumulate(hi.astype(np.int64) - ramp) + ramp


def futility_boundary(t: float, n: int, log_level: float) -> np.ndarray:
    """c of length n + 1: conclude p < t at m iff ``K_m <= c[m]`` (-1: never), the mirror of the rejection
    boundary (`rejection_boundary` of 1 - t on failures); nondecreasing."""
    ramp = np.arange(n + 1)
    return np.maximum.accumulate(ramp - rejection_boundary(1.0 - t, n, log_level))


def crossing_probability(boundary: np.ndarray, p: float) -> float:
    """Exact ``P_p(exists m in 1..n: K_m >= boundary[m])`` for K_m ~ Binomial(m, p), n = len(boundary) - 1.

    Forward recursion over the law of K_m on the paths not yet absorbed, O(n x width). Mass below ``_TRIM`` in
    the lower tail is dropped and *counted as crossing*, so the result can only err upwards (conservative).
    """
    n = len(boundary) - 1
    dist, offset, total = np.ones(1), 0, 0.0  # dist[i] = P(K_m = offset + i, not absorbed)
    for m in range(1, n + 1):
        step = np.empty(len(dist) + 1)
        step[:-1] = dist * (1.0 - p)
        step[-1] = 0.0
        step[1:] += dist * p
        top = int(boundary[m]) - offset
        if top < len(step):
            total += float(step[max(top, 0):].sum())
            step = step[:max(top, 0)]
            if not len(step):
                return min(1.0, total)
        if m % 64 == 0 and step[0] < _TRIM:
            drop = int(np.searchsorted(np.cumsum(step), _TRIM))
            total += float(step[:drop].sum())
            step, offset = step[drop:], offset + drop
        dist = step
    return min(1.0, total)


def certifiable(t: float, n: int, alpha_seq: float, alpha_fin: float) -> bool:
    """False when no outcome of n samples can certify threshold t: ``t^n > max(alpha_seq, alpha_fin)``.

    The all-successes path crosses every boundary that any path crosses, so a valid sequential boundary at
    level alpha_seq is never crossed when t^n > alpha_seq, and the final Clopper-Pearson bound of n successes in
    n is alpha_fin^(1/n) < t when t^n > alpha_fin. Compared in logs: t = 1.0 (a rounded Phi(r / sigma)) gives
    0 > log(alpha), not certifiable, and no log(1 - t) is taken.
    """
    return n * math.log(t) <= math.log(max(alpha_seq, alpha_fin))


@functools.lru_cache(maxsize=256)
def calibrated_level(t: float, n: int, alpha: float, upper: bool = True) -> float:
    """The smallest log-level (to 0.01) whose boundary has exact crossing probability <= alpha at p = t.

    ``upper``: the rejection boundary of p <= t; else the futility boundary (crossing downwards). Starts from
    Ville's level ln(1/alpha), which is valid for the KT martingale, and bisects downwards.
    """
    if not 0 < t < 1:
        raise ValueError(f"the threshold must be in (0, 1), got t={t} (see `certifiable`)")
    def crossing(log_level: float) -> float:
        if upper:
            return crossing_probability(rejection_boundary(t, n, log_level), t)
        return crossing_probability(rejection_boundary(1.0 - t, n, log_level), 1.0 - t)

    lo, hi = 0.0, math.log(1.0 / alpha)
    if crossing(hi) > alpha:  # cannot happen (Ville); checked because everything rests on it
        raise RuntimeError(f"Ville's level ln(1/{alpha}) crosses with probability above {alpha} at t={t}, n={n}")
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        if crossing(mid) <= alpha * (1 - 1e-9):  # margin for float rounding in the recursion
            hi = mid
        else:
            lo = mid
    return hi


def final_critical(t: float, n: int, alpha: float) -> int:
    """Smallest k with ``lower_confidence_bound(k, n, alpha) >= t``, i.e. ``P_t(K_n >= k) <= alpha``; n + 1 if
    none (the duality of the Clopper-Pearson bound and the binomial tail)."""
    k = int(binom.isf(alpha, n, t)) + 1
    while k <= n and binom.sf(k - 1, n, t) > alpha:  # guard the quantile's rounding in both directions
        k += 1
    while k > 0 and binom.sf(k - 2, n, t) <= alpha:
        k -= 1
    return min(k, n + 1)


@functools.lru_cache(maxsize=256)
def _boundaries(t: float, n: int, alpha_seq: float, alpha_fin: float, futility: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(certify, futility, reach) of threshold t: certify includes the final CP (K >= its critical k) and
    reach = m - certify[m] finds the earliest possible certification by binary search. A threshold that is not
    `certifiable` gets certify = n + 1 (never) and futility = -1 (never): it is hopeless from the start."""
    ramp = np.arange(n + 1)
    if certifiable(t, n, alpha_seq, alpha_fin):
        certify = rejection_boundary(t, n, calibrated_level(t, n, alpha_seq))
        certify = np.minimum(certify, final_critical(t, n, alpha_fin))
        fut = futility_boundary(t, n, calibrated_level(t, n, futility, upper=False))
    else:
        certify, fut = np.full(n + 1, n + 1, dtype=np.int64), np.full(n + 1, -1, dtype=np.int64)
    reach = ramp - certify  # nondecreasing (see `rejection_boundary`)
    for array in (certify, fut, reach):
        array.setflags(write=False)
    return certify, fut, reach


class SequentialTest:
    """The sequential certificate of one image: feed it counts with ``observe`` until ``done``, then read
    ``radius`` (None: abstain). Knows nothing of torch.

    Args:
        radii: the reported radii (>= 0); each one's threshold Phi(r / sigma) is decided. The abstain line
            pA = 1/2 is decided only when 0 is among them. A radius whose threshold n samples cannot certify
            (`certifiable`) is answered "not certified" before any sample.
        sigma: the smoothing noise level.
        n: the most estimation samples the image may use (Cohen's n).
        alpha: the failure probability of the certificate, as in CERTIFY.
        prior: (successes, trials) of the selection samples; they only guide ``next_draw`` (the statistics
            never see them: selection and estimation samples must stay independent).
        share: the part of alpha spent on the sequential boundaries; the rest is the final look's.
        futility: level of the futility test that gives up a threshold.
    """

    def __init__(self, radii: Sequence[float], sigma: float, n: int, alpha: float,
                 prior: tuple[int, int] = (0, 0), share: float = SEQUENTIAL_SHARE, futility: float = FUTILITY):
        if n < 1 or not 0 < alpha < 1 or not 0 < share < 1 or not 0 < futility < 1 or not sigma > 0:
            raise ValueError(f"need n >= 1, sigma > 0 and alpha, share, futility in (0, 1); got n={n}, "
                             f"sigma={sigma}, alpha={alpha}, share={share}, futility={futility}")
        self.radii = thresholds(radii, sigma)  # threshold -> radius, ascending
        self.levels = list(self.radii)
        self.sigma, self.n, self.prior = sigma, n, prior
        self.alpha_seq, self.alpha_fin = share * alpha, (1 - share) * alpha
        self._bounds = [_boundaries(t, n, self.alpha_seq, self.alpha_fin, futility) for t in self.levels]
        self.drawn, self.successes = 0, 0
        self.certified = [False] * len(self.levels)
        self.settled = [False] * len(self.levels)
        self._update()

    def observe(self, successes: int, trials: int) -> None:
        """Record ``successes`` top-class votes among ``trials`` new samples (trials <= n - drawn)."""
        if not 0 <= successes <= trials <= self.n - self.drawn:
            raise ValueError(f"need 0 <= successes <= trials <= {self.n - self.drawn} samples left, got "
                             f"successes={successes}, trials={trials}")
        self.drawn += trials
        self.successes += successes
        self._update()

    @property
    def done(self) -> bool:
        """True once every threshold is settled or n samples are drawn."""
        return self.drawn >= self.n or all(self.settled)

    def next_draw(self, batch_size: int) -> int:
        """How many samples to draw next, in 1..min(batch_size, n - drawn): half of what the last open
        decision is predicted to need along the current estimate of pA (half the room when no decision is in
        sight), but never fewer than the next decision could possibly need. An image that will stop soon then
        does not draw, and waste, a whole batch, and the number of looks stays logarithmic. Any policy is
        valid: it only decides when to look."""
        room = min(batch_size, self.n - self.drawn)
        open_ = [j for j, settled in enumerate(self.settled) if not settled]
        if room < 1 or not open_:
            return max(room, 0)
        k0, n0 = self.prior
        p_hat = (self.successes + k0 + 0.5) / (self.drawn + n0 + 1)
        mean_path = self.successes + p_hat * np.arange(1, room + 1)
        last = 0
        for j in open_:
            certify, futile = (bound[self.drawn + 1:self.drawn + room + 1] for bound in self._bounds[j][:2])
            hit = np.flatnonzero((mean_path >= certify) | (mean_path <= futile))
            last = max(last, int(hit[0]) + 1 if len(hit) else room)
        earliest = min(self._earliest(j) for j in open_)
        return int(min(room, max(earliest, math.ceil(last / 2))))

    @property
    def p_lower(self) -> float:
        """The reported lower bound on pA: the top of the nested certified thresholds, or the final look's
        Clopper-Pearson bound with the undrawn samples counted as failures, whichever is larger."""
        top = 0.0
        for level, certified in zip(self.levels, self.certified):
            if not certified:
                break
            top = level
        final = lower_confidence_bound(self.successes, self.n, self.alpha_fin)
        return max(top, final)

    @property
    def radius(self) -> float | None:
        """The certified l2 radius, or None to abstain (p_lower < 1/2). Exactly r_j when the bound is the
        threshold of r_j, so certified-at-r_j never depends on rounding."""
        p_lower = self.p_lower
        if p_lower < 0.5:
            return None
        if p_lower in self.radii:
            return self.radii[p_lower]
        return float(self.sigma * norm.ppf(p_lower))

    def _earliest(self, j: int) -> int:
        """Fewest further samples after which threshold j could be settled (by all successes or all failures)."""
        down = int(np.searchsorted(self._bounds[j][1], self.successes, side="left"))
        return min(self._earliest_certify(j), max(down, self.drawn + 1) - self.drawn)

    def _earliest_certify(self, j: int) -> int:
        """Fewest further samples after which threshold j could be certified (n + 1 - drawn: never)."""
        # certify[m'] - m' is nonincreasing, so m' - certify[m'] is sorted: the first m' > m where all
        # successes since m reach the boundary is a binary search (m' <= m would mean certified already).
        reach = self._bounds[j][2]
        return int(max(np.searchsorted(reach, self.drawn - self.successes, side="left"), self.drawn + 1)) - self.drawn

    def _update(self) -> None:
        m, k = self.drawn, self.successes
        for j, (certify, futile, _) in enumerate(self._bounds):
            if k >= certify[m]:
                self.certified[j] = True
            lost = k <= futile[m] or self._hopeless(j)
            if not self.certified[j] and lost:
                # pA < t_j: every higher threshold is out of reach as well (nested reporting needs t_j).
                for i in range(j, len(self.levels)):
                    self.settled[i] = self.settled[i] or not self.certified[i]
            self.settled[j] = self.settled[j] or self.certified[j]

    def _hopeless(self, j: int) -> bool:
        """True when not even all successes from here to n would reach threshold j's certify boundary."""
        return self.drawn >= self.n or self.drawn + self._earliest_certify(j) > self.n
