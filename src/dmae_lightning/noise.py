"""The smoothing noise: one home for drawing it and for the certified-radius formula that goes with it.

Pre-training (the DMAE input corruption), noisy fine-tuning and certification all draw their noise
here, in [0,1] pixel space at the image's native resolution (no clamping). A noise distribution is a
class with ``sample`` (the perturbation for a shape, from a caller's generator), ``radius`` (the
certified L2 radius for a lower bound on the top class's probability) and ``probability_for_radius``
(its inverse: the probability a radius needs). Another distribution (Laplace for L1, say) is one new
class beside :class:`GaussianNoise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from scipy.stats import norm


@dataclass(frozen=True)
class GaussianNoise:
    """eps ~ N(0, sigma^2 I); certificate of Cohen, Rosenfeld & Kolter (ICML 2019): R = sigma * Phi^-1(p_A)."""

    sigma: float

    def __post_init__(self):
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, Real) or not (
            math.isfinite(self.sigma) and self.sigma >= 0
        ):  # sigma = 0 is a clean input (plain MAE pre-training); certification asks for sigma > 0
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sigma * eps of ``shape``; with ``out``, drawn into that (contiguous) tensor in place."""
        if out is not None:
            return torch.randn(out.shape, generator=generator, out=out).mul_(self.sigma)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(self.sigma)

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x + sigma * eps, a new tensor of x's shape, device and dtype."""
        return x + self.sample(x.shape, generator, device=x.device, dtype=x.dtype)

    def radius(self, p_lower: float) -> float:
        """Certified L2 radius for a lower bound p_lower on P(f(x + eps) = c_A); negative below 1/2."""
        return float(self.sigma * norm.ppf(p_lower))

    def probability_for_radius(self, radius: float) -> float:
        """The probability p_A must exceed to certify ``radius``: Phi(radius / sigma) (1/2 at radius 0)."""
        return float(norm.cdf(radius / self.sigma))
