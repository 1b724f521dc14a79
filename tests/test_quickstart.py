"""The newcomer's path end to end, reduced: pre-train -> fine-tune -> certify through train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmae_lightning.certification import CertifyRecord
from dmae_lightning.certification.records import read_records

REPO = Path(__file__).resolve().parents[1]


def run_quickstart(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",  # the reduced stage lists below would make a long directory name
        'quickstart.pretrain=["experiment=pretrain_digits","trainer.max_epochs=3"]',
        'quickstart.finetune=["experiment=finetune_digits","trainer.max_epochs=6"]',
        'quickstart.certify=["data=digits","model=vit_micro_patch8","split=test","noise=sigma_0.25","n0=20","n=200","max=60","batch=220"]',
        *extra,
    ]
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
        timeout=600,
    )


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end_and_rerun_skips_finished_stages(tmp_path):
    run = tmp_path / "quickstart"
    proc = run_quickstart(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (
        run / "pretrain" / "checkpoints" / "last.ckpt",
        run / "pretrain" / "pictures" / "reconstruction_final.png",
        run / "finetune" / "checkpoints" / "last.ckpt",
        run / "certify" / "certify.tsv",
        run / "certify" / "summary.json",
        run / "certify" / "certified_accuracy.png",
    ):
        assert path.is_file(), path
    records = read_records(run / "certify" / "certify.tsv", CertifyRecord)
    summary = json.loads((run / "certify" / "summary.json").read_text())
    assert [r.idx for r in records] == list(range(60)) and summary["num_images"] == 60
    # Certified accuracy at r = 0, recomputed from the per-image file, is far above chance (10%).
    acc0 = sum(r.correct == 1 and r.radius >= 0 for r in records) / len(records)
    assert summary["certified_accuracy"]["0"] == pytest.approx(acc0)
    assert acc0 >= 0.5, acc0
    # The printed table and output paths.
    assert "| r=0 | r=0.25 | r=0.5 |" in proc.stdout and f"{100 * acc0:.1f}" in proc.stdout
    assert str(run / "certify" / "certify.tsv") in proc.stdout

    # Running again does not redo finished stages: no file is rewritten.
    mtimes = {
        p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.suffix in (".ckpt", ".tsv")
    }
    again = run_quickstart(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (again.stdout + again.stderr).count("already complete") == 3


@pytest.mark.slow
def test_quickstart_without_pretraining_is_the_baseline(tmp_path):
    run = tmp_path / "quickstart-scratch"
    proc = run_quickstart(run, "pretrain=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "pretrain").exists()
    assert (run / "certify" / "summary.json").is_file()
    assert "fine-tuning from scratch" in proc.stdout
