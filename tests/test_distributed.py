"""Real 2-process DDP on the CPU (gloo) through the root ``train.py``, as a user runs it.

``hardware=cpu trainer.devices=2 trainer.strategy=ddp``: Lightning's subprocess launcher re-runs ``train.py``
for rank 1 with the same overrides plus ``hydra.run.dir=<rank 0's run dir> hydra.output_subdir=null``, so
both Hydra apps share one run directory. Checked here: exactly one run directory, one ``.hydra``, one job log
written by rank 0 only, one logger run, one checkpoint set, and ranks that drew different noise - observed
in the training steps by ``tests/helpers/probes.py`` (a test-only callback, on ``PYTHONPATH`` for the subprocesses)
and compared with the seeding design (seed, stream, rank, step, micro-batch).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TESTS
from helpers.probes import check_noise_per_rank, load_probes
from helpers.rundirs import single_run_dir
from helpers.scripts import clean_env, run_script

DDP = ("hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp")
# 64 images / 2 ranks / batch 16 = 2 steps per epoch: 3 steps cross an epoch end (last.ckpt is written).
SMALL = (
    "model=vit_micro_patch8",
    "data.subset_first=64",
    "data.batch_size=16",
    "+trainer.max_steps=3",
    "+callbacks.probe._target_=helpers.probes.NoiseProbe",
)


def subprocess_env(probe_dir: Path, **extra: str) -> dict[str, str]:
    """This environment minus any SLURM job of the caller, with tests/ importable (for helpers/probes.py)."""
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return clean_env(PYTHONPATH=pythonpath, DMAE_PROBE_DIR=str(probe_dir), **extra)


def run_train(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    proc = run_script("train.py", args, cwd, env, timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def check_one_run(logs: Path, out: str) -> Path:
    """One run directory, one .hydra, one job log (rank 0's), one CSV run, one checkpoint set."""
    run_dir = single_run_dir(logs)
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "identity.json",
        "overrides.yaml",
        "run.lock",
    ]
    logs_written = sorted(p.name for p in logs.rglob("*.log"))
    assert logs_written == ["train.log"], logs_written  # not train_ddp_process_1.log
    text = (run_dir / "train.log").read_text()
    assert text.count("probe log global_rank=0") == 1 and "probe log global_rank=1" not in text, text
    assert text.count("run directory:") == 1 and text.count("finished:") == 1, (
        text
    )  # at the start, at the end
    metrics = list(logs.rglob("metrics.csv"))
    assert metrics == [run_dir / "csv" / "metrics.csv"], metrics
    assert not list(logs.rglob("version_*")), "a second logger version"
    ckpts = sorted(p.relative_to(run_dir).as_posix() for p in logs.rglob("*.ckpt"))
    assert "checkpoints/last.ckpt" in ckpts and all(c.startswith("checkpoints/") for c in ckpts), ckpts
    assert not [c for c in ckpts if "-v" in c or "hpc_" in c], ckpts  # no second writer, no requeue file
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3, last["global_step"]
    # Lightning started a second process (rank 1) and both joined one gloo group of 2.
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out, out
    return run_dir


def check_two_processes(probes: dict) -> None:
    assert sorted(probes) == [(0, 0), (1, 0)], sorted(probes)
    assert len({p["pid"] for p in probes.values()}) == 2  # two processes, not one
    assert all(p["world_size"] == 2 and p["env"] == "LightningEnvironment" for p in probes.values())
    assert all(p["final_global_step"] == 3 for p in probes.values())


@pytest.mark.slow  # ~25-35 s: two processes import torch + Lightning one after the other
def test_ddp_pretraining_on_two_cpu_processes(tmp_path):
    probe_dir = tmp_path / "probe"
    proc = run_train(["experiment=pretrain_digits", *DDP, *SMALL], tmp_path, subprocess_env(probe_dir))
    out = proc.stdout + proc.stderr
    run_dir = check_one_run(tmp_path / "logs", out)
    assert (run_dir / "pictures" / "reconstruction_final.png").is_file()  # rank 0 only, no clash
    probes = load_probes(probe_dir)
    check_two_processes(probes)
    assert check_noise_per_rank(probes) == 3


@pytest.mark.slow  # ~25-35 s
def test_ddp_finetuning_on_two_cpu_processes(tmp_path):
    probe_dir = tmp_path / "probe"
    # Consistency regularisation on: m = 2 noisy copies per image, noise drawn for [2 x 16, 3, 32, 32].
    proc = run_train(["experiment=finetune_digits", *DDP, *SMALL], tmp_path, subprocess_env(probe_dir))
    out = proc.stdout + proc.stderr
    check_one_run(tmp_path / "logs", out)
    probes = load_probes(probe_dir)
    check_two_processes(probes)
    assert probes[(0, 0)]["records"][0]["shape"] == [32, 3, 32, 32]
    assert check_noise_per_rank(probes) == 3
