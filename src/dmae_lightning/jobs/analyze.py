"""Certified-accuracy tables and plots from certification run directories.

    python -m dmae_lightning.jobs.analyze RUN_DIR... [--radii 0 0.25 0.5] [--out DIR]

Runs are grouped by everything but sigma that their numbers depend on (procedure, model, data set,
split, image subset, n, alpha, precision, and for certify_radii its radius grid); each group gets its own
table (a row per sigma plus, with several, the best-over-sigma envelope that papers report) and plot.
Paths that hold no finished certification run (Hydra's multirun.yaml, a run stopped by a config error) are
skipped with a note. analysis.md, analysis.tex and analysis.png (analysis_<k>.png per group with several
groups) go to --out (default: the deepest directory holding every run); a run's own files, such as its
certified_accuracy.png, are never overwritten.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from dmae_lightning.certification.metrics import (
    DEFAULT_RHO,
    GRID_MODE,
    average_certified_radius,
    best_over_sigma,
    certified_accuracy,
    certified_accuracy_lower_bound,
    default_radii,
    false_certificates_allowed,
    within_reach,
)
from dmae_lightning.certification.procedures import PROCEDURES
from dmae_lightning.certification.records import Record, read_json, read_records
from dmae_lightning.certification.report import (
    bound_note,
    format_table,
    plot_certified_accuracy,
    sample_budget,
)

# What a run's numbers depend on besides sigma: runs differing in any of these never share a table
# ("noise" is the distribution's class: Gaussian and discrete-Gaussian runs are not rows of one table).
GROUP_KEYS = (
    "mode",
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


def group_key(summary: dict) -> tuple[str, ...]:
    """The run's values of GROUP_KEYS; "grid" is the radius grid of certify_radii (its records answer only
    there), None for procedures whose radii are only the table's columns; "noise" the noise's class; "subset"
    the images taken (protocol=images500 and skip=20 max=500 take the same ones), the settings where a run does
    not say."""
    subset = summary.get("subset")
    values = {
        **summary,
        "subset": subset.get("indices", subset) if isinstance(subset, dict) else subset,
        "grid": summary.get("radii") if summary.get("mode") == GRID_MODE else None,
        "noise": (summary.get("noise") or {}).get("_target_"),
    }
    return tuple(str(values.get(k)) for k in GROUP_KEYS)


def load_run(run_dir: str | Path) -> tuple[dict, list[Record]]:
    """(summary, records) of one finished run; FileNotFoundError / ValueError in one line if there is none."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished certification run (no summary.json)")
    try:
        summary = read_json(summary_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{summary_path}: damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "python certify.py with the run's command rebuilds it from the per-image file"
        ) from None
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path}: a JSON {type(summary).__name__}, not a run summary")
    procedure = PROCEDURES.get(summary.get("mode", "certify"))
    if procedure is None or "certified_accuracy" not in summary or "sigma" not in summary:
        raise ValueError(f"{run_dir}: no certified radii in this run (mode {summary.get('mode')!r})")
    sigma = summary["sigma"]
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, int | float)
        or not (math.isfinite(sigma) and sigma > 0)
    ):
        raise ValueError(f"{summary_path}: sigma must be a number > 0, got {sigma!r}")
    if not isinstance(summary["certified_accuracy"], dict):
        raise ValueError(f"{summary_path}: certified_accuracy is not a table of radii")
    tsv = run_dir / f"{procedure.name}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{run_dir}: {tsv.name} is missing")
    records = read_records(tsv, procedure.record_type)
    if not records:
        raise ValueError(f"{tsv}: no records")
    return summary, records


def group_label(key: tuple, varying: list[int]) -> str:
    """What distinguishes a group from the others, e.g. 'model_name=vit_tiny_patch4, n=1000'."""
    return ", ".join(f"{GROUP_KEYS[i]}={key[i]}" for i in varying) or "all runs"


def row_labels(members: list) -> dict[Path, str]:
    """Each run's row label: its sigma, followed, where several runs of a group share a sigma (two
    checkpoints, two seeds), by its path below the directory those runs share, so no row replaces another."""
    by_sigma: dict[str, list[Path]] = {}
    for run_dir, summary, _ in members:
        by_sigma.setdefault(f"{float(summary['sigma']):g}", []).append(run_dir)
    labels = {}
    for sigma, dirs in by_sigma.items():
        common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else None
        for run_dir in dirs:
            labels[run_dir] = (
                sigma if common is None else f"{sigma} ({run_dir.relative_to(common).as_posix()})"
            )
    return labels


