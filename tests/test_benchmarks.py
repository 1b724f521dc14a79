"""The benchmark scripts' output (issue 17.4.6c): a run writes to a git-ignored folder by default, and replaces
a tracked record under benchmarks/results/ only when --out names it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402  (benchmarks/common.py: the scripts import it the same way)


def test_results_go_to_an_ignored_folder_unless_out_names_a_file(tmp_path, monkeypatch):
    tracked = sorted(p.name for p in common.RESULTS.glob("*.json"))
    assert "certify_throughput_cpu.json" in tracked
    monkeypatch.setattr(
        common, "LOCAL_RESULTS", tmp_path / "local"
    )  # the same rule, without touching the repo
    path = common.write_results(None, "certify_throughput_cpu.json", {"device": "cpu"}, [{"x": 1}])
    assert path == tmp_path / "local" / "certify_throughput_cpu.json"
    assert json.loads(path.read_text()) == {"meta": {"device": "cpu"}, "results": [{"x": 1}]}
    chosen = common.write_results(str(tmp_path / "mine.json"), "ignored.json", {}, [])
    assert chosen == tmp_path / "mine.json" and chosen.exists()
    # The default folder in the repository is git-ignored; the tracked records are not.
    default = (REPO / "benchmarks" / "results" / "local" / "certify_throughput_cpu.json").relative_to(REPO)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(default)], cwd=REPO)
    assert ignored.returncode == 0, f"{default} is not git-ignored"
    record = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/certify_throughput_cpu.json"], cwd=REPO
    )
    assert record.returncode == 1


@pytest.mark.slow  # ~20 s: one tiny fine-tuning, certification and attack per objective asked for
def test_methods_digits_runs_the_three_jobs_and_tabulates(tmp_path, monkeypatch, capsys):
    """benchmarks/methods_digits.py end to end on a tiny budget: the table has the objective's row with the
    numbers of the runs' own summary.json files, and the cross-check passes."""
    import methods_digits

    out = tmp_path / "methods.json"
    args = [
        "--objectives",
        "gaussian",
        "--epochs",
        "1",
        "--n",
        "50",
        "--max",
        "8",
        "--work",
        str(tmp_path / "w"),
    ]
    assert methods_digits.main([*args, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    summary = json.loads((tmp_path / "w" / "gaussian_seed0" / "certify" / "summary.json").read_text())
    assert row["certified_accuracy"]["0.25"] == summary["certified_accuracy"]["0.25"] and row["sound"]
    printed = capsys.readouterr().out
    assert f"| gaussian | 1 | {100 * row['certified_accuracy']['0']:.1f} |" in printed
