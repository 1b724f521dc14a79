"""Certified-accuracy tables and plots from certification run directories.

    python -m dmae_lightning.jobs.analyze RUN_DIR... [--radii 0 0.25 0.5] [--out DIR]

Runs are grouped by everything but sigma that their numbers depend on (procedure, model, data set,
split, image subset, n, alpha, precision, and for a grid-only procedure, certify_radii, its radius grid); each group gets its own
table (a row per sigma plus, with several, the best-over-sigma envelope that papers report) and plot.
Paths that hold no finished certification run (Hydra's multirun.yaml, a run stopped by a config error) are
skipped with a note. analysis.md, analysis.tex and analysis.png (analysis_<k>.png per group with several
groups) go to --out (default: the deepest directory holding every run); a run's own files, such as its
certified_accuracy.png, are never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dmae_lightning.certification.metrics import (
    best_over_sigma,
    default_radii,
    false_certificates_allowed,
)
from dmae_lightning.certification.records import Record, read_records
from dmae_lightning.certification.report import (
    bound_note,
    format_table,
    plot_certified_accuracy,
    sample_budget,
)
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.summary import CertifiedSummary

# What a run's numbers depend on besides sigma: runs differing in any of these never share a table
# ("noise" is the distribution's class: Gaussian and discrete-Gaussian runs are not rows of one table).
GROUP_KEYS = (
    "procedure",
    "noise",
    "model_name",
    "dataset",
    "split",
    "subset",
    "data_subset",
    "n0",
    "n",
    "alpha",
    "precision",
    "grid",
)


@dataclass(frozen=True)
class Run:
    """A finished certification run: where it is, its summary.json, its certified result and records."""

    path: Path
    summary: RunSummary
    result: CertifiedSummary  # summary.result: a run of certified radii
    records: list[Record]


def group_key(run: Run) -> tuple[str, ...]:
    """The run's values of GROUP_KEYS; "grid" is the radius grid of a grid-only procedure (certify_radii: its
    records answer only there), None for procedures whose radii are only the table's columns; "noise" the
    noise's class; "subset" the images taken (protocol=images500 and skip=20 max=500 take the same ones), the
    settings where a run does not say."""
    settings = run.summary.settings
    subset = settings.get("subset")
    grid = run.result.grid
    values = {
        **settings,
        "procedure": run.summary.procedure.name,
        "subset": subset.get("indices", subset) if isinstance(subset, dict) else subset,
        "grid": None if grid is None else list(grid),
        "noise": (settings.get("noise") or {}).get("_target_"),
    }
    return tuple(str(values.get(k)) for k in GROUP_KEYS)


def load_run(run_dir: str | Path) -> Run:
    """One finished run; FileNotFoundError / ValueError in one line if there is none."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished certification run (no summary.json)")
    summary = read_summary(summary_path)
    if not isinstance(summary.result, CertifiedSummary):
        raise ValueError(f"{run_dir}: no certified radii in this run (procedure {summary.procedure.name!r})")
    tsv = run_dir / f"{summary.procedure.name}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{run_dir}: {tsv.name} is missing")
    records = read_records(tsv, summary.procedure.record_type)
    if not records:
        raise ValueError(f"{tsv}: no records")
    return Run(run_dir, summary, summary.result, records)


def group_label(key: tuple, varying: list[int]) -> str:
    """What distinguishes a group from the others, e.g. 'model_name=vit_tiny_patch4, n=1000'."""
    return ", ".join(f"{GROUP_KEYS[i]}={key[i]}" for i in varying) or "all runs"


def row_labels(members: list[Run]) -> dict[Path, str]:
    """Each run's row label: its sigma, followed, where several runs of a group share a sigma (two
    checkpoints, two seeds), by its path below the directory those runs share, so no row replaces another."""
    by_sigma: dict[str, list[Path]] = {}
    for run in members:
        by_sigma.setdefault(f"{run.summary.sigma:g}", []).append(run.path)
    labels = {}
    for sigma, dirs in by_sigma.items():
        common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else None
        for run_dir in dirs:
            labels[run_dir] = (
                sigma if common is None else f"{sigma} ({run_dir.relative_to(common).as_posix()})"
            )
    return labels