def sample_cost(label: str, summary: dict) -> str:
    """'sigma=0.25: 123,400 noisy samples (343 per image, 29.4x fewer than fixed n)', when the run says."""
    if "samples" not in summary:
        return ""
    text = f"\n- sigma={label}: {summary['samples']:,} noisy samples ({summary['samples'] / summary['num_images']:,.0f} per image"
    saving = summary.get("saving_vs_fixed_n")
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

    runs = []
    given: dict[Path, str] = {}  # resolved run directory -> the path it was given as
    for path in args.run_dirs:
        real = Path(path).resolve()  # a `latest` link and the run directory it points at are one run
        if real in given:
            print(f"analyze: {path} is the run {given[real]} already given, counted once", file=sys.stderr)
            continue
        given[real] = path
        try:
            runs.append((real, *load_run(real)))
        except (FileNotFoundError, ValueError) as err:
            print(f"analyze: skipping {err}", file=sys.stderr)
    if not runs:
        print("analyze: error: none of the paths holds a finished certification run", file=sys.stderr)
        return 2
    groups: dict[tuple, list] = {}
    for run in runs:
        key = group_key(run[1])
        groups.setdefault(key, []).append(run)
    varying = [i for i in range(len(GROUP_KEYS)) if len({key[i] for key in groups}) > 1]
    out = args.out or Path(os.path.commonpath([run_dir for run_dir, *_ in runs]))
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
        first = members[0][1]
        radii = args.radii or first.get("radii") or default_radii(first.get("dataset", ""))
        rows, bounds, acr, curves, limits, costs = {}, {}, {}, {}, {}, []
        rho = first.get("rho", DEFAULT_RHO)
        labels = row_labels(members)
        for run_dir, summary, records in sorted(members, key=lambda run: float(run[1]["sigma"])):
            label = labels[run_dir]
            limit = summary.get("max_certifiable_radius", math.inf)
            rows[label] = within_reach(certified_accuracy(records, radii), limit)
            if first["mode"] != GRID_MODE:  # grid radii give no ACR comparable with CERTIFY's
                acr[label] = average_certified_radius(records)
            bounds[f"{label} lower bound"] = within_reach(
                certified_accuracy_lower_bound(records, radii, summary["alpha"], rho), limit
            )
            curves[f"sigma={label}"] = records
            limits[f"sigma={label}"] = limit
            costs.append(sample_cost(label, summary))
        if len(rows) > 1:
            rows["best"] = best_over_sigma(rows)
        # no envelope of the lower bounds: the best of several level-(1 - rho) bounds holds only at 1 - S rho
        rows.update(bounds)
        num_images = len(members[0][2])
        note = bound_note(rho, false_certificates_allowed(num_images, first["alpha"], rho), num_images)
        title = (
            f"{group_label(key, varying)}: {first['model_name']} on {first['dataset']} {first['split']}, "
            f"{num_images} images, {sample_budget(first['mode'], first['n'])}, alpha={first['alpha']}"
        )
        markdown.append(
            f"### {title}\n\n{format_table(rows, radii, acr=acr or None)}\n\n{note}"
            + "".join(c for c in costs if c)
        )
        latex.append(f"% {title}\n{format_table(rows, radii, fmt='latex', acr=acr or None)}")
        png = out / ("analysis.png" if len(groups) == 1 else f"analysis_{number}.png")
        grid = first["radii"] if first["mode"] == GRID_MODE else None
        plot_certified_accuracy(curves, png, title=title, limits=limits, grid=grid)
    print("Certified accuracy (%)\n\n" + "\n\n".join(markdown) + "\n\n" + "\n\n".join(latex))
    (out / "analysis.md").write_text("\n\n".join(markdown) + "\n", encoding="utf-8")
    (out / "analysis.tex").write_text("\n\n".join(latex) + "\n", encoding="utf-8")
    print(f"\nwrote analysis.md, .tex and the plot(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
