"""One home for what is reported: certified accuracy, ACR, abstain rate, tables and plots.

The job, the training callback and the analysis CLI all compute their numbers here, from records
(:mod:`.records`). This module imports no torch, so the analysis CLI starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from ..noise import Noise
from .records import ABSTAIN, Record

IMAGENET_RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
CIFAR10_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
BEYOND = "n/c"  # table cell of a radius the run could not certify at its n (see max_certifiable_radius)


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


def certified_accuracy(records: Iterable[Record], radii: Iterable[float]) -> dict[str, float]:
    """Fraction of images certified correct with radius >= r, keyed by :func:`radius_key`."""
    records = _require(records)
    radius = [rec.certified_correct_radius for rec in records]
    return {radius_key(r): sum(c is not None and c >= r for c in radius) / len(records) for r in radii}


def average_certified_radius(records: Iterable[Record]) -> float:
    """Mean certified radius, wrong and abstained images counting as radius 0."""
    records = _require(records)
    return sum(rec.certified_correct_radius or 0.0 for rec in records) / len(records)


def abstain_rate(records: Iterable[Record]) -> float:
    records = _require(records)
    return sum(rec.predict == ABSTAIN for rec in records) / len(records)


def accuracy(records: Iterable[Record]) -> float:
    records = _require(records)
    return sum(rec.correct for rec in records) / len(records)


def best_over_sigma(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Envelope of several certified-accuracy dicts: the best value per radius, as papers report it."""
    first, *_ = rows.values()
    return {key: max(row[key] for row in rows.values()) for key in first}


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    radii: Iterable[float],
    fmt: str = "markdown",
    label_header: str = "sigma",
    limits: Mapping[str, float] | None = None,
) -> str:
    """Certified-accuracy table, a row per label, a column per radius, in % (1 decimal).

    ``limits`` (label -> the row's largest certifiable radius) prints BEYOND instead of a 0.0 that only
    says the run's n was too small to certify that radius.
    """
    radii = [float(r) for r in radii]
    keys = [radius_key(r) for r in radii]
    limits = limits or {}

    def cell(label: str, row: Mapping[str, float], r: float, key: str) -> str:
        return BEYOND if r > limits.get(label, math.inf) else f"{100 * row[key]:.1f}"

    body = [[label, *(cell(label, row, r, k) for r, k in zip(radii, keys))] for label, row in rows.items()]
    beyond = any(BEYOND in cells for cells in body)
    if fmt == "markdown":
        lines = [[label_header, *(f"r={key}" for key in keys)], ["---", *("---:" for _ in keys)], *body]
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        note = f"\n\n{BEYOND}: beyond the largest radius the run can certify (n successes out of n)"
        return text + (note if beyond else "")
    if fmt == "latex":
        header = [_latex_escape(label_header), *(f"$r={key}$" for key in keys)]
        lines = [
            "\\begin{tabular}{l" + "r" * len(keys) + "}",
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


def plot_certified_accuracy(
    curves: Mapping[str, Sequence[Record]], out_png, title: str = "", envelope: bool = True
) -> None:
    """Certified accuracy (%) vs radius, one curve per label, plus the best-over-sigma envelope if several."""
    # Imported here: matplotlib is slow to import and only this function needs it.
    import numpy as np
    from matplotlib.figure import Figure  # draws with the Agg canvas, leaves the pyplot backend alone

    # Radii of the correctly certified images, sorted, per curve.
    certified = {
        label: np.sort([c for rec in recs if (c := rec.certified_correct_radius) is not None])
        for label, recs in curves.items()
    }
    largest = max((radii[-1] for radii in certified.values() if len(radii)), default=0.0)
    grid = np.linspace(0.0, max(largest * 1.05, 0.25), 1000)  # [G]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    accuracies = []
    for label, radii in certified.items():
        # % of images with radius >= r, for every grid point r
        acc = 100 * (len(radii) - np.searchsorted(radii, grid, side="left")) / len(curves[label])  # [G]
        accuracies.append(acc)
        ax.plot(grid, acc, label=label)
    if envelope and len(curves) > 1:
        ax.plot(grid, np.max(accuracies, axis=0), "k--", label="best over sigma")
    ax.set_xlabel("L2 radius ([0,1] pixel space)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0.0, 100.0)
    ax.set_xlim(0.0, grid[-1])
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=150)
