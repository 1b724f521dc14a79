"""The smoothing noise: one object that draws the noise and owns the certified-radius formula that goes with it.

A job instantiates its ``noise`` config group once (``_target_`` one of the classes here) and hands that
object to everything that perturbs images or turns probabilities into radii: the DMAE model's input
corruption, noisy fine-tuning, the smoothed classifier and its sampler, the sequential test and every
certification procedure. A radius computed with one noise from samples drawn with another is therefore
impossible: no other module holds a noise level or a radius formula.

A distribution is a subclass of :class:`Noise` (a frozen dataclass of plain numbers) with

- ``perturb(x, generator)``: x + eps for a batch (training, validation);
- ``noisy_copies(image, generator, out)``: ``len(out)`` noisy copies of one image (certification, one
  seeded block at a time);
- ``radius(p_lower)`` and its inverse ``probability_for_radius(radius)``: the certificate;
- ``check_input(image)``: refuses images the certificate does not cover (one line).

Adding a distribution is one class here plus one ``conf/noise/*.yaml`` naming it (docs/DESIGN.md).
Checkpoints store :meth:`Noise.config` (plain data, loadable with ``weights_only=True``);
:func:`noise_from_config` rebuilds only classes defined here, never an arbitrary ``_target_``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar

import mpmath
import torch
from scipy.stats import norm

_REGISTRY: dict[str, type[Noise]] = {}  # "_target_" path -> class, filled by subclassing


class Noise(ABC):
    """Interface of a smoothing distribution (see the module docstring). Subclasses are frozen dataclasses."""

    sigma: (
        float  # the scale every distribution here is parametrised by (run names, the paper's eta per sigma)
    )
    tag_prefix: ClassVar[str]  # run names: <tag_prefix>sigma<sigma>
    # Set by @dataclass on every concrete subclass (config() and noise_from_config() read the fields);
    # declared here so that the type checker knows a Noise is a dataclass instance.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.target()] = cls

    @abstractmethod
    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x + eps: a new tensor of x's shape, device and dtype ([..., C, H, W] of [0,1] pixels)."""

    @abstractmethod
    def noisy_copies(
        self, image: torch.Tensor, generator: torch.Generator, out: torch.Tensor
    ) -> torch.Tensor:
        """``out`` ([k, C, H, W], contiguous) filled with k noisy copies of ``image`` ([C, H, W])."""

    @abstractmethod
    def radius(self, p_lower: float) -> float:
        """Certified L2 radius for a lower bound p_lower on P(f(x + eps) = c_A); negative below 1/2."""

    @abstractmethod
    def probability_for_radius(self, radius: float) -> float:
        """The probability p_A must exceed to certify ``radius`` (the inverse of :meth:`radius`)."""

    def check_input(self, image: torch.Tensor) -> None:
        """Raise ValueError (one line) for an image the certificate does not hold at; any [0,1] image here."""
        return None

    @classmethod
    def target(cls) -> str:
        """The ``_target_`` that names this class in configs and checkpoints."""
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def tag(self) -> str:
        """The noise in run directory names, e.g. ``sigma0.25``."""
        return f"{self.tag_prefix}sigma{self.sigma}"

    def config(self) -> dict:
        """Plain data that :func:`noise_from_config` (and Hydra's instantiate) turn back into this noise."""
        return {"_target_": self.target(), **dataclasses.asdict(self)}


def _check_sigma(sigma) -> None:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, Real)
        or not (math.isfinite(sigma) and float(sigma) > 0)
    ):
        raise ValueError(f"noise.sigma must be a finite number > 0, got {sigma!r}")


@dataclass(frozen=True)
class GaussianNoise(Noise):
    """eps ~ N(0, sigma^2 I) in float32; certificate of Cohen, Rosenfeld & Kolter (ICML 2019): R = sigma * Phi^-1(p_A).

    The certificate is for exact real-valued Gaussian noise; x + eps rounded to float32 is not exactly
    that (Voracek & Hein, ICLR 2023); :class:`DiscreteGaussianNoise` closes that gap.
    """

    sigma: float
    tag_prefix: ClassVar[str] = ""

    def __post_init__(self):
        _check_sigma(self.sigma)

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return eps.mul_(self.sigma).add_(x)

    def noisy_copies(
        self, image: torch.Tensor, generator: torch.Generator, out: torch.Tensor
    ) -> torch.Tensor:
        return torch.randn(out.shape, generator=generator, out=out).mul_(self.sigma).add_(image)

    def radius(self, p_lower: float) -> float:
        return float(self.sigma * norm.ppf(p_lower))

    def probability_for_radius(self, radius: float) -> float:
        """Phi(radius / sigma) (1/2 at radius 0)."""
        return float(norm.cdf(radius / self.sigma))


