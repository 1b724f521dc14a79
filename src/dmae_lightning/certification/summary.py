"""What a certification run reports, as typed objects: each kind of procedure's result and the run's summary.json.

A procedure (:mod:`.procedures`) summarises its records into its kind of result: :class:`PredictionSummary`
(PREDICT: accuracy and abstain rate), :class:`CertifiedSummary` (CERTIFY, CERTIFY_RADII: certified accuracy per
radius, its data-set-level lower bound, ACR, ...), the latter built in one place,
:meth:`CertifiedSummary.from_records`, or :class:`EmpiricalSummary` (ATTACK: empirical robust accuracy per radius). A whole run's summary.json (procedure, settings, result) is
:mod:`.runs`'s. The numbers come from :mod:`.metrics`; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, ClassVar

from dmae_lightning.certification.metrics import (
    DEFAULT_RHO,
    abstain_rate,
    accuracy,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_lower_bound,
    false_certificates_allowed,
    radius_key,
    within_reach,
)
from dmae_lightning.certification.records import AttackRecord, PredictRecord, Record

LOWER_BOUND = "certified_accuracy_lower_bound"


def _as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def number(data: Mapping[str, Any], key: str) -> float:
    """``data[key]`` as a number; ValueError naming the key otherwise."""
    return _as_number(data.get(key), key)


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else number(data, key)


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    value = _optional_number(data, key)
    return None if value is None else int(value)


def _radius_table(data: Mapping[str, Any], key: str) -> dict[str, float | None]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise ValueError(f"{key} is not a table of radii")
    return {str(r): None if value is None else _as_number(value, f"{key}[{r}]") for r, value in table.items()}


@dataclass(frozen=True)
class PredictionSummary:
    """PREDICT's result: how often the smoothed classifier returns the label, and how often it abstains."""

    num_images: int
    accuracy: float
    abstain_rate: float
    samples: int | None = None  # noisy samples drawn (None: a summary.json that does not say)

    JSON_KEYS: ClassVar[tuple[str, ...]] = ("num_images", "accuracy", "abstain_rate", "samples")

    @classmethod
    def from_records(cls, records: list[PredictRecord], samples: int) -> PredictionSummary:
        return cls(len(records), accuracy(records), abstain_rate(records), samples)

    def metrics(self, procedure: str) -> dict[str, float | None]:
        """The result as logger metrics, under the procedure's name (``predict/accuracy``, ...)."""
        return {f"{procedure}/accuracy": self.accuracy, f"{procedure}/abstain_rate": self.abstain_rate}

    def to_json(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "accuracy": self.accuracy,
            "abstain_rate": self.abstain_rate,
            "samples": self.samples,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictionSummary:
        return cls(
            int(number(data, "num_images")),
            number(data, "accuracy"),
            number(data, "abstain_rate"),
            _optional_int(data, "samples"),
        )


@dataclass(frozen=True)
class SequentialCost:
    """The samples a sequential procedure used against fixed-n CERTIFY's n0 + n per image."""

    samples_at_cap: int  # images that drew the whole cap n
    fixed_n_samples: int  # what fixed-n CERTIFY would draw for the same images
    saving_vs_fixed_n: float | None  # fixed_n_samples / the samples used (None when none was drawn)

    @classmethod
    def of(cls, samples: int, samples_at_cap: int, fixed_n_samples: int) -> SequentialCost:
        return cls(samples_at_cap, fixed_n_samples, fixed_n_samples / samples if samples else None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SequentialCost | None:
        """The cost a summary.json states (None when it states none)."""
        if data.get("fixed_n_samples") is None:
            return None
        return cls(
            int(number(data, "samples_at_cap")),
            int(number(data, "fixed_n_samples")),
            _optional_number(data, "saving_vs_fixed_n"),
        )


@dataclass(frozen=True, kw_only=True)
class CertifiedSummary:
    """The certified accuracy of a run at its radii (CERTIFY, CERTIFY_RADII).

    Radius tables are keyed by :func:`~.metrics.radius_key`; a None value is a radius beyond
    ``max_certifiable_radius``, where a 0 would only say that n was too small. ``grid_only`` (the procedure's
    :attr:`~.protocol.Procedure.grid_only`): the records answer only at the grid ``radii`` (sequential
    certification, its n a cap per image), so they are drawn as points and give no ACR comparable with CERTIFY's,
    and there is no abstention to count. Fields a summary.json may not state (older files) are None.
    """

    radii: tuple[float, ...]  # the tables' radii; () when a summary.json does not say
    num_images: int
    certified_accuracy: Mapping[str, float | None]
    certified_accuracy_lower_bound: Mapping[str, float | None] | None  # at level 1 - rho, data-set-level
    average_certified_radius: float | None  # None when grid_only
    max_certifiable_radius: float
    rho: float
    false_certificates_allowed: int | None  # k* of the lower bound (metrics.false_certificates_allowed)
    grid_only: bool
    samples: int | None = None  # noisy samples drawn
    abstain_rate: float | None = None  # None: not measured (skip_wrong_guess), or grid_only
    sequential: SequentialCost | None = None

    JSON_KEYS: ClassVar[tuple[str, ...]] = (
        "radii",
        "num_images",
        "certified_accuracy",
        "abstain_rate",
        "max_certifiable_radius",
        "samples",
        "samples_at_cap",
        "fixed_n_samples",
        "saving_vs_fixed_n",
        "average_certified_radius",
        "rho",
        "false_certificates_allowed",
        "certified_accuracy_lower_bound",
    )

    @classmethod
    def from_records(
        cls,
        records: Iterable[Record],
        radii: Iterable[float],
        *,
        alpha: float,
        max_certifiable_radius: float,
        grid_only: bool,
        rho: float = DEFAULT_RHO,
        samples: int | None = None,
        abstain_rate: float | None = None,
        sequential: SequentialCost | None = None,
    ) -> CertifiedSummary:
        """The one place a run's certified numbers are put together from its records: certified accuracy and
        its lower bound at level 1 - rho (certificates false with probability alpha each), both None beyond
        ``max_certifiable_radius``; the ACR unless ``grid_only``."""
        records, radii = list(records), tuple(float(r) for r in radii)
        limit = max_certifiable_radius
        return cls(
            radii=radii,
            num_images=len(records),
            certified_accuracy=within_reach(certified_accuracy(records, radii), limit),
            certified_accuracy_lower_bound=within_reach(
                certified_accuracy_lower_bound(records, radii, alpha, rho), limit
            ),
            average_certified_radius=None if grid_only else average_certified_radius(records),
            max_certifiable_radius=limit,
            rho=rho,
            false_certificates_allowed=false_certificates_allowed(len(records), alpha, rho),
            grid_only=grid_only,
            samples=samples,
            abstain_rate=abstain_rate,
            sequential=sequential,
        )

    def at(
        self, records: Iterable[Record], radii: Iterable[float], alpha: float, rho: float
    ) -> CertifiedSummary:
        """This run's summary with its tables at other radii (the columns of an analysis), from its records."""
        return CertifiedSummary.from_records(
            records,
            radii,
            alpha=alpha,
            max_certifiable_radius=self.max_certifiable_radius,
            grid_only=self.grid_only,
            rho=rho,
            samples=self.samples,
            abstain_rate=self.abstain_rate,
            sequential=self.sequential,
        )

    @property
    def grid(self) -> tuple[float, ...] | None:
        """The radii the records answer at when they answer only there (grid_only), else None."""
        return self.radii if self.grid_only else None

    def metrics(self, procedure: str) -> dict[str, float | None]:
        """The result as logger metrics under ``cert/``, whatever the procedure (the training callback's names):
        ``cert/acc@<r>`` (None beyond the reach), ``cert/acr`` and ``cert/abstain_rate`` where there is one."""
        metrics = {f"cert/acc@{key}": value for key, value in self.certified_accuracy.items()}
        if self.average_certified_radius is not None:
            metrics["cert/acr"] = self.average_certified_radius
        if self.abstain_rate is not None:
            metrics["cert/abstain_rate"] = self.abstain_rate
        return metrics

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "radii": list(self.radii),
            "num_images": self.num_images,
            "certified_accuracy": dict(self.certified_accuracy),
        }
        if not self.grid_only:  # a grid-only procedure never abstains: it certifies each radius or not
            data["abstain_rate"] = self.abstain_rate
        data.update(max_certifiable_radius=self.max_certifiable_radius, samples=self.samples)
        if self.sequential is not None:
            data.update(asdict(self.sequential))
        bound = self.certified_accuracy_lower_bound
        data.update(
            average_certified_radius=self.average_certified_radius,
            rho=self.rho,
            false_certificates_allowed=self.false_certificates_allowed,
            certified_accuracy_lower_bound=None if bound is None else dict(bound),
        )
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], grid_only: bool) -> CertifiedSummary:
        radii = data.get("radii") or ()
        if not isinstance(radii, list | tuple):
            raise ValueError(f"radii must be a list of numbers, got {radii!r}")
        limit = _optional_number(data, "max_certifiable_radius")
        bound = _radius_table(data, LOWER_BOUND) if data.get(LOWER_BOUND) is not None else None
        return cls(
            radii=tuple(_as_number(r, "a radius") for r in radii),
            num_images=int(number(data, "num_images")),
            certified_accuracy=_radius_table(data, "certified_accuracy"),
            certified_accuracy_lower_bound=bound,
            average_certified_radius=_optional_number(data, "average_certified_radius"),
            max_certifiable_radius=math.inf if limit is None else limit,
            rho=DEFAULT_RHO if data.get("rho") is None else number(data, "rho"),
            false_certificates_allowed=_optional_int(data, "false_certificates_allowed"),
            grid_only=grid_only,
            samples=_optional_int(data, "samples"),
            abstain_rate=None if grid_only else _optional_number(data, "abstain_rate"),
            sequential=SequentialCost.from_json(data),
        )


