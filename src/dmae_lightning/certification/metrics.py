"""One home for what is reported: certified accuracy, ACR, abstain rate, tables and plots.

The job, the training callback and the analysis CLI all compute their numbers here, from records
(:mod:`.records`). This module imports no torch, so the analysis CLI starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from scipy.stats import binom

from ..noise import Noise
from .records import ABSTAIN, Record

IMAGENET_RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
CIFAR10_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
BEYOND = "n/c"  # table cell of a radius the run could not certify at its n (see max_certifiable_radius)
GRID_MODE = "certify_radii"  # the procedure that answers only at its grid radii (drawn as points)
DEFAULT_RHO = 0.001  # failure probability of the data-set-level lower bound (see certified_accuracy_lower_bound)


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


def _require(records: Iterable[Record]) -> list[Record]:
    records = list(records)
    if not records:
        raise ValueError("no certification records")
    return records


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
    """ACR: mean certified radius, wrong and abstained images counting as radius 0. (For certify_radii it would
    be the mean of grid radii, not comparable with CERTIFY's ACR: the jobs and tables leave it out there.)"""
    records = _require(records)
    return sum(rec.certified_correct_radius or 0.0 for rec in records) / len(records)


def bound_note(rho: float, allowed: int, m: int) -> str:
    """The line under a table with :func:`certified_accuracy_lower_bound` rows."""
    return (
        f"lower bound: the true certified accuracy is at least this with probability 1 - rho = {1 - rho:g} "
        f"(at most {allowed} of the {m:,} certificates false)"
    )


def abstain_rate(records: Iterable[Record]) -> float:
    records = _require(records)
    return sum(rec.predict == ABSTAIN for rec in records) / len(records)


def accuracy(records: Iterable[Record]) -> float:
    records = _require(records)
    return sum(rec.correct for rec in records) / len(records)


def within_reach(values: Mapping[str, float], limit: float) -> dict[str, float | None]:
    """``values`` (keyed by :func:`radius_key`) with None at each radius beyond ``limit``, the largest radius
    the run can certify (:func:`max_certifiable_radius`): there a 0 would only say that n was too small."""
    return {key: None if float(key) > limit else value for key, value in values.items()}


def best_over_sigma(rows: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Envelope of several certified-accuracy dicts: the best value per radius, as papers report it (None
    where no row reaches the radius)."""
    first, *_ = rows.values()
    return {key: max((row[key] for row in rows.values() if row[key] is not None), default=None) for key in first}


def format_table(
    rows: Mapping[str, Mapping[str, float | None]],
    radii: Iterable[float],
    fmt: str = "markdown",
    label_header: str = "sigma",
    acr: Mapping[str, float] | None = None,
) -> str:
    """Certified-accuracy table, a row per label, a column per radius, in % (1 decimal).

    A None value (a radius beyond the row's reach, see :func:`within_reach`) prints BEYOND, not 0.0.
    ``acr`` (label -> :func:`average_certified_radius`) adds an ACR column (empty for other labels).
    """
    keys = [radius_key(r) for r in radii]

    def cell(value: float | None) -> str:
        return BEYOND if value is None else f"{100 * value:.1f}"

    extra = [] if acr is None else ["ACR"]
    body = [
        [label, *(cell(row[k]) for k in keys), *([f"{acr[label]:.3f}" if label in acr else ""] if extra else [])]
        for label, row in rows.items()
    ]
    beyond = any(BEYOND in cells for cells in body)
    if fmt == "markdown":
        lines = [[label_header, *(f"r={key}" for key in keys), *extra], ["---", *("---:" for _ in keys + extra)], *body]
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        note = f"\n\n{BEYOND}: beyond the largest radius the run can certify (n successes out of n)"
        return text + (note if beyond else "")
    if fmt == "latex":
        header = [_latex_escape(label_header), *(f"$r={key}$" for key in keys), *extra]
        lines = [
            "\\begin{tabular}{l" + "r" * len(keys + extra) + "}",
            "\\toprule",
            " & ".join(header) + " \\\\",
            "\\midrule",
            *(" & ".join([_latex_escape(cells[0]), *cells[1:]]) + " \\\\" for cells in body),
            "\\bottomrule",
            "\\end{tabular}",
        ]
        return "\n".join(lines)
    raise ValueError(f"unknown table format {fmt!r}, expected 'markdown' or 'latex'")


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def sample_budget(mode: str, n: int) -> str:
    """How a plot title or table names a run's n: the sequential procedure's n is a cap per image."""
    return f"cap n={n}" if mode == GRID_MODE else f"n={n}"


def plot_certified_accuracy(
    curves: Mapping[str, Sequence[Record]],
    out_png,
    title: str = "",
    envelope: bool = True,
    limits: Mapping[str, float] | None = None,
    grid: Sequence[float] | None = None,
):
    """Certified accuracy (%) vs radius, one curve per label, plus the best-over-sigma envelope if several.

    ``limits`` (label -> the largest radius the run can certify) ends each curve there and marks it with a
    labelled vertical line. ``grid``: the records answer only at these radii (mode certify_radii), so they
    are drawn as points at the grid radii, not as a line. Returns the matplotlib Figure.
    """
    # Imported here: matplotlib is slow to import and only this function needs it.
    import numpy as np
    from matplotlib.figure import Figure  # draws with the Agg canvas, leaves the pyplot backend alone

    limits = {label: limits.get(label, math.inf) for label in curves} if limits else dict.fromkeys(curves, math.inf)
    # Radii of the correctly certified images, sorted, per curve.
    certified = {
        label: np.sort([c for rec in recs if (c := rec.certified_correct_radius) is not None])
        for label, recs in curves.items()
    }
    largest = max((radii[-1] for radii in certified.values() if len(radii)), default=0.0)
    finite = [limit for limit in limits.values() if math.isfinite(limit)]
    right = max(largest, *finite, *(grid or ()), 0.24) * 1.05
    xs = np.asarray(grid, dtype=float) if grid is not None else np.linspace(0.0, right, 1000)  # [G]
    style = {"marker": "o", "linestyle": "none"} if grid is not None else {}
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    accuracies = []
    for label, radii in certified.items():
        # % of images with radius >= r, for every radius r of xs; NaN (not drawn) beyond the curve's reach
        acc = 100 * (len(radii) - np.searchsorted(radii, xs, side="left")) / len(curves[label])  # [G]
        acc = np.where(xs > limits[label], np.nan, acc)
        accuracies.append(acc)
        (line,) = ax.plot(xs, acc, label=label, **style)
        if math.isfinite(limits[label]):
            name = "" if len(curves) == 1 else f" ({label})"
            ax.axvline(limits[label], color=line.get_color(), linestyle=":",
                       label=f"largest certifiable radius {limits[label]:.3g}{name}")
    if envelope and len(curves) > 1:
        best = np.full(len(xs), np.nan)
        reached = ~np.all(np.isnan(accuracies), axis=0)  # [G]
        best[reached] = np.nanmax(np.asarray(accuracies)[:, reached], axis=0)
        ax.plot(xs, best, "k--" if grid is None else "k_", markersize=14, label="best over sigma")
    ax.set_xlabel("L2 radius ([0,1] pixel space)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0.0, 100.0)
    ax.set_xlim(0.0, right)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=150)
    return fig
