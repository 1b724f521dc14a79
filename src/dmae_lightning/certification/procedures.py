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
- :class:`AttackPredict`: empirical robustness: at every radius of a grid an L2 PGD attack on the soft smoothed
  classifier (Salman et al. 2019), then PREDICT on the adversarial image with fresh noise. No certificate.
"""

from __future__ import annotations

import functools
import math
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
from dmae_lightning.certification.protocol import Attack, Draw, DrawAround, Procedure, Run
from dmae_lightning.certification.records import (
    ABSTAIN,
    AttackRecord,
    CertifyRecord,
    PredictRecord,
    RadiiRecord,
    Record,
    of_type,
)
from dmae_lightning.certification.sampler import NOISE_BLOCK
from dmae_lightning.certification.summary import (
    CertifiedSummary,
    EmpiricalSummary,
    PredictionSummary,
    SequentialCost,
)
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


def predict_from_counts(counts: torch.Tensor, alpha: float) -> int:
    """PREDICT's answer from the [K] counts of its n draws: the top class, or ABSTAIN when a two-sided binomial
    test of the two top counts cannot reject a tie at level alpha."""
    # classes by count; the stable sort keeps the lower class first among ties
    order = torch.sort(counts, descending=True, stable=True).indices
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    return ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else int(order[0])


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
        top = predict_from_counts((yield Draw(stage=0, num=self.n)), self.alpha)
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


ATTACK_STAGES = 3  # the attack's stages start here: 0 and 1 are CERTIFY's, 2 CERTIFY_RADII's
RADIUS_UNIT = 1e-6  # radii are told apart in these units (a radius's stages: attack_stages)


def attack_stages(eps: float) -> tuple[int, int]:
    """The noise stages (attack, PREDICT) of the radius ``eps``: 3 + 2k and 4 + 2k for eps = k * 1e-6, so the
    noise at one radius depends on neither the other radii of the grid nor PREDICT's or CERTIFY's stages."""
    k = round(eps / RADIUS_UNIT)
    return ATTACK_STAGES + 2 * k, ATTACK_STAGES + 2 * k + 1


@dataclass(frozen=True)
class AttackPredict(Procedure):
    """Empirical robustness of the smoothed classifier g at each radius eps of ``radii``.

    At eps > 0: an L2 PGD attack on the soft smoothed classifier (:class:`~.protocol.Attack`: ``steps`` steps
    of ``step_size * eps / steps`` maximising -log G(x')_label, ``samples`` noise draws averaged in
    probability space per step, projected onto the eps-ball and [0,1]; served by :meth:`.sampler.Sampler.attack`),
    then PREDICT (n, alpha) of g on the adversarial image x' with fresh noise from its own stage, never the
    attack's draws (:func:`attack_stages`). At eps = 0: PREDICT on the clean image. The record keeps each
    radius's prediction and whether it is the label (an abstention is not). The attack may miss adversarial
    points, so the fraction still correct is an upper bound on robust accuracy; it certifies nothing.
    Defaults: the paper's empirical attack (T = 20 steps of 2 eps / T, m = 32 draws, no random start:
    Hadisalman/smoothing-adversarial, README and ``code/attacks.py`` PGD_L2).
    """

    name: ClassVar[str] = "attack"
    record_type: ClassVar[type[Record]] = AttackRecord
    certifies: ClassVar[bool] = False  # empirical: an upper bound on robust accuracy, no certificate
    radii: tuple[float, ...]
    n: int
    alpha: float
    steps: int = 20
    step_size: float = 2.0  # in units of eps / steps (the paper's 2 eps / T)
    samples: int = 32
    random_start: bool = False

    def __post_init__(self):
        check_counts(n=self.n, steps=self.steps, samples=self.samples)
        check_alpha(self.alpha)
        object.__setattr__(self, "radii", check_radii(sorted(self.radii)))
        keys = [attack_stages(r) for r in self.radii]
        if len(set(keys)) < len(keys):
            raise ValueError(f"radii closer than {RADIUS_UNIT:g} share their noise: {list(self.radii)}")
        size = self.step_size
        if (
            isinstance(size, bool)
            or not isinstance(size, int | float)
            or not (math.isfinite(size) and size > 0)
        ):
            raise ValueError(f"step_size must be a number > 0, got {self.step_size!r}")
        if not isinstance(self.random_start, bool):
            raise ValueError(f"random_start must be true or false, got {self.random_start!r}")

    def run(self, idx: int, label: int, noise: Noise) -> Run:
        if label < 0:
            raise ValueError(f"image {idx}: the attack moves the image away from its label, and it has none")
        predictions = []
        for eps in self.radii:
            attack_stage, predict_stage = attack_stages(eps)
            if eps == 0:
                counts = yield Draw(stage=predict_stage, num=self.n)
            else:
                adversarial = yield Attack(
                    attack_stage, label, eps, self.steps, self.step_size, self.samples, self.random_start
                )
                counts = yield DrawAround(stage=predict_stage, num=self.n, image=adversarial)
            predictions.append(predict_from_counts(counts, self.alpha))
        correct = tuple(int(p == label) for p in predictions)
        return AttackRecord(idx, label, self.radii, tuple(predictions), correct, 0.0)

    def settings(self) -> dict:
        return {
            "radii": list(self.radii),
            "n": self.n,
            "alpha": self.alpha,
            "attack": {
                "steps": self.steps,
                "step_size": self.step_size,
                "samples": self.samples,
                "random_start": self.random_start,
                "precision": "32-true",
            },
        }

    def summarise(
        self, records: Sequence[Record], radii: tuple[float, ...], noise: Noise, rho: float = DEFAULT_RHO
    ) -> EmpiricalSummary:
        """At its own grid ``self.radii`` (made from the job's ``radii``)."""
        attacked = of_type(records, AttackRecord)
        attacks = sum(eps > 0 for eps in self.radii)
        return EmpiricalSummary.from_records(
            attacked,
            self.radii,
            samples=self.n * len(self.radii) * len(attacked),
            attack_samples=self.steps * self.samples * attacks * len(attacked),
        )

    @classmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> EmpiricalSummary:
        return EmpiricalSummary.from_json(data)

    @classmethod
    def from_params(cls, params, radii: tuple[float, ...]) -> AttackPredict:
        attack = params.attack
        return cls(
            radii, params.n, params.alpha, attack.steps, attack.step_size, attack.samples, attack.random_start
        )


PROCEDURES: dict[str, type[Procedure]] = {p.name: p for p in (Certify, Predict, CertifyRadii, AttackPredict)}