def sample_cost(label: str, result: CertifiedSummary) -> str:
    """'sigma=0.25: 123,400 noisy samples (343 per image, 29.4x fewer than fixed n)', when the run says."""
    if result.samples is None:
        return ""
    text = f"\n- sigma={label}: {result.samples:,} noisy samples ({result.samples / result.num_images:,.0f} per image"
    saving = None if result.sequential is None else result.sequential.saving_vs_fixed_n
    return text + (f", {saving:.1f}x fewer than fixed n)" if saving else ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_lightning.jobs.analyze", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="certification run directories")
    parser.add_argument("--radii", nargs="+", type=float, help="table columns (default: the runs' own radii)")
    parser.add_argument(
        "--out", type=Path, help="where to write tables and plots (default: the runs' common parent)"
    )
    args = parser.parse_args(argv)

    runs: list[Run] = []
    given: dict[Path, str] = {}  # resolved run directory -> the path it was given as
    for path in args.run_dirs:
        real = Path(path).resolve()  # a `latest` link and the run directory it points at are one run
        if real in given:
            print(f"analyze: {path} is the run {given[real]} already given, counted once", file=sys.stderr)
            continue
        given[real] = path
        try:
            runs.append(load_run(real))
        except (FileNotFoundError, ValueError) as err:
            print(f"analyze: skipping {err}", file=sys.stderr)
    if not runs:
        print("analyze: error: none of the paths holds a finished certification run", file=sys.stderr)
        return 2
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    varying = [i for i in range(len(GROUP_KEYS)) if len({key[i] for key in groups}) > 1]
    out = args.out or Path(os.path.commonpath([run.path for run in runs]))
    if out.is_file():
        out = out.parent
    if args.out is None and out == Path(out.anchor):
        print(f"analyze: error: the runs share no directory but {out}: name one with --out", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as err:
        print(
            f"analyze: error: cannot write the tables to {out} ({err.strerror or err}): choose another --out",
            file=sys.stderr,
        )
        return 2

    markdown, latex = [], []
    for number, (key, members) in enumerate(sorted(groups.items()), start=1):
        first = members[0]
        radii = args.radii or first.result.radii or default_radii(first.summary.settings.get("dataset", ""))
        rows: dict[str, Mapping[str, float | None]] = {}
        bounds: dict[str, Mapping[str, float | None]] = {}
        acr: dict[str, float] = {}
        curves, limits, costs = {}, {}, []
        rho = first.result.rho
        labels = row_labels(members)
        for run in sorted(members, key=lambda run: run.summary.sigma):
            label = labels[run.path]
            table = run.result.at(run.records, radii, run.summary.alpha, rho)
            rows[label] = table.certified_accuracy
            if table.average_certified_radius is not None:  # none of grid-only runs (not comparable)
                acr[label] = table.average_certified_radius
            if table.certified_accuracy_lower_bound is not None:  # always: computed from the records
                bounds[f"{label} lower bound"] = table.certified_accuracy_lower_bound
            curves[f"sigma={label}"] = run.records
            limits[f"sigma={label}"] = table.max_certifiable_radius
            costs.append(sample_cost(label, run.result))
        if len(rows) > 1:
            rows["best"] = best_over_sigma(rows)
        # no envelope of the lower bounds: the best of several level-(1 - rho) bounds holds only at 1 - S rho
        rows.update(bounds)
        num_images = len(first.records)
        note = bound_note(rho, false_certificates_allowed(num_images, first.summary.alpha, rho), num_images)
        settings = first.summary.settings
        title = (
            f"{group_label(key, varying)}: {settings['model_name']} on {settings['dataset']} {settings['split']}, "
            f"{num_images} images, {sample_budget(first.summary.n, first.result.grid_only)}, "
            f"alpha={settings['alpha']}"
        )
        markdown.append(
            f"### {title}\n\n{format_table(rows, radii, acr=acr or None)}\n\n{note}"
            + "".join(c for c in costs if c)
        )
        latex.append(f"% {title}\n{format_table(rows, radii, fmt='latex', acr=acr or None)}")
        png = out / ("analysis.png" if len(groups) == 1 else f"analysis_{number}.png")
        plot_certified_accuracy(curves, png, title=title, limits=limits, grid=first.result.grid)
    print("Certified accuracy (%)\n\n" + "\n\n".join(markdown) + "\n\n" + "\n\n".join(latex))
    (out / "analysis.md").write_text("\n\n".join(markdown) + "\n", encoding="utf-8")
    (out / "analysis.tex").write_text("\n\n".join(latex) + "\n", encoding="utf-8")
    print(f"\nwrote analysis.md, .tex and the plot(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
