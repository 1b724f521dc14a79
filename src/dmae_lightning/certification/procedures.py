"""Certification procedures and the smoothed classifier that runs them.

A procedure turns the noisy predictions of one labelled image into one record. It is a small class
of plain settings with ``run(idx, label, noise)`` (:class:`~.protocol.Procedure`): a generator that yields
:class:`~.protocol.Draw` requests, receives the class counts ([K] int64 CPU tensor) of each, and returns its
record (:mod:`.records`). The sampler serves the requests of many images at once, so a procedure never
sees batches, devices or seeds. A procedure holds no noise: the sampler starts each run with the noise it
draws from, so every radius comes from the distribution the samples were drawn from. ``PROCEDURES``
maps the job's ``procedure`` value to the class; a new procedure is one class plus one entry there. A
procedure summarises a run's records into its kind of result (:mod:`.summary`).

- :class:`Certify`: CERTIFY of Cohen, Rosenfeld & Kolter (ICML 2019): n0 draws select the top class cA,
  n fresh draws bound its probability from below (Clopper-Pearson), radius from the noise's formula.
- :class:`Predict`: PREDICT: the top class, or abstain when a two-sided binomial test cannot separate
  the two top counts at level alpha.
- :class:`CertifyRadii`: sequential certification of the label at a fixed grid of radii (the question a
  certified-accuracy table asks), stopping each image as soon as every radius is decided
  (:mod:`.sequential_test`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from scipy.stats import binomtest

from dmae_lightning.certification.checks import check_alpha, check_counts
from dmae_lightning.certification.confidence import (
    SequentialTest,
    check_radii,
    clopper_pearson_lower,
    look_schedule,
    spend_alpha,
)
from dmae_lightning.certification.metrics import DEFAULT_RHO, abstain_rate, max_certifiable_radius
from dmae_lightning.certification.protocol import Draw, Procedure, Run
from dmae_lightning.certification.records import (
    ABSTAIN,
    CertifyRecord,
    PredictRecord,
    RadiiRecord,
    Record,
    of_type,
)
from dmae_lightning.certification.sampler import NOISE_BLOCK
from dmae_lightning.certification.summary import CertifiedSummary, PredictionSummary, SequentialCost
from dmae_lightning.noise import Noise


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a successes in n trials.

    It is the p with P[Bin(n, p) >= n_a] = alpha, i.e. the alpha quantile of Beta(n_a, n - n_a + 1);
    with n_a = 0 every p satisfies P >= alpha, so the bound is 0.
    """
    if not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n, got n_a={n_a}, n={n}")
    return clopper_pearson_lower(n_a, n, alpha)


@dataclass(frozen=True)
class Certify(Procedure):
    """CERTIFY(f, noise, x, n0, n, alpha); with ``skip_wrong_guess`` a guess cA != label skips the n
    estimation draws (the record keeps cA, radius 0.0 and n = 0): such an image can only be certified
    wrong or abstain, so certified accuracy is unchanged and the time is saved."""

    name: ClassVar[str] = "certify"
    record_type: ClassVar[type[Record]] = CertifyRecord
    n0: int
    n: int
    alpha: float
    skip_wrong_guess: bool = False

    def __post_init__(self):
        check_counts(n0=self.n0, n=self.n)
        check_alpha(self.alpha)

    def run(self, idx: int, label: int, noise: Noise) -> Run:
        selection = yield Draw(stage=0, num=self.n0)  # [K]
        guess = int(selection.argmax())  # first class among ties
        if self.skip_wrong_guess and guess != label:
            return CertifyRecord(idx, label, guess, 0.0, 0, 0, 0, 0.0)
        n_a = int((yield Draw(stage=1, num=self.n))[guess])
        p_lower = lower_confidence_bound(n_a, self.n, self.alpha)
        if p_lower < noise.probability_for_radius(
            0.0
        ):  # 1/2, plus what a noise deducts for its sampling error
            return CertifyRecord(idx, label, ABSTAIN, 0.0, 0, n_a, self.n, 0.0)
        return CertifyRecord(idx, label, guess, noise.radius(p_lower), int(guess == label), n_a, self.n, 0.0)

    def settings(self) -> dict:
        return {"n0": self.n0, "n": self.n, "alpha": self.alpha, "skip_wrong_guess": self.skip_wrong_guess}

    def summarise(
        self, records: Sequence[Record], radii: tuple[float, ...], noise: Noise, rho: float = DEFAULT_RHO
    ) -> CertifiedSummary:
        certified = of_type(records, CertifyRecord)
        return CertifiedSummary.from_records(
            certified,
            radii,
            alpha=self.alpha,
            max_certifiable_radius=max_certifiable_radius(noise, self.n, self.alpha),
            grid_only=self.grid_only,
            rho=rho,
            samples=sum(self.n0 + r.n for r in certified),
            # a skipped wrong guess is written as a wrong, not an abstaining, prediction: not measured
            abstain_rate=None if self.skip_wrong_guess else abstain_rate(certified),
        )

    @classmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> CertifiedSummary:
        return CertifiedSummary.from_json(data, cls.grid_only)

    @classmethod
    def from_params(cls, params, radii: tuple[float, ...]) -> Certify:
        return cls(params.n0, params.n, params.alpha, params.skip_wrong_guess)


