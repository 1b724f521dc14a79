"""What the reports show: radii beyond a run's reach (n/c, null, the plot's vertical line), the sequential
procedure's grid drawn as points, analysis grouping and output paths, ACR."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
from helpers.rundirs import make_run
from pytorch_lightning.loggers import CSVLogger
from scipy.stats import norm

from dmae_lightning.certification.metrics import max_certifiable_radius
from dmae_lightning.certification.records import ABSTAIN, CertifyRecord, RadiiRecord, ShardWriter, write_json
from dmae_lightning.certification.report import BEYOND, plot_certified_accuracy
from dmae_lightning.certification.runs import RunSummary
from dmae_lightning.jobs.analyze import main
from dmae_lightning.jobs.certify.job import _log_to_loggers, plot_title, report
from dmae_lightning.noise import GaussianNoise

SIGMA = 0.25
CERTIFY = [CertifyRecord(i, 1, 1, r, 1, 99, 100, 0.0) for i, r in enumerate((0.1, 0.2, 0.3, 0.35))] + [
    CertifyRecord(4, 1, ABSTAIN, 0.0, 0, 40, 100, 0.0)
]


def lines(fig):
    return fig.axes[0].get_lines()


def test_plot_ends_each_curve_at_its_reach_and_marks_it(tmp_path):
    limit = max_certifiable_radius(GaussianNoise(SIGMA), 100, 0.001)
    assert limit == SIGMA * norm.ppf(0.001 ** (1 / 100))  # 0.375
    fig = plot_certified_accuracy({"sigma=0.25": CERTIFY}, tmp_path / "a.png", limits={"sigma=0.25": limit})
    curve, marker = lines(fig)
    assert marker.get_label() == "largest certifiable radius 0.375"
    assert list(marker.get_xdata()) == [limit, limit] and marker.get_linestyle() == ":"
    x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    assert np.all(np.isnan(y[x > limit])) and not np.any(np.isnan(y[x <= limit]))  # not drawn as 0 beyond
    assert y[0] == 80.0 and fig.axes[0].get_xlim()[1] > limit
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_sequential_results_are_points_at_the_grid_radii(tmp_path):
    grid = [0.0, 0.25, 0.5, 0.75]
    records = [
        RadiiRecord(0, 1, 0.5, 1000, 0.99, 1.0, 0.0),
        RadiiRecord(1, 1, 0.0, 300, 0.6, 0.7, 0.0),
        RadiiRecord(2, 1, None, 200, 0.0, 0.1, 0.0),
        RadiiRecord(3, 1, 0.25, 1000, 0.9, 0.95, 0.0),
    ]
    curves = {"sigma=0.25": records, "sigma=0.5": records[:2]}
    limits = {"sigma=0.25": 0.6, "sigma=0.5": math.inf}
    fig = plot_certified_accuracy(curves, tmp_path / "b.png", limits=limits, grid=grid)
    by_label = {line.get_label(): line for line in lines(fig)}
    points = by_label["sigma=0.25"]
    assert points.get_marker() == "o" and points.get_linestyle() == "None"
    assert list(points.get_xdata()) == grid
    np.testing.assert_array_equal(points.get_ydata(), [75.0, 50.0, 25.0, np.nan])  # 0.75 is beyond 0.6
    np.testing.assert_array_equal(by_label["sigma=0.5"].get_ydata(), [100.0, 50.0, 50.0, 0.0])
    np.testing.assert_array_equal(by_label["best over sigma"].get_ydata(), [100.0, 50.0, 50.0, 0.0])
    assert "largest certifiable radius 0.6 (sigma=0.25)" in by_label
    summary = dict(
        model_name="vit",
        dataset="digits",
        split="test",
        num_images=4,
        sigma=0.25,
        noise=GaussianNoise(0.25).config(),
        n=1000,
        alpha=0.001,
        procedure="certify_radii",
        certified_accuracy={"0": 0.75},
    )
    assert plot_title(RunSummary.from_json(summary)) == (
        "vit on digits test (4 images): sigma0.25, cap n=1000, alpha=0.001"
    )
    assert plot_title(RunSummary.from_json({**summary, "procedure": "certify"})).endswith(
        ", n=1000, alpha=0.001"
    )  # CERTIFY's n is no cap


def test_csv_metrics_say_nc_beyond_the_reach(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    summary = RunSummary.from_json(
        dict(
            procedure="certify",
            sigma=0.25,
            n=100,
            alpha=0.001,
            num_images=5,
            certified_accuracy={"0": 0.8, "0.25": 0.6, "0.5": None},
            average_certified_radius=0.2,
            abstain_rate=0.2,
            radii=[0, 0.25, 0.5],
        )
    )
    _log_to_loggers(SimpleNamespace(loggers=[logger]), summary, png=tmp_path / "x.png")
    with open(tmp_path / "metrics.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert (row["cert/acc@0"], row["cert/acc@0.25"], row["cert/acc@0.5"]) == ("0.8", "0.6", BEYOND)
    assert (row["cert/acr"], row["cert/abstain_rate"]) == ("0.2", "0.2")


def test_analysis_tables_say_nc_beyond_the_reach(tmp_path):
    run = make_run(tmp_path / "run", 0.25, [(0.3, 1), (0.1, 1), (0.0, 0)], max_certifiable_radius=0.375)
    assert main([str(run), "--radii", "0", "0.25", "0.5", "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "analysis.md").read_text().splitlines()
    assert table[4:6] == [
        f"| 0.25 | 66.7 | 33.3 | {BEYOND} | 0.133 |",
        f"| 0.25 lower bound | 33.3 | 0.0 | {BEYOND} |  |",
    ]


def make_radii_run(run_dir, sigma, radii_certified, grid):
    """A certify_radii run directory whose images are certified up to the given grid radii (None: none)."""
    with ShardWriter(run_dir / "certify_radii.tsv", RadiiRecord) as writer:
        for i, radius in enumerate(radii_certified):
            writer.write(RadiiRecord(i, 1, radius, 1000, 0.9, 1.0, 0.0))
    summary = dict(
        procedure="certify_radii",
        sigma=sigma,
        n0=100,
        n=1000,
        alpha=0.001,
        precision="32-true",
        model_name="vit",
        dataset="digits",
        split="test",
        subset={"skip": 1, "max": None},
        data_subset=None,
        radii=grid,
        num_images=len(radii_certified),
        certified_accuracy={},
        max_certifiable_radius=0.6,
    )
    write_json(run_dir / "summary.json", summary)
    return run_dir


def test_analysis_groups_by_grid_and_never_overwrites_a_runs_plot(tmp_path):
    coarse = make_radii_run(tmp_path / "coarse", 0.25, [0.5, 0.0, None], [0.0, 0.5])
    fine = make_radii_run(tmp_path / "fine", 0.5, [0.25, 0.25, 0.0], [0.0, 0.25, 0.5])
    own_plot = b"the job's own plot"
    (coarse / "certified_accuracy.png").write_bytes(own_plot)
    assert main([str(coarse)]) == 0  # written next to the run, which is the default output directory
    assert (coarse / "certified_accuracy.png").read_bytes() == own_plot
    assert (coarse / "analysis.png").read_bytes()[:4] == b"\x89PNG" and (coarse / "analysis.md").is_file()
    assert main([str(coarse), str(fine), "--out", str(tmp_path / "report")]) == 0
    tables = (tmp_path / "report" / "analysis.md").read_text().split("### ")[1:]
    assert len(tables) == 2  # two grids: never one table, one envelope or one curve
    # no ACR column: grid radii give no ACR comparable with CERTIFY's (issue 22)
    assert tables[0].startswith("grid=[0.0, 0.25, 0.5]") and "| 0.5 | 100.0 | 66.7 | 0.0 |\n" in tables[0]
    assert tables[1].startswith("grid=[0.0, 0.5]") and "| 0.25 | 66.7 | 33.3 |\n" in tables[1]
    assert "ACR" not in "".join(tables)
    assert "best" not in "".join(tables) and "cap n=1000" in tables[0]
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == {"analysis_1.png", "analysis_2.png"}
    # CERTIFY's radii are only table columns: runs with other radii= still share a table and its envelope
    low = make_run(tmp_path / "c1", 0.25, [(0.3, 1), (0.1, 1)], radii=[0.0, 0.25])
    high = make_run(tmp_path / "c2", 0.5, [(0.6, 1), (0.0, 0)], radii=[0.0, 0.5])
    assert main([str(low), str(high), "--radii", "0", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert "| best | 100.0 | 50.0 |  |" in (tmp_path / "c" / "analysis.md").read_text()


def test_the_jobs_table_shows_acr_and_the_lower_bound():
    summary = dict(
        procedure="certify",
        sigma=0.25,
        n=1000,
        alpha=0.001,
        num_images=4,
        samples=4400,
        radii=[0.0, 0.5],
        certified_accuracy={"0": 0.75, "0.5": None},
        certified_accuracy_lower_bound={"0": 0.5, "0.5": None},
        average_certified_radius=0.1875,
        abstain_rate=0.25,
        rho=0.001,
        false_certificates_allowed=1,
    )
    lines = report(RunSummary.from_json(summary)).splitlines()
    assert (
        lines[0]
        == "certify: certified accuracy (%) of 4 images, 4,400 noisy samples (1,100 per image), abstain rate 0.2500:"
    )
    assert lines[1:5] == [
        "| sigma | r=0 | r=0.5 | ACR |",
        "| --- | ---: | ---: | ---: |",
        f"| 0.25 | 75.0 | {BEYOND} | 0.188 |",
        f"| 0.25 lower bound | 50.0 | {BEYOND} |  |",
    ]
    assert (
        lines[-1].startswith("lower bound: the true certified accuracy") and "at most 1 of the 4" in lines[-1]
    )
    # skip_wrong_guess: the abstain rate is not measured (null), and said so
    skipped = report(RunSummary.from_json({**summary, "abstain_rate": None})).splitlines()[0]
    assert skipped.endswith("abstain rate not measured (skip_wrong_guess):")
    # the sequential grid procedure: no ACR, no abstain rate, and the samples it saved
    grid = {**summary, "procedure": "certify_radii", "average_certified_radius": None}
    grid.update(samples_at_cap=1, fixed_n_samples=4 * 1100, saving_vs_fixed_n=4 * 1100 / 4400)
    sequential = report(
        RunSummary.from_json({**grid, "samples": 440, "saving_vs_fixed_n": 10.0})
    ).splitlines()
    assert (
        sequential[0]
        == "certify_radii: certified accuracy (%) of 4 images, 440 noisy samples (110 per image):"
    )
    assert sequential[1] == "| sigma | r=0 | r=0.5 |" and sequential[-1] == (
        "certify_radii used 440 noisy samples where fixed-n certify would use 4,400 (n0 + n per image): 10.0x fewer"
    )


def test_runs_of_the_same_images_share_a_table_however_they_were_chosen(tmp_path):
    by_protocol = make_run(
        tmp_path / "a",
        0.25,
        [(0.3, 1), (0.1, 1)],
        subset={"skip": 1, "max": None, "images": 500, "indices": "range(0, 10000, 20)[:500]"},
    )
    by_skip = make_run(
        tmp_path / "b",
        0.5,
        [(0.6, 1), (0.0, 0)],
        subset={"skip": 20, "max": 500, "images": None, "indices": "range(0, 10000, 20)[:500]"},
    )
    other = make_run(
        tmp_path / "c",
        0.5,
        [(0.6, 1), (0.0, 0)],
        subset={"skip": 10, "max": 500, "images": None, "indices": "range(0, 10000, 10)[:500]"},
    )
    assert (
        main(
            [str(by_protocol), str(by_skip), str(other), "--radii", "0", "0.5", "--out", str(tmp_path / "r")]
        )
        == 0
    )
    tables = (tmp_path / "r" / "analysis.md").read_text().split("### ")[1:]
    assert len(tables) == 2 and sum("| best |" in table for table in tables) == 1
