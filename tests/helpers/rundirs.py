"""Run directories in tests: a fake certification run (``make_run``) and the one run directory that a job
wrote under a logs folder (``single_run_dir``)."""

from __future__ import annotations

from pathlib import Path

from dmae_lightning.certification.metrics import certified_accuracy
from dmae_lightning.certification.records import ABSTAIN, CertifyRecord, ShardWriter, write_json

RADII = (0.0, 0.25, 0.5, 1.0)


def make_run(run_dir, sigma, radii_correct, dataset="cifar10", **settings):
    """A run directory whose images are certified with the given (radius, correct) pairs."""
    records = [
        CertifyRecord(i, 1, 1 if correct else ABSTAIN, radius, int(correct), 900, 1000, 0.1)
        for i, (radius, correct) in enumerate(radii_correct)
    ]
    with ShardWriter(run_dir / "certify.tsv", CertifyRecord) as writer:
        for record in records:
            writer.write(record)
    summary = dict(
        procedure="certify", sigma=sigma, noise={"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": sigma}, n0=100, n=1000, alpha=0.001, seed=0, precision="32-true", model_name="vit_b",
        dataset=dataset, split="test", subset={"skip": 1, "max": None}, data_subset=None, radii=list(RADII),
        num_images=len(records), certified_accuracy=certified_accuracy(records, RADII), max_certifiable_radius=9.0,
    )  # fmt: skip
    write_json(run_dir / "summary.json", {**summary, **settings})
    return run_dir


def single_run_dir(logs: Path, ignore: list[Path] | tuple[Path, ...] = ()) -> Path:
    """The one run directory under ``logs``: it holds the only .hydra folder and every file written
    (except the files in ``ignore``, e.g. a SLURM job's output file)."""
    hydra_dirs = [p for p in logs.rglob(".hydra") if p.is_dir()]
    assert len(hydra_dirs) == 1, hydra_dirs
    run_dir = hydra_dirs[0].parent
    skip = {Path(p) for p in ignore}
    stray = [p for p in logs.rglob("*") if p.is_file() and run_dir not in p.parents and p not in skip]
    assert not stray, f"files outside the run directory {run_dir}: {stray}"
    return run_dir