@dataclass(frozen=True)
class Predict(Procedure):
    """PREDICT(f, noise, x, n, alpha): g(x) is returned wrongly with probability at most alpha."""

    name: ClassVar[str] = "predict"
    record_type: ClassVar[type[Record]] = PredictRecord
    certifies: ClassVar[bool] = False
    n: int
    alpha: float

    def __post_init__(self):
        check_counts(n=self.n)
        check_alpha(self.alpha)

    def run(self, idx: int, label: int, noise: Noise) -> Run:
        counts = yield Draw(stage=0, num=self.n)  # [K]
        # classes by count; the stable sort keeps the lower class first among ties
        order = torch.sort(counts, descending=True, stable=True).indices
        n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
        top = ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > self.alpha else int(order[0])
        return PredictRecord(idx, label, top, int(top == label), 0.0)

    def settings(self) -> dict:
        return {"n": self.n, "alpha": self.alpha}

    def summarise(
        self, records: Sequence[Record], radii: tuple[float, ...], noise: Noise, rho: float = DEFAULT_RHO
    ) -> PredictionSummary:
        predicted = of_type(records, PredictRecord)
        return PredictionSummary.from_records(predicted, samples=self.n * len(predicted))

    @classmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> PredictionSummary:
        return PredictionSummary.from_json(data)

    @classmethod
    def from_params(cls, params, radii: tuple[float, ...]) -> Predict:
        return cls(params.n, params.alpha)


@dataclass(frozen=True)
class CertifyRadii(Procedure):
    """For every radius r of the grid: is P(f(x + eps) = label) >= noise.probability_for_radius(r) (> 1/2 at r = 0)?

    Draws are counted against the label (sound for labelled evaluation, no selection stage). The image
    is sampled look by look of the :class:`SequentialTest` (block multiples, up to the cap ``n``) and
    stops as soon as every radius is decided (a radius the cap cannot plausibly certify is answered NO
    early by stochastic curtailment, :meth:`SequentialTest.curtailed`); a radius still undecided at the cap
    counts as not certified. The record holds the largest certified grid radius, the samples used and the
    final bounds. Its noise is stage 2 of the image's streams: stages 0 and 1 are CERTIFY's.
    """

    name: ClassVar[str] = "certify_radii"
    record_type: ClassVar[type[Record]] = RadiiRecord
    grid_only: ClassVar[bool] = True
    stage: ClassVar[int] = 2  # its own noise stream, not CERTIFY's selection (0) or estimation (1) draws
    radii: tuple[float, ...]
    n: int
    alpha: float
    n0: int = 100  # only to report the saving against fixed-n CERTIFY (n0 + n samples per image)

    def __post_init__(self):
        check_counts(n=self.n)
        check_alpha(self.alpha)
        object.__setattr__(self, "radii", check_radii(sorted(self.radii)))

    @functools.cache  # noqa: B019 (one test per noise; procedures are few and live as long as their job)
    def test(self, noise: Noise) -> SequentialTest:
        """The sequential test of this grid for samples drawn with ``noise``."""
        return SequentialTest(self.radii, noise, self.n, self.alpha, block=NOISE_BLOCK)

    def run(self, idx: int, label: int, noise: Noise) -> Run:
        if label < 0:
            raise ValueError(
                f"image {idx}: certify_radii counts the draws that return the label, and it has none"
            )
        test = self.test(noise)
        decision, successes, drawn = test.decide(0, 0), 0, 0
        for look in test.looks():
            if decision.stop:
                break
            counts = yield Draw(stage=self.stage, num=look - drawn)  # [K]
            if label >= len(counts):
                raise ValueError(
                    f"image {idx}: label {label} is not a class of this {len(counts)}-class model"
                )
            successes, drawn = successes + int(counts[label]), look
            decision = test.decide(successes, look, decision)
        return RadiiRecord(
            idx, label, decision.certified_radius, decision.trials, decision.lower, decision.upper, 0.0
        )

    def settings(self) -> dict:
        looks = look_schedule(self.n, NOISE_BLOCK, SequentialTest.growth)
        return {
            "radii": list(self.radii),
            "n": self.n,
            "alpha": self.alpha,
            "looks": list(looks),
            "lower_levels": list(spend_alpha(self.alpha, len(looks), SequentialTest.final_share)),
            "curtailment": SequentialTest.curtailment,
            "noise_stage": self.stage,
        }

    def summarise(
        self, records: Sequence[Record], radii: tuple[float, ...], noise: Noise, rho: float = DEFAULT_RHO
    ) -> CertifiedSummary:
        """At its own grid ``self.radii`` (made from the job's ``radii``)."""
        tested = of_type(records, RadiiRecord)
        samples = sum(r.n for r in tested)
        return CertifiedSummary.from_records(
            tested,
            self.radii,
            alpha=self.alpha,
            max_certifiable_radius=self.test(noise).max_radius(),
            grid_only=self.grid_only,
            rho=rho,
            samples=samples,
            sequential=SequentialCost.of(
                samples,
                samples_at_cap=sum(r.n == self.n for r in tested),
                fixed_n_samples=(self.n0 + self.n) * len(tested),
            ),
        )

    @classmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> CertifiedSummary:
        return CertifiedSummary.from_json(data, cls.grid_only)

    @classmethod
    def from_params(cls, params, radii: tuple[float, ...]) -> CertifyRadii:
        return cls(radii, params.n, params.alpha, params.n0)


PROCEDURES: dict[str, type[Procedure]] = {p.name: p for p in (Certify, Predict, CertifyRadii)}
