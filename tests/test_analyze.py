"""The analysis CLI on fake run directories: per-sigma rows, the envelope only within like runs, skipped
non-result paths, where the files go."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers.rundirs import make_run

from dmae_lightning.certification.records import RadiiRecord, ShardWriter, read_json, write_json
from dmae_lightning.jobs.analyze import main


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
        "### all runs: vit_b on cifar10 test, 5 images, n=1000, alpha=0.001\n\n"
        "| sigma | r=0 | r=0.25 | r=0.5 | r=1 | ACR |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
        "| 0.25 | 80.0 | 60.0 | 20.0 | 0.0 | 0.260 |\n"  # ACR (0.1 + 0.3 + 0.3 + 0.6) / 5
        "| 0.5 | 60.0 | 40.0 | 40.0 | 20.0 | 0.380 |\n"  # (0.2 + 0.6 + 1.1) / 5
        "| best | 80.0 | 60.0 | 40.0 | 20.0 |  |\n"
        "| 0.25 lower bound | 60.0 | 40.0 | 0.0 | 0.0 |  |\n"
        "| 0.5 lower bound | 40.0 | 20.0 | 20.0 | 0.0 |  |\n\n"
        "lower bound: the true certified accuracy is at least this with probability 1 - rho = 0.999 "
        "(at most 1 of the 5 certificates false)\n"
    )  # lower bounds: k* = 1 (P(Bin(5, 0.001) > 1) = 1e-5 <= rho = 0.001 < P(Bin(5, 0.001) > 0)), no envelope
    assert (out / "analysis.md").read_text() == expected_md
    tex = (out / "analysis.tex").read_text()
    assert (
        "best & 80.0 & 60.0 & 40.0 & 20.0 &  \\\\" in tex
        and "0.25 & 80.0 & 60.0 & 20.0 & 0.0 & 0.260" in tex
        and "$r=0.25$" in tex
    )
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert expected_md.strip() in printed and "\\begin{tabular}{lrrrrr}" in printed


def test_explicit_radii_and_single_run_written_next_to_it(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "s050")  # not the current directory: next to the input
    assert main([str(two_runs[0]), "--radii", "0.3", "0.6"]) == 0
    assert (two_runs[0] / "analysis.md").read_text().splitlines()[4:6] == [
        "| 0.25 | 60.0 | 20.0 | 0.260 |",
        "| 0.25 lower bound | 40.0 | 0.0 |  |",
    ]
    assert not (tmp_path / "s050" / "analysis.md").exists()


def test_default_radii_follow_the_dataset(tmp_path):
    run = make_run(tmp_path / "imagenet", 1.0, [(3.5, 1), (1.2, 1)], dataset="imagenet", radii=None)
    assert main([str(run), "--out", str(tmp_path)]) == 0
    header = (tmp_path / "analysis.md").read_text().splitlines()[2]
    assert header == "| sigma | r=0 | r=0.5 | r=1 | r=1.5 | r=2 | r=3 | ACR |"


def test_non_result_paths_are_skipped_with_a_note(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"  # a run that stopped on a config error
    empty.mkdir()
    multirun_yaml = tmp_path / "multirun.yaml"
    multirun_yaml.write_text("hydra: {}\n")
    assert main([str(two_runs[0]), str(empty), str(multirun_yaml), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"analyze: skipping {empty}: not a finished certification run (no summary.json)" in err
    assert f"analyze: skipping {multirun_yaml}: not a finished certification run" in err
    assert main([str(empty), "--out", str(tmp_path / "nothing")]) == 2
    assert "none of the paths holds a finished certification run" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_unlike_runs_never_share_an_envelope(two_runs, tmp_path):
    """Another model and a 2-image subset at another n: separate tables, labelled by what differs."""
    other = make_run(tmp_path / "other", 0.25, [(0.9, 1), (0.9, 1)], model_name="vit_l", n=100)
    out = tmp_path / "report"
    assert main([*map(str, two_runs), str(other), "--radii", "0", "0.5", "--out", str(out)]) == 0
    text = (out / "analysis.md").read_text()
    tables = text.split("### ")[1:]
    assert len(tables) == 2
    like = next(t for t in tables if t.startswith("model_name=vit_b, n=1000"))
    unlike = next(t for t in tables if t.startswith("model_name=vit_l, n=100"))
    assert "| best | 80.0 | 40.0 |  |" in like  # the envelope of the two vit_b runs only
    assert "best" not in unlike and "| 0.25 | 100.0 | 100.0 | 0.900 |" in unlike
    assert {p.name for p in out.glob("*.png")} == {"analysis_1.png", "analysis_2.png"}


def test_another_noise_distribution_is_another_table(two_runs, tmp_path):
    """A discrete-Gaussian run at sigma 0.25 is not a row of the Gaussian runs' table, nor in their envelope."""
    discrete = {"_target_": "dmae_lightning.noise.DiscreteGaussianNoise", "sigma": 0.25}
    other = make_run(tmp_path / "discrete", 0.25, [(0.9, 1), (0.9, 1)], noise=discrete)
    out = tmp_path / "report"
    assert main([*map(str, two_runs), str(other), "--radii", "0", "0.5", "--out", str(out)]) == 0
    tables = (out / "analysis.md").read_text().split("### ")[1:]
    assert len(tables) == 2 and {t.split(",")[0].split(":")[0] for t in tables} == {
        "noise=dmae_lightning.noise.GaussianNoise",
        "noise=dmae_lightning.noise.DiscreteGaussianNoise",
    }


