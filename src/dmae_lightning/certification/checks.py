"""The one home of the rules shared by the procedures, the smoothed classifier, the certification job and the
training-time callback: the ranges of sample counts, alpha and precision, and which N images are "N evenly
spaced images". Each raises ValueError in one line.
Imports: nothing of this package (no torch)."""

from __future__ import annotations

from numbers import Integral, Real

MAX_COUNT = (
    10**12
)  # noisy samples: a decade of a GPU's draws per image; beyond it float64 bounds lose their meaning
# The base classifier's precision, in Lightning's names (the jobs' hardware group sets it): float32, or bf16 / fp16
# autocast. None: bf16-mixed on CUDA, 32-true elsewhere (a CPU's bf16 is slow or emulated).
PRECISION_NAMES = ("32-true", "bf16-mixed", "16-mixed")
_RENAMED = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed", "auto": "null (by device)"}


def check_counts(**counts: int) -> None:
    """Each count an integer in [1, MAX_COUNT] (a bool is not a count)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be an integer in [1, 10^12], got {value!r}")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """A probability strictly between 0 and 1 (alpha, rho)."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 < alpha < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {alpha!r}")


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISION_NAMES:
        renamed = f" (precision={precision} is now {_RENAMED[precision]})" if precision in _RENAMED else ""
        raise ValueError(f"precision must be one of {'|'.join(PRECISION_NAMES)}, got {precision!r}{renamed}")


def evenly_spaced(size: int, count: int) -> list[int]:
    """The ``count`` evenly spaced indices of ``size`` items: every (size // count)-th, the first ``count`` of
    them (ImageNet's 50,000 validation images, 1,000 of them: every 50th, Cohen et al.'s protocol). The one rule
    for "N evenly spaced images" (the certify job's protocols, the certification callback); ValueError (one
    line) when there are fewer than ``count`` items."""
    if count > size:
        raise ValueError(f"{count} evenly spaced images were asked for, but the split has only {size}")
    return list(range(0, size, size // count))[:count]
