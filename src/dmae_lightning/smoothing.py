"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): Monte Carlo CERTIFY and PREDICT.

The smoothed classifier is g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I), with the noise
added to [0,1] pixels at the image's native resolution (no clamping), so a certified radius is an
L2 radius in that pixel space whatever size the base classifier resizes to internally.
Noise comes from the caller's torch.Generator so that a result depends only on its seed (the
certification job seeds one per image), not on the number of devices or the batch order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from dmae_lightning.results import ABSTAIN

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PIXEL_TOLERANCE = 1e-4  # images may leave [0,1] by this much through rounding in the data pipeline


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a successes in n trials.

    It is the p with P[Bin(n, p) >= n_a] = alpha, i.e. the alpha quantile of Beta(n_a, n - n_a + 1);
    with n_a = 0 every p satisfies P >= alpha, so the bound is 0.
    """
    if not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n, got n_a={n_a}, n={n}")
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """L2 radius sigma * Phi^-1(p_lower) within which g's top class cannot change (negative below 1/2)."""
    return float(sigma * norm.ppf(p_lower))


@dataclass(frozen=True)
class CertifyRecord:
    """Outcome of CERTIFY for one image, with the counts behind it."""

    prediction: int  # guessed class cA, or ABSTAIN when p_lower < 1/2
    radius: float  # certified L2 radius; 0.0 when abstaining or skipped
    guess: int  # cA, the most frequent class among the n0 selection draws
    n_a: int  # estimation draws that returned cA
    n: int  # estimation draws made: the requested n, or 0 when skipped after a wrong guess
    p_lower: float  # Clopper-Pearson lower bound on P(f(x + eps) = cA); 0.0 when skipped


class Smooth:
    """Smoothed classifier around ``base_classifier``: [B,C,H,W] images in [0,1] -> logits [B,num_classes].

    The base classifier should be in eval mode (dropout or drop path would change f between draws).
    ``precision`` "bf16" / "fp16" runs its forward pass under torch.autocast; the noise keeps x's dtype.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, precision: str = "fp32"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(sigma, Real) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.precision = precision

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """CERTIFY: (cA, radius), or (ABSTAIN, 0.0) when cA's probability cannot be bounded above 1/2."""
        record = self.certify_record(x, n0, n, alpha, batch_size, generator)
        return record.prediction, record.radius

    def certify_record(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
        label: int | None = None,
        skip_wrong_guess: bool = False,
    ) -> CertifyRecord:
        """CERTIFY with its counts: n0 draws select cA, n further independent draws estimate its probability.

        With ``skip_wrong_guess`` and a ``label``, a guess cA != label skips the n estimation draws (the
        expensive part) and records cA with radius 0.0 and n = 0: such an image could only be certified
        wrong or abstain, so certified accuracy at every radius is unchanged.
        """
        self._check_inputs(x, alpha, batch_size, generator, n0=n0, n=n)
        if skip_wrong_guess and label is None:
            raise ValueError("skip_wrong_guess needs the image's label")
        selection = self._sample_counts(x, n0, batch_size, generator)  # [K]
        guess = int(selection.argmax())  # first class among ties
        if skip_wrong_guess and guess != label:
            return CertifyRecord(prediction=guess, radius=0.0, guess=guess, n_a=0, n=0, p_lower=0.0)
        n_a = int(self._sample_counts(x, n, batch_size, generator)[guess])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        if p_lower < 0.5:
            return CertifyRecord(prediction=ABSTAIN, radius=0.0, guess=guess, n_a=n_a, n=n, p_lower=p_lower)
        radius = certified_radius(p_lower, self.sigma)
        return CertifyRecord(prediction=guess, radius=radius, guess=guess, n_a=n_a, n=n, p_lower=p_lower)

    def predict(
        self, x: torch.Tensor, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None
    ) -> int:
        """PREDICT: the top class, or ABSTAIN when a two-sided binomial test cannot separate the top two
        counts at level alpha (so g(x) is returned wrongly with probability at most alpha)."""
        self._check_inputs(x, alpha, batch_size, generator, n=n)
        counts = self._sample_counts(x, n, batch_size, generator)  # [K]
        # [K] classes by count; the stable sort keeps the lower class first among ties
        order = torch.sort(counts, descending=True, stable=True).indices
        n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])

    def _check_inputs(
        self, x: torch.Tensor, alpha: float, batch_size: int, generator: torch.Generator | None, **counts: int
    ) -> None:
        """Reject bad arguments with one clear line before any (possibly hour-long) sampling starts."""
        for name, value in {**counts, "batch_size": batch_size}.items():
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(alpha, Real) or not 0 < alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be one [C,H,W] image tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point image in [0,1], got dtype {x.dtype}")
        low, high = (float(v) for v in x.aminmax())
        if not (low >= -PIXEL_TOLERANCE and high <= 1 + PIXEL_TOLERANCE):  # also rejects NaN
            raise ValueError(f"x must hold [0,1] pixels, got values in [{low}, {high}]")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(
                f"generator is on {generator.device}, x on {x.device}: they must share the device"
            )

    def _sample_counts(
        self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Class counts of f over ``num`` noisy copies of x, as a [num_classes] int64 CPU tensor."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)  # [K]
        dtype = AUTOCAST_DTYPES[self.precision]
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode():
            for start in range(0, num, batch_size):
                b = min(batch_size, num - start)  # the last batch holds the remainder
                shape = (b, *x.shape)  # [b,C,H,W]
                noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
                batch = noise.mul_(self.sigma).add_(x.unsqueeze(0).expand(shape))  # x + sigma * eps, in place
                with autocast:
                    logits = self.base_classifier(batch)  # [b,K]
                if logits.shape != (b, self.num_classes):
                    raise ValueError(
                        f"base classifier returned logits of shape {tuple(logits.shape)}, "
                        f"expected {(b, self.num_classes)}"
                    )
                counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)  # [K]
        return counts.cpu()