@pytest.mark.slow  # ~6 s: a fresh python -m dmae_lightning.jobs.analyze
def test_runs_as_a_module(two_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dmae_lightning.jobs.analyze", *map(str, two_runs), "--radii", "0", "0.5"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert "| best | 80.0 | 40.0 |  |" in result.stdout


def test_sequential_runs_show_their_samples_and_saving(tmp_path):
    """A certify_radii run (in an older summary.json: "mode", "batch"): its samples and their saving against
    fixed n, and no ACR (its grid radii give none comparable with CERTIFY's)."""
    run = tmp_path / "seq"
    with ShardWriter(run / "certify_radii.tsv", RadiiRecord) as writer:
        for i, radius in enumerate((0.5, 0.25, None, 0.5)):
            writer.write(RadiiRecord(i, 1, radius, 1000, 0.9, 1.0, 0.0))
    summary = read_json(make_run(tmp_path / "fixed", 0.25, [(0.5, 1)]) / "summary.json")
    summary = {k: v for k, v in summary.items() if k != "procedure"}
    summary.update(mode="certify_radii", batch=100, radii=[0.0, 0.25, 0.5], num_images=4, samples=4_000)
    summary.update(samples_at_cap=4, fixed_n_samples=40_400, saving_vs_fixed_n=10.1)
    write_json(run / "summary.json", summary)
    assert main([str(run), "--radii", "0", "0.5", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "analysis.md").read_text()
    assert "| 0.25 | 75.0 | 50.0 |\n" in text and "ACR" not in text and "cap n=1000" in text
    assert "- sigma=0.25: 4,000 noisy samples (1,000 per image, 10.1x fewer than fixed n)" in text


def test_several_latest_links_of_one_sigma_give_one_row_each(tmp_path, capsys):
    """Issue 22.3: run_a/latest, run_b/latest and run_c/latest (three runs, one sigma) gave two rows, one run's
    row overwritten by another's. Links resolve to their run directories; a run given twice counts once."""
    links = []
    for name, correct in (("run_a", 1), ("run_b", 0), ("run_c", 1)):
        target = make_run(tmp_path / name / "3f2a1b4c", 0.25, [(0.3, correct), (0.1 * correct, correct)])
        (tmp_path / name / "latest").symlink_to(target.name, target_is_directory=True)
        links.append(tmp_path / name / "latest")
    out = tmp_path / "report"
    assert (
        main([*map(str, links), str(tmp_path / "run_a" / "3f2a1b4c"), "--radii", "0", "--out", str(out)]) == 0
    )
    text = (out / "analysis.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0.25") and "lower bound" not in line]
    assert rows == [  # ACR (0.3 + 0.1) / 2 for the runs that got both images right
        "| 0.25 (run_a/3f2a1b4c) | 100.0 | 0.200 |",
        "| 0.25 (run_b/3f2a1b4c) | 0.0 | 0.000 |",
        "| 0.25 (run_c/3f2a1b4c) | 100.0 | 0.200 |",
    ]
    assert len([line for line in text.splitlines() if line.startswith("| 0.25 (run_")]) == 6  # + lower bounds
    assert "is the run" in capsys.readouterr().err and "counted once" not in text


@pytest.mark.skipif(
    not os.access("/dev/shm", os.W_OK), reason="needs a second top-level directory (/dev/shm)"
)
def test_runs_sharing_only_the_root_need_out(tmp_path, capsys):
    """Issue 22: two runs in different top-level directories without --out tried to write /analysis.png."""
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        runs = [make_run(tmp_path / "a", 0.25, [(0.3, 1)]), make_run(elsewhere / "b", 0.5, [(0.3, 1)])]
        assert main(list(map(str, runs))) == 2
    finally:
        shutil.rmtree(elsewhere)
    assert "the runs share no directory but /: name one with --out" in capsys.readouterr().err


def test_damaged_summaries_and_an_unwritable_out_are_one_line(two_runs, tmp_path, capsys):
    """Issue 22: summary.json holding a list, sigma="half" or cut in half, and --out unwritable."""
    bad = {}
    for name, text in (("list", "[1, 2]"), ("half", None), ("cut", None)):
        run = make_run(tmp_path / name, 0.25, [(0.3, 1)])
        summary = run / "summary.json"
        if name == "half":
            summary.write_text(summary.read_text().replace('"sigma": 0.25', '"sigma": "half"'))
        else:
            summary.write_text(text or summary.read_text()[:40])
        bad[name] = summary
    assert (
        main([*map(str, two_runs), *(str(p.parent) for p in bad.values()), "--out", str(tmp_path / "r")]) == 0
    )
    err = capsys.readouterr().err
    assert f"analyze: skipping {bad['list']}: a JSON list, not a run summary" in err
    assert f"analyze: skipping {bad['half']}: sigma must be a number > 0, got 'half'" in err
    assert f"analyze: skipping {bad['cut']}: damaged (" in err and "Traceback" not in err
    (tmp_path / "file").write_text("")
    assert main([str(two_runs[0]), "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "analyze: error: cannot write the tables to" in capsys.readouterr().err
