"""What the reports show: radii beyond a run's reach (n/c, null, the plot's vertical line), the sequential
procedure's grid drawn as points, analysis grouping and output paths, ACR."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
from pytorch_lightning.loggers import CSVLogger
from scipy.stats import norm
from test_analyze import make_run

from dmae_lightning.certification.analyze import main
from dmae_lightning.certification.job import _log_to_loggers, plot_title
from dmae_lightning.certification.metrics import BEYOND, max_certifiable_radius, plot_certified_accuracy
from dmae_lightning.certification.records import ABSTAIN, CertifyRecord, RadiiRecord

SIGMA = 0.25
CERTIFY = [CertifyRecord(i, 1, 1, r, 1, 99, 100, 0.0) for i, r in enumerate((0.1, 0.2, 0.3, 0.35))] + [
    CertifyRecord(4, 1, ABSTAIN, 0.0, 0, 40, 100, 0.0)
]


def lines(fig):
    return fig.axes[0].get_lines()


def test_plot_ends_each_curve_at_its_reach_and_marks_it(tmp_path):
    limit = max_certifiable_radius(SIGMA, 100, 0.001)
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
    records = [RadiiRecord(0, 1, 0.5, 1000, 0.99, 1.0, 0.0), RadiiRecord(1, 1, 0.0, 300, 0.6, 0.7, 0.0),
               RadiiRecord(2, 1, None, 200, 0.0, 0.1, 0.0), RadiiRecord(3, 1, 0.25, 1000, 0.9, 0.95, 0.0)]
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
    summary = dict(model_name="vit", dataset="digits", split="test", num_images=4, sigma=0.25, n=1000,
                   alpha=0.001, mode="certify_radii")
    assert "cap n=1000" in plot_title(summary)
    assert "cap" not in plot_title({**summary, "mode": "certify"}) and "n=1000" in plot_title(summary)


def test_csv_metrics_say_nc_beyond_the_reach(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    summary = dict(mode="certify", certified_accuracy={"0": 0.8, "0.25": 0.6, "0.5": None},
                   average_certified_radius=0.2, abstain_rate=0.2, radii=[0, 0.25, 0.5])
    _log_to_loggers(SimpleNamespace(loggers=[logger]), summary, png=tmp_path / "x.png")
    with open(tmp_path / "metrics.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert (row["cert/acc@0"], row["cert/acc@0.25"], row["cert/acc@0.5"]) == ("0.8", "0.6", BEYOND)


def test_analysis_tables_say_nc_beyond_the_reach(tmp_path):
    run = make_run(tmp_path / "run", 0.25, [(0.3, 1), (0.1, 1), (0.0, 0)], max_certifiable_radius=0.375)
    assert main([str(run), "--radii", "0", "0.25", "0.5", "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "certified_accuracy.md").read_text().splitlines()
    assert table[4:6] == [f"| 0.25 | 66.7 | 33.3 | {BEYOND} |", f"| 0.25 lower bound | 33.3 | 0.0 | {BEYOND} |"]
