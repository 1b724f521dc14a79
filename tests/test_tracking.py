"""Sweeps and experiment tracking through the root ``train.py``: Hydra multiruns (each point its own run
directory), Weights & Biases in offline mode (no account, no network: the offline run files are read
back), the submitit launcher's composition, and the trackers' requeue behaviour."""

from __future__ import annotations

import csv
import json
import re
import struct
from pathlib import Path

import pytest
from helpers import CONF
from helpers.scripts import OUTSIDE, clean_env, run_script
from omegaconf import OmegaConf

from dmae_lightning.jobs import tracking

TINY = ("model=vit_micro_patch8", "data.subset_first=64", "data.batch_size=16")


def run_train(args: list[str], cwd: Path, timeout: float = 300, **env_extra: str) -> str:
    proc = run_script("train.py", args, cwd, clean_env((*OUTSIDE, "WANDB_"), **env_extra), timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-8000:]}"
    return out


def run_dirs(logs: Path) -> list[Path]:
    """Every job's run directory (the parent of its .hydra folder)."""
    return sorted(p.parent for p in logs.rglob(".hydra") if p.is_dir())


# ----------------------------------------------------------------------------------------- W&B files
def wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` (W&B's LevelDB-style log of protobuf Records:
    a 7-byte file header, then 32 KiB blocks of records with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            out.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            out.append(pending + chunk)
            pending = b""
    return [pb.Record.FromString(chunk) for chunk in out]


def read_offline_run(run_dir: Path) -> dict:
    """run record fields, the merged config, history rows and the exit code of the run in ``run_dir``."""
    files = sorted({p.resolve() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")})
    assert len(files) == 1, files
    info: dict = {"dir": files[0].parent, "config": {}, "history": [], "exit_code": None}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            info |= dict(
                id=run.run_id,
                name=run.display_name,
                group=run.run_group,
                tags=list(run.tags),
                job_type=run.job_type,
                project=run.project,
            )
            updates = run.config.update
        elif kind == "config":
            updates = rec.config.update
        else:
            updates = ()
            if kind == "history":
                info["history"].append(
                    {item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item}
                )
            elif kind == "exit":
                info["exit_code"] = rec.exit.exit_code
        for item in updates:
            info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return info


def no_interpolations(value) -> bool:
    if isinstance(value, dict):
        return all(no_interpolations(v) for v in value.values())
    if isinstance(value, list):
        return all(no_interpolations(v) for v in value)
    return not (isinstance(value, str) and "${" in value)


@pytest.mark.slow  # ~25-35 s: one process, two jobs, two W&B offline runs
def test_wandb_offline_sweep_over_sigma_gives_one_run_per_point(tmp_path):
    out = run_train(
        [
            "-m",
            "experiment=pretrain_digits",
            *TINY,
            "noise=sigma_0.25,sigma_0.5",
            "+trainer.max_steps=2",
            "logger=wandb",
            "logger.project=dmae-test",
            "logger.tags=[sweep,ci]",
        ],
        tmp_path,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    logs = tmp_path / "logs"
    dirs = run_dirs(logs)
    assert len(dirs) == 2, (dirs, out[-3000:])
    runs = [read_offline_run(d) for d in dirs]
    by_sigma = {r["config"]["noise"]["sigma"]: (d, r) for d, r in zip(dirs, runs)}
    assert sorted(by_sigma) == [0.25, 0.5]
    for sigma, (run_dir, run) in by_sigma.items():
        # Each sweep point its own run directory under logs/<run_name>/multirun/ (run_name carries sigma).
        cfg = run["config"]
        assert run_dir.relative_to(logs).parts[:2] == (cfg["run_name"], "multirun"), run_dir
        # The full resolved job config is the W&B run config.
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
        assert set(saved) <= set(cfg), set(saved) - set(cfg)
        assert no_interpolations({k: cfg[k] for k in saved}), cfg
        assert cfg["noise"]["sigma"] == sigma and cfg["trainer"]["max_steps"] == 2
        assert Path(cfg["paths"]["output_dir"]) == run_dir.resolve()
        # Identity from the config; finished (exit 0) at the end of its job.
        assert run["project"] == "dmae-test" and run["tags"] == ["sweep", "ci"] and run["job_type"] == "train"
        assert run["name"] == run_dir.relative_to(logs).as_posix()
        assert run["exit_code"] == 0
        # Reconstruction pictures logged as W&B media (ReconstructionPictures -> WandbLogger.log_image).
        media = list((run["dir"] / "files" / "media" / "images").glob("reconstruction_*.png"))
        assert len(media) == 1, media
        assert any(media[0].name in row.get("reconstruction/filenames", "") for row in run["history"])
        assert run["dir"].parent == run_dir / "wandb"
    assert runs[0]["id"] != runs[1]["id"]  # two runs, not one run logged to twice
    assert runs[0]["group"] == runs[1]["group"] == "pretrain_digits_vit_micro_patch8"  # the sweep's group


@pytest.mark.slow  # ~20-30 s: one process, two fast_dev_run jobs
def test_local_sweep_over_consistency_weight_gives_each_point_its_directory(tmp_path):
    out = run_train(
        ["-m", "experiment=finetune_digits", *TINY, "objective.lbd=1,4", "+trainer.fast_dev_run=1"],
        tmp_path,
    )
    logs = tmp_path / "logs"
    dirs = run_dirs(logs)
    assert len(dirs) == 2, (dirs, out[-3000:])
    by_lbd = {OmegaConf.load(d / ".hydra" / "config.yaml").objective.lbd: d for d in dirs}
    assert sorted(by_lbd) == [1, 4], dirs
    for lbd, run_dir in by_lbd.items():  # logs/<run_name>/multirun/<key of the point's config>
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert run_dir.relative_to(logs).parts[:2] == (cfg.run_name, "multirun"), run_dir
        assert re.fullmatch(r"[0-9a-f]{8}", run_dir.name), run_dir
        assert f"objective.lbd={lbd}" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        assert cfg.objective.lbd == lbd and cfg.task.module.objective.lbd == lbd
        log_text = (run_dir / "train.log").read_text()
        assert log_text.count("run directory:") == 1 and log_text.count("finished:") == 1  # start and end


# ------------------------------------------------------------------------------ submitit (no cluster)
def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in run_name (part of the sweep directory)
    return cfg


def test_submitit_slurm_launcher_composes_with_lightning_owning_requeue():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional extra [slurm]")
    cfg = compose_with_hydra(
        [
            "hydra/launcher=slurm",
            "hardware=slurm",
            "trainer.num_nodes=4",
            "trainer.devices=8",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=720",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # One SLURM task per device, nodes from the trainer config.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 720)
    # Lightning owns requeue: Slurm signals USR1 (Lightning's requeue signal) instead of submitit's USR2,
    # and submitit never resubmits by itself.
    assert launcher.additional_parameters.signal == "USR1@90" and launcher.max_num_timeout == 0
    assert launcher.additional_parameters.requeue is True

    # The sbatch file submitit would write carries that signal only once and --requeue.
    from submitit.slurm.slurm import _make_sbatch_string

    params = OmegaConf.to_container(launcher, resolve=True)
    text = _make_sbatch_string(
        command="python -u -m submitit.core._submit x",
        folder="/tmp/x",
        nodes=4,
        ntasks_per_node=8,
        gpus_per_node=8,
        signal_delay_s=params["signal_delay_s"],
        additional_parameters=params["additional_parameters"],
    )
    assert [line for line in text.splitlines() if "--signal" in line] == ["#SBATCH --signal=USR1@90"], text
    assert "#SBATCH --requeue" in text.splitlines()


def test_submitit_local_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional extra [slurm]")
    cfg = compose_with_hydra(["hydra/launcher=submitit_local"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


# ------------------------------------------------------------------- requeue behaviour of the trackers
def test_wandb_run_id_is_stable_across_restarts_of_a_slurm_job(monkeypatch, tmp_path):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert tracking.wandb_run_id(tmp_path) is None  # outside SLURM: W&B draws a fresh id per job
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    first = tracking.wandb_run_id(tmp_path / "run")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert tracking.wandb_run_id(tmp_path / "run") == first and first.startswith("slurm-1234-")
    assert tracking.wandb_run_id(tmp_path / "other") != first  # another sweep point of the job
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert tracking.wandb_run_id(tmp_path / "run").startswith("slurm-77_3-")
    assert tracking.default_run_name(tmp_path / "a" / "multirun" / "x", tmp_path, "g") == "a/multirun/x"
    assert tracking.default_run_name(tmp_path, tmp_path, "g") == "g"


@pytest.mark.parametrize(("restart", "kept"), [("0", False), ("1", True)])
def test_csv_metrics_survive_a_requeue_restart(monkeypatch, tmp_path, restart, kept):
    def log_steps(steps):
        logger = tracking.ResumableCSVLogger(str(tmp_path), name="csv", version="")
        for step in steps:
            logger.log_metrics(
                {"train/loss": float(step)} | ({"val/loss": 1.0} if step == 3 else {}), step=step
            )
        logger.save()

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    log_steps([0, 1, 2])
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    log_steps([2, 3])  # the restart repeats step 2 (after the hpc checkpoint) and logs a new column
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == ([0, 1, 2, 2, 3] if kept else [2, 3])
    assert rows[-1]["val/loss"] == "1.0" and rows[0]["val/loss"] == ""
