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
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import torch
from scipy.stats import norm

_REGISTRY: dict[str, type[Noise]] = {}  # "_target_" path -> class, filled by subclassing


class Noise(ABC):
    """Interface of a smoothing distribution (see the module docstring). Subclasses are frozen dataclasses."""

    sigma: float  # the scale every distribution here is parametrised by (run names, the paper's eta per sigma)
    tag_prefix: ClassVar[str]  # run names: <tag_prefix>sigma<sigma>

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = cls

    @abstractmethod
    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x + eps: a new tensor of x's shape, device and dtype ([..., C, H, W] of [0,1] pixels)."""

    @abstractmethod
    def noisy_copies(self, image: torch.Tensor, generator: torch.Generator, out: torch.Tensor) -> torch.Tensor:
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

    @property
    def tag(self) -> str:
        """The noise in run directory names, e.g. ``sigma0.25``."""
        return f"{self.tag_prefix}sigma{self.sigma}"

    def config(self) -> dict:
        """Plain data that :func:`noise_from_config` (and Hydra's instantiate) turn back into this noise."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **dataclasses.asdict(self)}


def _check_sigma(sigma) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not (math.isfinite(sigma) and sigma > 0):
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

    def noisy_copies(self, image: torch.Tensor, generator: torch.Generator, out: torch.Tensor) -> torch.Tensor:
        return torch.randn(out.shape, generator=generator, out=out).mul_(self.sigma).add_(image)

    def radius(self, p_lower: float) -> float:
        return float(self.sigma * norm.ppf(p_lower))

    def probability_for_radius(self, radius: float) -> float:
        """Phi(radius / sigma) (1/2 at radius 0)."""
        return float(norm.cdf(radius / self.sigma))


DEFAULT_NOISE = GaussianNoise(0.25)  # the paper's main setting, for models built without a job


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
