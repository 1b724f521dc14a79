"""Certified-accuracy tables and plot from certification run directories.

    python -m dmae_lightning.analyze RUN_DIR... [--radii 0 0.25 0.5] [--out DIR]

Each RUN_DIR holds the ``certify.tsv`` and ``summary.json`` of one certification run (one sigma).
Prints a Markdown and a LaTeX table (a row per sigma, plus the best-over-sigma envelope when there
are several runs, as the papers report) and writes them with the plot to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmae_lightning.results import (
    Record,
    best_over_sigma,
    certified_accuracy,
    default_radii,
    format_table,
    plot_certified_accuracy,
    read_records,
    read_summary,
)


def load_run(run_dir: str | Path) -> tuple[dict, list[Record]]:
    """(summary, records) of one run directory; FileNotFoundError / ValueError in one line if unusable."""
    run_dir = Path(run_dir)
    tsv, summary_path = run_dir / "certify.tsv", run_dir / "summary.json"
    missing = [path.name for path in (tsv, summary_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no certification results ({' and '.join(missing)} missing)")
    summary = read_summary(summary_path)
    if "sigma" not in summary:
        raise ValueError(f"{summary_path}: no 'sigma' field")
    records = read_records(tsv)
    if not records:
        raise ValueError(f"{tsv}: no records")
    return summary, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_lightning.analyze", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="directories with certify.tsv + summary.json"
    )
    parser.add_argument(
        "--radii",
        nargs="+",
        type=float,
        help="radii of the table columns (default: the paper's for the dataset)",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write the tables and the plot")
    args = parser.parse_args(argv)

    try:
        runs = [(Path(run_dir), *load_run(run_dir)) for run_dir in args.run_dirs]
    except (FileNotFoundError, ValueError) as err:
        print(f"analyze: error: {err}", file=sys.stderr)
        return 2
    radii = args.radii or runs[0][1].get("radii") or default_radii(runs[0][1].get("dataset", ""))

    curves: dict[str, list[Record]] = {}
    rows: dict[str, dict[str, float]] = {}
    for run_dir, summary, records in sorted(runs, key=lambda run: float(run[1]["sigma"])):
        expected = summary.get("num_images")
        if expected is not None and expected != len(records):
            print(
                f"analyze: warning: {run_dir}: {len(records)} records, summary says {expected}",
                file=sys.stderr,
            )
        label = f"{float(summary['sigma']):g}"
        if label in rows:  # two runs with one sigma (e.g. two models): tell them apart
            label = f"{label} ({run_dir.name})"
        curves[f"sigma={label}"] = records
        rows[label] = certified_accuracy(records, radii)
    if len(rows) > 1:
        rows["best"] = best_over_sigma(rows)

    markdown = format_table(rows, radii, fmt="markdown")
    latex = format_table(rows, radii, fmt="latex")
    print(f"Certified accuracy (%)\n\n{markdown}\n\n{latex}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "certified_accuracy.md").write_text(markdown + "\n", encoding="utf-8")
    (args.out / "certified_accuracy.tex").write_text(latex + "\n", encoding="utf-8")
    plot_certified_accuracy(curves, args.out / "certified_accuracy.png")
    print(f"\nwrote certified_accuracy.md, .tex and .png to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
