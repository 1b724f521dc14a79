"""The data-set-level lower bound on certified accuracy: k* against a brute-force scipy search, the bound
against a hand count, and a simulation of its 1 - rho guarantee (which Cohen et al.'s formula misses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from dmae_lightning.certification.metrics import certified_accuracy_lower_bound, false_certificates_allowed
from dmae_lightning.certification.records import ABSTAIN, CertifyRecord


def brute_force_k(m: int, alpha: float, rho: float) -> int:
    k = 0
    while binom.sf(k, m, alpha) > rho:  # P(Bin(m, alpha) > k)
        k += 1
    return k


@pytest.mark.parametrize(
    "m,alpha,rho", [(1, 0.001, 0.001), (500, 0.001, 0.001), (1000, 0.001, 0.001), (10_000, 0.001, 0.001),
                    (100_000, 0.001, 0.001), (1000, 0.01, 0.05), (10, 0.5, 0.3)],
)  # fmt: skip
def test_allowed_false_certificates_is_the_least_k(m, alpha, rho):
    k = false_certificates_allowed(m, alpha, rho)
    assert k == brute_force_k(m, alpha, rho)
    assert binom.sf(k, m, alpha) <= rho and (k == 0 or binom.sf(k - 1, m, alpha) > rho)
    assert false_certificates_allowed(10_000, 0.001, 0.001) == 21  # worst case of the issue


def test_lower_bound_by_hand():
    # 10 images: certified correct at radius 0.6, 0.6, 0.3, 0.3, 0.3, 0.1; one wrong, three abstained
    radii = [0.6, 0.6, 0.3, 0.3, 0.3, 0.1]
    records = [CertifyRecord(i, 1, 1, r, 1, 990, 1000, 0.0) for i, r in enumerate(radii)]
    records += [CertifyRecord(6, 1, 2, 0.4, 0, 990, 1000, 0.0)]
    records += [CertifyRecord(i, 1, ABSTAIN, 0.0, 0, 400, 1000, 0.0) for i in (7, 8, 9)]
    # alpha = 0.05: P(Bin(10, 0.05) > 1) = 0.086 > 0.05, P(> 2) = 0.0115 <= 0.05, so k* = 2
    assert false_certificates_allowed(10, 0.05, 0.05) == 2
    bound = certified_accuracy_lower_bound(records, [0, 0.25, 0.5, 1.0], alpha=0.05, rho=0.05)
    assert bound == {"0": (6 - 2) / 10, "0.25": (5 - 2) / 10, "0.5": 0.0, "1": 0.0}


def cohen_high_prob_accuracy(mean: np.ndarray, m: int, alpha: float, rho: float) -> np.ndarray:
    """Cohen et al.'s HighProbAccuracy (locuslab/smoothing analyze.py)."""
    return mean - alpha - math.sqrt(alpha * (1 - alpha) * math.log(1 / rho) / m) - math.log(1 / rho) / (3 * m)


@pytest.mark.parametrize("m", [500, 10_000])
def test_the_bound_fails_at_most_rho_of_the_time_and_cohens_formula_does_not(m):
    """Worst case: every image is truly not certifiable and each certificate is false with probability
    exactly alpha, independently; the true certified accuracy is 0 and a trial fails when the bound is > 0."""
    alpha = rho = 0.001
    trials = 2_000_000
    rng = np.random.default_rng(0)
    false = rng.binomial(m, alpha, size=trials)  # [T] false certificates among m Bernoulli(alpha) ones
    k = false_certificates_allowed(m, alpha, rho)
    exact_bound = np.maximum(false - k, 0) / m  # what certified_accuracy_lower_bound gives for these counts
    limit = rho + 3 * math.sqrt(rho * (1 - rho) / trials)
    assert np.mean(exact_bound > 0) <= limit
    assert np.mean(exact_bound > 0) == pytest.approx(binom.sf(k, m, alpha), abs=3 * math.sqrt(rho / trials))
    if m == 10_000:  # the worst case of the issue: Cohen's formula fails 0.0016 of the time
        cohen_failures = np.mean(cohen_high_prob_accuracy(false / m, m, alpha, rho) > 0)
        assert cohen_failures == pytest.approx(binom.sf(20, m, alpha), abs=3 * math.sqrt(rho / trials))
        assert cohen_failures > limit
    # the function itself on one trial's records: as many false certificates as the bound allows, plus one
    records = [CertifyRecord(i, 1, 1, 1.0, 1, 1000, 1000, 0.0) for i in range(k + 1)]
    records += [CertifyRecord(i, 1, ABSTAIN, 0.0, 0, 0, 1000, 0.0) for i in range(k + 1, m)]
    assert certified_accuracy_lower_bound(records, [0.5], alpha, rho) == {"0.5": 1 / m}
