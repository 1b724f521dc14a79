"""The one home of the range rules shared by the procedures, the smoothed classifier, the certification job and
the training-time callback: sample counts, alpha, precision. Each raises ValueError in one line.
Imports: nothing of this package (no torch)."""

from __future__ import annotations

from numbers import Integral, Real

MAX_COUNT = (
    10**12
)  # noisy samples: a decade of a GPU's draws per image; beyond it float64 bounds lose their meaning
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")  # autocast choices of the sampler (auto: bf16 on CUDA)


def check_counts(**counts: int) -> None:
    """Each count an integer in [1, MAX_COUNT] (a bool is not a count)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be an integer in [1, 10^12], got {value!r}")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """A probability strictly between 0 and 1 (alpha, rho)."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 < alpha < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {alpha!r}")


def check_precision(precision: str) -> None:
    if precision not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {'|'.join(PRECISION_NAMES)}, got {precision!r}")