DEFAULT_NOISE = GaussianNoise(0.25)  # the paper's main setting, for models built without a job


D_MAX = 2**24  # the most coordinates (C*H*W) an image may have under DiscreteGaussianNoise's certificate
_SCALE = 2**62  # DiscreteGaussianNoise draws uniform integers in [0, _SCALE)


@functools.lru_cache
def _discrete_gaussian_table(sigma: float) -> tuple[tuple[int, ...], int, float]:
    """(thresholds, low, tv) of the 1/255-grid Gaussian, computed once per sigma with mpmath at 60 digits.

    The noise level i (eps = i/255) has P(i) = Phi((2i+1)/(510 sigma)) - Phi((2i-1)/(510 sigma)). Levels
    below ``low`` = -255(k+1) are merged into ``low`` and levels above -low into -low (k as in
    :class:`DiscreteGaussianNoise`): the clip to [-255k, 255(k+1)] maps them to the same noisy level for
    every image level in [0, 255]. ``thresholds[j]`` = round(2^62 F(low + j)), F the exact CDF, so a uniform
    integer U in [0, 2^62) gives the level low + #{j: thresholds[j] <= U}. ``tv`` bounds the total variation
    between that sampled pmf and the exact one from above (computed from the integers, rounded up).
    """
    k = max(1, math.floor(6 * sigma))
    low = -255 * (k + 1)
    with mpmath.workdps(60):
        scale = mpmath.mpf(510) * mpmath.mpf(sigma)  # sigma's exact binary value
        cdf = [mpmath.ncdf((2 * i + 1) / scale) for i in range(low, -low)]  # F(low) .. F(-low - 1)
        thresholds = tuple(int(mpmath.nint(c * _SCALE)) for c in cdf)
        exact = [b - a for a, b in zip([mpmath.mpf(0), *cdf], [*cdf, mpmath.mpf(1)])]  # P(low) .. P(-low)
        sampled = [b - a for a, b in zip((0, *thresholds), (*thresholds, _SCALE))]
        tv = sum(abs(mpmath.mpf(q) / _SCALE - p) for q, p in zip(sampled, exact)) / 2
        tv_upper = math.nextafter(float(tv), math.inf)  # float() rounds to nearest: one step up
    return thresholds, low, tv_upper


def _check_size(image: torch.Tensor) -> None:
    if image.numel() > D_MAX:
        raise ValueError(
            f"an image of {image.numel()} coordinates, more than the {D_MAX} the discrete noise's "
            "certificate allows"
        )


