"""One home for what is reported: certified accuracy, its data-set-level lower bound, ACR, abstain rate.

The job, the training callback and the analysis CLI all compute their numbers here, from records
(:mod:`.records`), put together as a run's result by :mod:`.summary`; tables and plots of them are :mod:`.report`. This module imports no torch (the noise only
for its type), so the analysis CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from scipy.stats import binom

from dmae_lightning.certification.records import ABSTAIN, AttackRecord, CertifyRecord, PredictRecord, Record

if TYPE_CHECKING:
    from dmae_lightning.noise import Noise

R = TypeVar("R", bound=Record)

IMAGENET_RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
CIFAR10_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_RHO = (
    0.001  # failure probability of the data-set-level lower bound (see certified_accuracy_lower_bound)
)


def default_radii(dataset: str) -> tuple[float, ...]:
    """The paper's radii: ImageNet's for imagenet, CIFAR-10's for every other (32x32) data set."""
    return IMAGENET_RADII if "imagenet" in str(dataset).lower() else CIFAR10_RADII


def radius_key(radius: float) -> str:
    """Canonical name of a radius in dicts and JSON: ``f"{r:g}"``, e.g. "0", "0.25", "1" (1 and 1.0 agree)."""
    return f"{float(radius):g}"


def max_certifiable_radius(noise: Noise, n: int, alpha: float) -> float:
    """The largest radius n estimation draws can certify at level alpha: n successes out of n give the
    Clopper-Pearson lower bound alpha^(1/n), hence the noise's radius there (sigma * Phi^-1(alpha^(1/n))
    for Gaussian noise)."""
    return noise.radius(alpha ** (1.0 / n))


def _require(records: Iterable[R]) -> list[R]:
    checked = list(records)
    if not checked:
        raise ValueError("no certification records")
    return checked


def certified_counts(records: Iterable[Record], radii: Iterable[float]) -> dict[str, int]:
    """Number of images certified correct with radius >= r, keyed by :func:`radius_key`."""
    radius = [rec.certified_correct_radius for rec in _require(records)]
    return {radius_key(r): sum(c is not None and c >= r for c in radius) for r in radii}


def certified_accuracy(records: Iterable[Record], radii: Iterable[float]) -> dict[str, float]:
    """Fraction of images certified correct with radius >= r, keyed by :func:`radius_key`."""
    records = _require(records)
    return {key: count / len(records) for key, count in certified_counts(records, radii).items()}


def false_certificates_allowed(m: int, alpha: float, rho: float) -> int:
    """k* = min{k : P(Bin(m, alpha) > k) <= rho}: with probability at least 1 - rho, at most k* of m
    certificates, each false with probability at most alpha independently, are false.

    scipy's ``binom.isf`` of a discrete distribution is exactly this least k with ``sf(k) <= rho``.
    """
    return int(binom.isf(rho, m, alpha))


def certified_accuracy_lower_bound(
    records: Iterable[Record], radii: Iterable[float], alpha: float, rho: float = DEFAULT_RHO
) -> dict[str, float]:
    """Lower bound, at level 1 - rho, on the true smoothed classifier's certified accuracy at each radius.

    Each image's certificate (CERTIFY's radius, or every answer of the sequential test) is false with
    probability at most alpha, independently across images (each image has its own noise). The number F of
    false certificates among the m images is therefore stochastically below Bin(m, alpha), and
    P(F > k*) <= rho with k* from :func:`false_certificates_allowed`. An image wrongly counted at radius r
    has a false certificate, so the true count at r is at least (certified correct - F), and
    (certified correct - k*) / m (at least 0) bounds the true certified accuracy with probability 1 - rho,
    at every radius at once (one event, F <= k*, covers them all).

    This replaces Cohen et al.'s HighProbAccuracy (mean - alpha - sqrt(alpha (1 - alpha) log(1/rho) / m)
    - log(1/rho) / (3 m)), which can miss its own guarantee: at m = 10,000, alpha = rho = 0.001 it
    allows 20.6 false certificates, and P(Bin(10,000, 0.001) >= 21) = 0.0016 > rho.
    """
    records = _require(records)
    m = len(records)
    allowed = false_certificates_allowed(m, alpha, rho)
    return {key: max(count - allowed, 0) / m for key, count in certified_counts(records, radii).items()}


def average_certified_radius(records: Iterable[Record]) -> float:
    """ACR: mean certified radius, wrong and abstained images counting as radius 0. (For a grid-only procedure,
    certify_radii, it would be the mean of grid radii, not comparable with CERTIFY's ACR: its summary leaves it
    out, :class:`~.summary.CertifiedSummary`.)"""
    records = _require(records)
    return sum(rec.certified_correct_radius or 0.0 for rec in records) / len(records)


def abstain_rate(records: Iterable[Record]) -> float:
    records = _require(records)
    return sum(rec.predict == ABSTAIN for rec in records) / len(records)


def accuracy(records: Iterable[CertifyRecord | PredictRecord]) -> float:
    """Fraction of images whose prediction is their label (the record types with a ``correct`` column)."""
    checked = _require(records)
    return sum(rec.correct for rec in checked) / len(checked)


def within_reach(values: Mapping[str, float], limit: float) -> dict[str, float | None]:
    """``values`` (keyed by :func:`radius_key`) with None at each radius beyond ``limit``, the largest radius
    the run can certify (:func:`max_certifiable_radius`): there a 0 would only say that n was too small."""
    return {key: None if float(key) > limit else value for key, value in values.items()}


def best_over_sigma(rows: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Envelope of several certified-accuracy dicts: the best value per radius, as papers report it (None
    where no row reaches the radius)."""
    first, *_ = rows.values()
    return {
        key: max((v for row in rows.values() if (v := row[key]) is not None), default=None) for key in first
    }


def attacked_certificates(
    certified: Iterable[Record], attacked: Iterable[AttackRecord], alpha: float, rho: float = DEFAULT_RHO
) -> dict[str, tuple[int, int, int]]:
    """The cross-check of a certification run against an attack run on the same images, noise and model: for each
    radius r of the attack, (images certified correct at radius >= r, of them the attack turned to another class,
    the most a sound certifier allows at level 1 - rho).

    An image certified correct at radius >= r has, unless its certificate is false (probability <= alpha), g(x')
    = its label for every x' within r, the attack's x' included; PREDICT on x' then names another class with
    probability <= alpha (its guarantee; an abstention is not counted). So each such image turns to another class
    with probability <= 2 alpha, independently (each image has its own noise), and with probability >= 1 - rho
    at most ``binom.isf(rho, m, 2 alpha)`` of the m certified images do (:func:`false_certificates_allowed`).
    More means an unsound certificate, or a broken pipeline; a failed attack can only lower the count. Images
    absent from either run are left out.
    """
    radius = {rec.idx: rec.certified_correct_radius for rec in certified}
    out: dict[str, tuple[int, int, int]] = {}
    attacked = list(attacked)
    for position, r in enumerate(attacked[0].radii if attacked else ()):
        pairs = [
            (rec.label, rec.predictions[position])
            for rec in attacked
            if (c := radius.get(rec.idx)) is not None and c >= r
        ]
        flipped = sum(predicted not in (label, ABSTAIN) for label, predicted in pairs)
        out[radius_key(r)] = (len(pairs), flipped, false_certificates_allowed(len(pairs), 2 * alpha, rho))
    return out
