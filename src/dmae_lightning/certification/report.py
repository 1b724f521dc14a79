"""Tables (Markdown, LaTeX) and plots of certified accuracy, for the jobs and the analysis. Imports: matplotlib
(in the plot only), :mod:`.metrics` and :mod:`.records`; no torch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dmae_lightning.certification.metrics import radius_key
from dmae_lightning.certification.records import Record

BEYOND = "n/c"  # table cell of a radius the run could not certify at its n (see max_certifiable_radius)


def bound_note(rho: float, allowed: int, m: int) -> str:
    """The line under a table with :func:`certified_accuracy_lower_bound` rows."""
    return (
        f"lower bound: the true certified accuracy is at least this with probability 1 - rho = {1 - rho:g} "
        f"(at most {allowed} of the {m:,} certificates false)"
    )


def format_table(
    rows: Mapping[str, Mapping[str, float | None]],
    radii: Iterable[float],
    fmt: str = "markdown",
    label_header: str = "sigma",
    acr: Mapping[str, float] | None = None,
) -> str:
    """Certified-accuracy table, a row per label, a column per radius, in % (1 decimal).

    A None value (a radius beyond the row's reach, see :func:`within_reach`) prints BEYOND, not 0.0; a radius a
    row does not have (an attack run's grid) an empty cell.
    ``acr`` (label -> :func:`average_certified_radius`) adds an ACR column (empty for other labels).
    """
    keys = [radius_key(r) for r in radii]

    def cell(value: float | None) -> str:
        return BEYOND if value is None else f"{100 * value:.1f}"

    def acr_cells(label: str) -> list[str]:  # the ACR column's cell of a row, if the table has the column
        if acr is None:
            return []
        return [f"{acr[label]:.3f}" if label in acr else ""]

    extra = [] if acr is None else ["ACR"]
    body = [
        [label, *(cell(row[k]) if k in row else "" for k in keys), *acr_cells(label)]
        for label, row in rows.items()
    ]
    beyond = any(BEYOND in cells for cells in body)
    if fmt == "markdown":
        lines = [
            [label_header, *(f"r={key}" for key in keys), *extra],
            ["---", *("---:" for _ in keys + extra)],
            *body,
        ]
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        note = f"\n\n{BEYOND}: beyond the largest radius the run can certify (n successes out of n)"
        return text + (note if beyond else "")
    if fmt == "latex":
        header = [_latex_escape(label_header), *(f"$r={key}$" for key in keys), *extra]
        tex = [
            "\\begin{tabular}{l" + "r" * len(keys + extra) + "}",
            "\\toprule",
            " & ".join(header) + " \\\\",
            "\\midrule",
            *(" & ".join([_latex_escape(cells[0]), *cells[1:]]) + " \\\\" for cells in body),
            "\\bottomrule",
            "\\end{tabular}",
        ]
        return "\n".join(tex)
    raise ValueError(f"unknown table format {fmt!r}, expected 'markdown' or 'latex'")


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def sample_budget(n: int, grid_only: bool) -> str:
    """How a plot title or table names a run's n: a grid-only procedure's (the sequential certify_radii) n is a
    cap per image (:attr:`~.protocol.Procedure.grid_only`)."""
    return f"cap n={n}" if grid_only else f"n={n}"


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
    labelled vertical line. ``grid``: the records answer only at these radii (a grid-only procedure,
    :attr:`.summary.CertifiedSummary.grid`), so they are drawn as points at the grid radii, not as a line. Returns the matplotlib Figure.
    """
    # Imported here: matplotlib is slow to import and only this function needs it.
    import numpy as np
    from matplotlib.figure import Figure  # draws with the Agg canvas, leaves the pyplot backend alone

    limits = (
        {label: limits.get(label, math.inf) for label in curves}
        if limits
        else dict.fromkeys(curves, math.inf)
    )
    # Radii of the correctly certified images, sorted, per curve.
    certified = {
        label: np.sort([c for rec in recs if (c := rec.certified_correct_radius) is not None])
        for label, recs in curves.items()
    }
    largest = max((radii[-1] for radii in certified.values() if len(radii)), default=0.0)
    finite = [limit for limit in limits.values() if math.isfinite(limit)]
    right = max(largest, *finite, *(grid or ()), 0.24) * 1.05
    xs = np.asarray(grid, dtype=float) if grid is not None else np.linspace(0.0, right, 1000)  # [G]
    style: dict[str, Any] = {"marker": "o", "linestyle": "none"} if grid is not None else {}
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
            ax.axvline(
                limits[label],
                color=line.get_color(),
                linestyle=":",
                label=f"largest certifiable radius {limits[label]:.3g}{name}",
            )
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


def cross_check_line(counts: Mapping[str, tuple[int, int, int]], rho: float) -> str:
    """The attack cross-check (:func:`.metrics.attacked_certificates`: per radius, images certified there, of them
    turned to another class by the attack, the most a sound certifier allows) as one line: an ALARM naming the
    first radius over its allowance, else the counts and "consistent with sound certificates"."""
    for key, (m, flipped, allowed) in counts.items():
        if flipped > allowed:
            return (
                f"ALARM: at r={key} the attack turned {flipped} of the {m} images certified there to another class, "
                f"more than a sound certifier allows ({allowed} at 1 - rho = {1 - rho:g}): an unsound certificate "
                "or a broken pipeline"
            )
    checked = ", ".join(
        f"r={key}: {flipped} of {m} certified images turned to another class (<= {allowed} allowed)"
        for key, (m, flipped, allowed) in counts.items()
    )
    return f"cross-check: {checked}: consistent with sound certificates"