@functools.lru_cache
def _thresholds_on(sigma: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(_discrete_gaussian_table(sigma)[0], dtype=torch.int64, device=device)  # [levels - 1]


@dataclass(frozen=True)
class DiscreteGaussianNoise(Noise):
    """The Gaussian rounded to the 8-bit grid: eps = i/255, with a certificate that survives floating point.

    Voracek & Hein (ICLR 2023, "Sound randomized smoothing in floating-point arithmetics"): x + eps computed
    in float is not exactly Gaussian-smoothed, and false certificates exist. Here the images are on the 1/255
    grid (8-bit pixels; :meth:`check_input` refuses others) and the noise is the N(0, sigma^2) sample rounded
    to the grid, P(i) = Phi((2i+1)/(510 sigma)) - Phi((2i-1)/(510 sigma)). For x on the grid,
    x + round_grid(eps) = round_grid(x + eps), so the noisy copies have exactly the law of
    h(x + eps), eps ~ N(0, sigma^2 I) continuous, for the base classifier h = f o (levels/255) o clip o round.
    Cohen et al.'s certificate R = sigma Phi^-1(p_A) therefore holds for h smoothed with the continuous
    Gaussian, at every x' within R, in particular at every on-grid x', where that smoothed classifier is the
    one sampled here.

    Everything is integer until the end: image levels round(255 x), noise levels drawn by comparing uniform
    int64 (``torch.randint`` from the given generator) with integer CDF thresholds at scale 2^62, their sum
    clipped to [-255k, 255(k+1)] levels ([-k, 1+k] in [0,1] units, k = max(1, floor(6 sigma))), then
    levels / 255 in float32 once. The clip is a deterministic function of the rounded x + eps, part of h:
    it changes nothing in the certificate (it only keeps values finite and in a known range).

    Threshold rounding: the sampled per-coordinate pmf q is within total variation t (``tv``, computed
    exactly from the thresholds) of the exact p, so for an image of d <= D_MAX coordinates
    P_p(f = c) >= P_q(f = c) - D_MAX t. We deduct that from p (``deduction``, about 1e-8 or less) inside the
    radius formula: radius(p) = sigma Phi^-1(p - D_MAX t) and probability_for_radius(r) = Phi(r/sigma) +
    D_MAX t; an alpha-level lower bound on the sampled probability minus D_MAX t is an alpha-level lower
    bound on the exact one, which is equivalent to or stronger than spending it inside alpha.
    :meth:`check_input` refuses images of more than D_MAX coordinates.
    """

    sigma: float
    tag_prefix: ClassVar[str] = "discrete_"

    def __post_init__(self):
        _check_sigma(self.sigma)

    @property
    def clip(self) -> tuple[int, int]:
        """The noisy image's range in levels (1/255 steps): [-255k, 255(k+1)]."""
        k = max(1, math.floor(6 * self.sigma))
        return -255 * k, 255 * (k + 1)

    @property
    def tv(self) -> float:
        """Upper bound on the total variation between the sampled and the exact per-coordinate pmf."""
        return _discrete_gaussian_table(self.sigma)[2]

    @property
    def deduction(self) -> float:
        """D_MAX * tv, rounded up: what the radius formula deducts from p_A."""
        return math.nextafter(D_MAX * self.tv, math.inf)

    def _noisy_levels(self, levels: torch.Tensor, shape: torch.Size, generator: torch.Generator | None):
        """round(255 x) + i, clipped, as int32 of ``shape`` (levels broadcast to it)."""
        device = levels.device if generator is None else generator.device
        low = _discrete_gaussian_table(self.sigma)[1]
        uniform = torch.randint(0, _SCALE, shape, generator=generator, device=device, dtype=torch.int64)
        noisy = torch.searchsorted(_thresholds_on(self.sigma, device), uniform, right=True, out_int32=True)
        return noisy.add_(levels + low).clamp_(*self.clip)

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x quantised to the grid (training images need not be on it), plus the discrete noise."""
        levels = torch.round(x * 255).to(torch.int32)
        return self._noisy_levels(levels, x.shape, generator).to(x.dtype).div_(255)

    def noisy_copies(
        self, image: torch.Tensor, generator: torch.Generator, out: torch.Tensor
    ) -> torch.Tensor:
        _check_size(image)
        levels = torch.round(image * 255).to(torch.int32)  # [C,H,W]
        return out.copy_(self._noisy_levels(levels, out.shape, generator)).div_(255)

    def check_input(self, image: torch.Tensor) -> None:
        _check_size(image)
        scaled = image.detach().double() * 255
        off = float((scaled - scaled.round()).abs().max()) if image.numel() else 0.0
        if not off <= 1e-4:
            raise ValueError(
                f"discrete noise needs 8-bit images (pixels k/255, e.g. CIFAR-10/ImageNet, not the "
                f"bundled digits): this one is {off / 255:.3g} off the 1/255 grid"
            )

    def radius(self, p_lower: float) -> float:
        """sigma Phi^-1(p_lower - deduction); negative below 1/2 + deduction, -inf up to the deduction."""
        return float(self.sigma * norm.ppf(max(p_lower - self.deduction, 0.0)))

    def probability_for_radius(self, radius: float) -> float:
        """Phi(radius / sigma) + deduction."""
        return float(norm.cdf(radius / self.sigma)) + self.deduction


def noise_from_config(config: Noise | Mapping) -> Noise:
    """A noise from itself or from :meth:`Noise.config` data (a checkpoint's ``noise`` hyper-parameter, a
    composed ``noise`` node); ValueError (one line) for anything else."""
    if isinstance(config, Noise):
        return config
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ValueError(f"a noise needs a _target_ naming its class, got {config!r}")
    target = str(config["_target_"])
    if target not in _REGISTRY:
        raise ValueError(f"unknown noise {target!r}: one of {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[target]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {key: value for key, value in config.items() if key != "_target_"}
    if set(kwargs) - fields:
        raise ValueError(f"{target} takes {', '.join(sorted(fields))}, got {', '.join(sorted(kwargs))}")
    return cls(**kwargs)
