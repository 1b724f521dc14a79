"""The analysis CLI on fake run directories: per-sigma rows, best-over-sigma envelope, written files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dmae_lightning.analyze import main
from dmae_lightning.results import ABSTAIN, Record, ShardWriter, summary_metrics, write_summary

RADII = (0.0, 0.25, 0.5, 1.0)


def make_run(run_dir, sigma, radii_correct, dataset="cifar10"):
    """A run directory whose images are certified with the given (radius, correct) pairs."""
    records = [
        Record(i, 1, 1 if correct else ABSTAIN, radius, int(correct), 900, 1000, 0.1)
        for i, (radius, correct) in enumerate(radii_correct)
    ]
    with ShardWriter(run_dir / "certify.tsv") as writer:
        for record in records:
            writer.write(record)
    write_summary(
        run_dir / "summary.json", sigma=sigma, n0=100, n=1000, alpha=0.001, seed=0, precision="fp32",
        checkpoint="ckpt.pth", checkpoint_sha256="0" * 64, dataset=dataset, subset="test", wall_time_s=1.0,
        skip_wrong_guess=False, **summary_metrics(records, RADII),
    )  # fmt: skip
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    # sigma 0.25: many small radii; sigma 0.5: fewer images, larger radii.
    low = make_run(tmp_path / "s025", 0.25, [(0.1, 1), (0.3, 1), (0.3, 1), (0.6, 1), (0.0, 0)])
    high = make_run(tmp_path / "s050", 0.5, [(0.2, 1), (0.6, 1), (1.1, 1), (0.0, 0), (0.0, 0)])
    return low, high


def test_envelope_is_the_best_per_radius(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    # runs given in any order; default radii would be CIFAR-10's (0.75 included)
    assert (
        main([str(two_runs[1]), str(two_runs[0]), "--radii", "0", "0.25", "0.5", "1", "--out", str(out)]) == 0
    )
    # at r = 0, 0.25, 0.5, 1: sigma 0.25 -> 80, 60, 20, 0; sigma 0.5 -> 60, 40, 40, 20; best -> 80, 60, 40, 20
    expected_md = (
        "| sigma | r=0 | r=0.25 | r=0.5 | r=1 |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| 0.25 | 80.0 | 60.0 | 20.0 | 0.0 |\n"
        "| 0.5 | 60.0 | 40.0 | 40.0 | 20.0 |\n"
        "| best | 80.0 | 60.0 | 40.0 | 20.0 |\n"
    )
    assert (out / "certified_accuracy.md").read_text() == expected_md
    tex = (out / "certified_accuracy.tex").read_text()
    assert "best & 80.0 & 60.0 & 40.0 & 20.0 \\\\" in tex and "$r=0.25$" in tex
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert expected_md.strip() in printed and "\\begin{tabular}{lrrrr}" in printed


def test_explicit_radii_and_single_run(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out is the current directory
    assert main([str(two_runs[0]), "--radii", "0.3", "0.6"]) == 0
    assert (tmp_path / "certified_accuracy.md").read_text().splitlines()[2:] == ["| 0.25 | 60.0 | 20.0 |"]


def test_default_radii_follow_the_dataset(tmp_path):
    run = make_run(tmp_path / "imagenet", 1.0, [(3.5, 1), (1.2, 1)], dataset="imagenet")
    assert main([str(run), "--out", str(tmp_path)]) == 0
    header = (tmp_path / "certified_accuracy.md").read_text().splitlines()[0]
    assert header == "| sigma | r=0 | r=0.5 | r=1 | r=1.5 | r=2 | r=3 |"


def test_directory_without_results_is_a_one_line_error(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(two_runs[0]), str(empty), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"analyze: error: {empty}: no certification results (certify.tsv and summary.json missing)\n"
    )
    assert not (tmp_path / "report").exists()


def test_runs_as_a_module(two_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dmae_lightning.analyze", *map(str, two_runs), "--radii", "0", "0.5"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert "| best | 80.0 | 40.0 |" in result.stdout
