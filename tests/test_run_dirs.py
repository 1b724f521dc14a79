"""Run directories (issue 14.1, 14.9; issue 12.10, 12.11): named by what the job computes, never shared by two
configurations, refused when they hold another configuration's results, checked before anything is loaded,
created only for a valid job, and a full disk ends in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import CONF, REPO
from helpers.scripts import run_script
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dmae_lightning.jobs.rundir import run_dir
from dmae_lightning.models import create_model

TINY = ("data.subset_first=64", "data.batch_size=32", "trainer.max_epochs=1")


def hydra_run_dir(overrides: list[str], config_name: str = "train") -> Path:
    """The run directory Hydra would create for ``python train.py <overrides>``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return Path(OmegaConf.select(cfg, "hydra.run.dir"))


def save_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(create_model("vit_micro_patch8", num_classes=10).state_dict(), path)
    return path


def run_train(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("train.py", args, cwd, timeout=timeout)


def snapshot(path: Path) -> dict:
    """Every entry below ``path`` with its content and modification time."""
    return {
        p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
    }


@contextmanager
def unwritable(path: Path):
    """A directory nobody can write to: chmod for a user; root passes permission checks, so for root the
    immutable attribute, which stops root too."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip(
                "running as root on a file system without chattr +i: cannot make a directory unwritable"
            )
        undo = ["chattr", "-i", str(path)]
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        undo = None
    try:
        yield path
    finally:
        subprocess.run(undo, check=True) if undo else path.chmod(mode)


def test_run_directory_is_a_function_of_the_resolved_config(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    a, b = save_weights(tmp_path / "a.pth", 0), save_weights(tmp_path / "b.pth", 1)
    (tmp_path / "link.pth").symlink_to(a)
    base = ["experiment=finetune_digits", f"paths.log_dir={tmp_path / 'logs'}"]
    plain = hydra_run_dir(base)
    assert plain.parent == tmp_path / "logs" / "finetune_digits_sigma0.25" and len(plain.name) == 8
    # Typing a default, or where/how the job runs, does not change the directory.
    assert (
        hydra_run_dir(
            [
                *base,
                "data=digits",
                "noise=sigma_0.25",
                "hardware=cpu",
                "logger=none",
                "data.num_workers=0",
                "ckpt_path=last",
            ]
        )
        == plain
    )
    # Everything that changes the results does, the initial weights by content.
    variants = {
        "pretrained a": [*base, f"pretrained={a}"],
        "pretrained b": [*base, f"pretrained={b}"],
        "two devices": [*base, "trainer.devices=2", "trainer.strategy=ddp"],
        "seed": [*base, "seed=1"],
        "epochs": [*base, "trainer.max_epochs=5"],
        "lambda": [*base, "objective.lbd=4"],
    }
    dirs = {name: hydra_run_dir(overrides) for name, overrides in variants.items()}
    assert len({plain, *dirs.values()}) == 1 + len(variants), dirs
    assert hydra_run_dir([*base, f"pretrained={tmp_path / 'link.pth'}"]) == dirs["pretrained a"]
    # Inside a SLURM job every rank and restart resolves the job's directory: the same key below slurm-<id>.
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert hydra_run_dir(base) == plain.parent / "slurm-1234" / plain.name
    assert run_dir("logs/x", "k") == "logs/x/slurm-1234/k"


@pytest.mark.slow  # ~8 s: a fresh python train.py (torch + Lightning imports)
def test_cfg_hydra_resolve_prints_without_error(tmp_path):
    proc = run_train(["experiment=pretrain_digits", "--cfg", "hydra", "--resolve"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decided when the job runs" in proc.stdout and not (tmp_path / "logs").exists()


@pytest.mark.slow  # ~25 s: two tiny fine-tuning jobs in one sweep
def test_sweep_over_initial_weights_gives_two_directories_and_a_latest_link(tmp_path):
    weights = save_weights(tmp_path / "w.pth", 0)
    proc = run_train(["-m", "experiment=finetune_digits", *TINY, f"pretrained=null,{weights}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = tmp_path / "logs" / "finetune_digits_sigma0.25"
    dirs = sorted(p.parent.parent for p in home.glob("multirun/*/.hydra/identity.json"))
    assert len(dirs) == 2, dirs
    initial = {
        json.loads((d / ".hydra" / "identity.json").read_text())["identity"]["pretrained"] for d in dirs
    }
    assert initial == {None, "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()}
    for d in dirs:
        assert "last.ckpt" in [
            p.name for p in (d / "checkpoints").iterdir()
        ]  # each point its own checkpoints
        assert len((d / "csv" / "metrics.csv").read_text().splitlines()) > 1
        assert proc.stdout.count(f"run directory: {d}") == 1  # at the start
        assert proc.stdout.count(f"finished: {d} (also {home / 'latest'})") == 1
    assert (home / "latest").resolve() in dirs and (home / "latest" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # ~45 s on a loaded 2-core machine: one tiny pre-training, then starts that stop at once
def test_full_disk_refused_and_unwritable_run_directories(tmp_path):
    run = tmp_path / "run"
    # A full disk while training: one line saying how to resume. The final picture goes to /dev/full, which
    # fails every write with ENOSPC, as a full disk does.
    (run / "pictures").mkdir(parents=True)
    (run / "pictures" / "reconstruction_final.png").symlink_to("/dev/full")
    full = run_train(["experiment=pretrain_digits", *TINY, f"hydra.run.dir={run}"], tmp_path)
    assert full.returncode == 1
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the device of {run}: what was written before is kept; free some space, "
        "then rerun the same command to resume"
    )
    assert (run / ".hydra" / "config.yaml").is_file()
    before = snapshot(run)

    # Another configuration into the same directory: one line, nothing rewritten (.hydra/ included).
    other = run_train(
        ["experiment=pretrain_digits", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}"], tmp_path
    )
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        f"error: {run} holds the results of another configuration (trainer.max_epochs: 1 -> 2): "
        "choose another run directory or remove it"
    ]
    assert snapshot(run) == before

    # A run directory that cannot be written: one line, before any data or model is loaded.
    with unwritable(run / "pictures"):
        proc = run_train(
            ["experiment=pretrain_digits", *TINY, f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot write to {run / 'pictures'} (permissions or a read-only file system): "
        "fix its permissions or choose another paths.log_dir"
    ]
    assert snapshot(run) == before
    # ... or whose parent cannot be: Hydra's mkdir would fail with a traceback.
    (tmp_path / "ro").mkdir()
    with unwritable(tmp_path / "ro"):
        proc = run_train(
            ["experiment=pretrain_digits", *TINY, f"paths.log_dir={tmp_path / 'ro' / 'logs'}"], tmp_path
        )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
        proc.stderr.startswith("error: cannot create the run directory")
        and "ro is not writable" in proc.stderr
    )


@pytest.mark.slow  # 7 subprocesses of ~7.5 s each (torch + Lightning imports); the suite's quick run has no room
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=finetune_digits", "pretrained=missing.ckpt"],
            "error: checkpoint missing.ckpt does not exist",
        ),
        (
            ["experiment=finetune_imagenet_vit_base"],
            "error: this experiment needs pretrained=... on the command line",
        ),
        (
            ["experiment=quickstart", "pretrained=x.ckpt"],
            "error: quickstart: pretrained=x.ckpt is not accepted",
        ),
        (
            ["experiment=quickstart", "+foo=1"],
            "error: +foo=1: the train config has no key 'foo' and nothing reads it",
        ),
        (["experiment=pretrain_digits", "+max_epoch=1"], "error: +max_epoch=1: the train config has no key"),
        pytest.param(
            ["experiment=pretrain_digits", "hardware=gpu"],
            "error: No supported gpu backend found!",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
        pytest.param(
            ["experiment=quickstart", "hardware=gpu"],
            "error: No supported gpu backend found!",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_invalid_job_leaves_no_run_directory(overrides, message, tmp_path):
    proc = run_train(overrides, tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert not (tmp_path / "logs").exists(), sorted((tmp_path / "logs").rglob("*"))


@pytest.mark.slow  # ~8 s: a fresh python certify.py (torch + Lightning imports)
def test_certify_refuses_an_added_key_nothing_reads(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "certify.py"), "weights=x.ckpt", "+n_samples=10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: +n_samples=10: the certify config has no key 'n_samples' and nothing reads it: "
        "remove it or correct its name"
    ]
    assert not (tmp_path / "logs").exists(), sorted((tmp_path / "logs").rglob("*"))


@pytest.mark.parametrize(
    "overrides",
    [["objective=gaussian", "+trainer.limit_val_batches=2"], ["noise=sigma_0.5", "objective.eta=1"]],
)
def test_top_level_keys_of_groups_and_dotted_additions_are_not_refused(overrides, tmp_path):
    """The task group adds the ``objective`` group at the top level; dotted additions are Hydra's."""
    from dmae_lightning.jobs.rundir import _refuse_unread_additions

    hydra_run_dir(["experiment=finetune_digits", *overrides])  # composes and sets HydraConfig
    _refuse_unread_additions()


def test_damaged_records_links_and_files_in_the_way_are_one_line(tmp_path, caplog):
    """Issue 22: a garbage .hydra/identity.json (JSON traceback), a read-only metrics.csv on resume (112 lines),
    logs/<run>/latest being a user's real directory (traceback, and a .latest.tmp link left) and paths.log_dir
    being a file (traceback from Hydra's mkdir)."""
    from dmae_lightning.errors import ConfigError
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.train import train

    overrides = ["experiment=pretrain_digits", *TINY, f"paths.log_dir={tmp_path / 'logs'}", "run_name=r"]
    run = tmp_path / "logs" / "r" / "key"
    (tmp_path / "logs" / "r" / "latest").mkdir(parents=True)  # a user's copy where the link goes
    with caplog.at_level("WARNING"):
        train(compose(CONF, "train", overrides, output_dir=run))
    assert "is a real directory, not the link this job keeps" in caplog.text
    assert sorted(p.name for p in (tmp_path / "logs" / "r").iterdir()) == ["key", "latest"]
    assert (tmp_path / "logs" / "r" / "latest").is_dir() and not (
        tmp_path / "logs" / "r" / "latest"
    ).is_symlink()

    (run / "finished.json").unlink()  # as if interrupted: a resume appends to metrics.csv
    with unwritable(run / "csv" / "metrics.csv"):
        with pytest.raises(
            ConfigError, match=f"^cannot write to {run / 'csv' / 'metrics.csv'} \\(permissions"
        ):
            train(compose(CONF, "train", overrides, output_dir=run))
    identity = run / ".hydra" / "identity.json"
    identity.write_text('{"key": "abc", "identity": ')
    with pytest.raises(
        ConfigError, match=f"^{identity} is damaged \\(.*\\): it says which configuration {run} holds"
    ):
        train(compose(CONF, "train", overrides, output_dir=run))

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(
        SystemExit,
        match=f"cannot create the run directory .*: {tmp_path / 'file'} is a file, not a "
        "directory; choose another paths.log_dir",
    ):
        hydra_run_dir(["experiment=pretrain_digits", f"paths.log_dir={tmp_path / 'file'}"])


def test_a_job_refused_while_it_was_built_leaves_no_directory_even_with_a_log(tmp_path):
    """Issue 22: certify.py with a discrete noise on digits refused in one line but left a run directory holding
    certify.log (only an empty job log was removed)."""
    from dmae_lightning.errors import ConfigError
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.rundir import run_in_dir

    run = tmp_path / "logs" / "certify_x" / "key"
    cfg = compose(CONF, "certify", ["weights=x.ckpt", "noise=sigma_0.25"], output_dir=run)

    def build():
        (run / "certify.log").write_text(
            "[INFO] loading the checkpoint\n"
        )  # what Hydra's job log holds by then
        raise ConfigError("noise discrete_sigma0.25 on digits: discrete noise needs 8-bit images")

    with pytest.raises(ConfigError):
        run_in_dir(cfg, build, lambda built: built, resume_hint="")
    assert not (tmp_path / "logs").exists(), sorted((tmp_path / "logs").rglob("*"))


def test_a_full_disk_met_while_staging_elsewhere_names_the_run_directory(tmp_path):
    """Issue 22: the one-line full-disk error named a staging file in $TMPDIR, not the run directory."""
    import errno

    from dmae_lightning.errors import ConfigError
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.rundir import run_in_dir

    run = tmp_path / "run"
    cfg = compose(CONF, "certify", ["weights=x.ckpt", "noise=sigma_0.25"], output_dir=run)

    def fill(built):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpab12cd/staged.ckpt")

    with pytest.raises(
        ConfigError,
        match=rf"^no space left on the device of {run} \(while writing "
        r"/tmp/tmpab12cd/staged.ckpt\): what was written before is kept",
    ):
        run_in_dir(cfg, lambda: None, fill, resume_hint="rerun the same command to resume")