@dataclass(frozen=True)
class EmpiricalSummary:
    """The attack's result: the fraction of images the smoothed classifier still classifies correctly (PREDICT,
    an abstention counting as wrong) after an L2 attack of each radius. An upper bound on the true robust
    accuracy (the attack may miss an adversarial point), where certified accuracy is a lower bound: it
    certifies nothing."""

    radii: tuple[float, ...]
    num_images: int
    empirical_robust_accuracy: Mapping[str, float]  # keyed by radius_key
    samples: int | None = None  # PREDICT's noisy samples (n per image and radius)
    attack_samples: int | None = None  # the attack's noisy forward-backward passes (steps * m per radius > 0)

    JSON_KEYS: ClassVar[tuple[str, ...]] = (
        "radii",
        "num_images",
        "empirical_robust_accuracy",
        "samples",
        "attack_samples",
    )

    @classmethod
    def from_records(
        cls, records: list[AttackRecord], radii: Iterable[float], samples: int, attack_samples: int
    ) -> EmpiricalSummary:
        """At ``radii``, each of which every record must have attacked."""
        if not records:
            raise ValueError("no attack records")
        radii = tuple(float(r) for r in radii)
        robust = dict.fromkeys(radii, 0)
        for record in records:
            column = dict(zip(record.radii, record.correct))
            missing = [r for r in radii if r not in column]
            if missing:
                raise ValueError(f"image {record.idx} was not attacked at radius {missing[0]:g}")
            for r in radii:
                robust[r] += column[r]
        table = {radius_key(r): count / len(records) for r, count in robust.items()}
        return cls(radii, len(records), table, samples, attack_samples)

    def metrics(self, procedure: str) -> dict[str, float | None]:
        """The result as logger metrics, under the procedure's name (``attack/acc@<r>``)."""
        return {f"{procedure}/acc@{key}": value for key, value in self.empirical_robust_accuracy.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "radii": list(self.radii),
            "num_images": self.num_images,
            "empirical_robust_accuracy": dict(self.empirical_robust_accuracy),
            "samples": self.samples,
            "attack_samples": self.attack_samples,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmpiricalSummary:
        radii = data.get("radii")
        if not isinstance(radii, list | tuple):
            raise ValueError(f"radii must be a list of numbers, got {radii!r}")
        table = _radius_table(data, "empirical_robust_accuracy")
        if any(value is None for value in table.values()):
            raise ValueError("empirical_robust_accuracy must hold a number at every radius")
        return cls(
            tuple(_as_number(r, "a radius") for r in radii),
            int(number(data, "num_images")),
            {key: float(value) for key, value in table.items() if value is not None},
            _optional_int(data, "samples"),
            _optional_int(data, "attack_samples"),
        )


Result = PredictionSummary | CertifiedSummary | EmpiricalSummary  # a procedure's kind of result
