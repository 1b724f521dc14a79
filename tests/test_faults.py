"""Fault injection (issue 12): kills, damaged and malicious files, damaged data sets. Each section is one item
of the issue; every test reproduces the fault for real (SIGKILL of a training process, truncated files, a
pickle that would run code) and checks that nothing is lost and that bad input is one clear line."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from helpers import CONF, REPO
from helpers.scripts import clean_env
from PIL import Image

from dmae_lightning.data import BrokenImageError, CIFAR10DataModule, DataError, ImageNetDataModule
from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.rundir import RunDirLock
from dmae_lightning.jobs.tracking import ResumableCSVLogger
from dmae_lightning.jobs.train import build, train
from dmae_lightning.training.resume import resume_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

# The tiny pre-training of the kill test: 64 images / batch 16 = 4 steps per epoch.
STEPS_PER_EPOCH = 4
TINY = [
    "experiment=pretrain_digits",
    "data.subset_first=64",
    "data.batch_size=16",
    "data.augment=shift",  # random crops: the RNG states must come back too
    "trainer.log_every_n_steps=1",
    "task.module.optimizer.warmup_epochs=1",
    "callbacks.reconstruction_pictures.num_images=1",
    "logger=csv",
]


def subprocess_env() -> dict[str, str]:
    """This environment minus any SLURM job of the caller (a restart count would change the run)."""
    return clean_env()


def train_script(logs: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={logs}"],
        cwd=logs,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run_dir_of(logs: Path, run_name: str) -> Path:
    (hydra_dir,) = (logs / run_name).rglob(".hydra")
    return hydra_dir.parent


def lightning_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def latest_by_step(rows: list[dict], key: str) -> dict[int, str]:
    """``{step: value}`` of ``key``; where a step appears twice (run again after a resume) the later row wins."""
    return {int(r["step"]): r[key] for r in rows if r.get(key)}


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size, as a kill during a plain write would leave it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


# ============================================================================================== item 1
# A killed training run resumes: last.ckpt after every epoch, one earlier checkpoint kept.
# ============================================================================================== item 1
class CheckpointsAtEpochStart(pl.Callback):
    """Records, at the start of every epoch, the checkpoint files on disk and last.ckpt's global step."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer, pl_module):
        names = sorted(p.name for p in self.folder.glob("*.ckpt")) if self.folder.is_dir() else []
        last = self.folder / "last.ckpt"
        self.seen.append((names, lightning_ckpt(last)["global_step"] if last.exists() else None))


def test_last_checkpoint_after_every_epoch_and_one_earlier_kept(tmp_path):
    cfg = compose(CONF, "train", [*TINY, "trainer.max_epochs=3"], output_dir=tmp_path)
    datamodule, module, trainer = build(cfg)
    spy = CheckpointsAtEpochStart(tmp_path / "checkpoints")
    trainer.callbacks.append(spy)
    trainer.fit(module, datamodule=datamodule)
    step = [f"step{STEPS_PER_EPOCH * e:08d}.ckpt" for e in range(4)]
    assert spy.seen == [
        ([], None),
        (["last.ckpt", step[1]], 4),
        (["last.ckpt", step[1], step[2]], 8),
    ]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", step[2], step[3]]
    assert lightning_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert lightning_ckpt(tmp_path / "checkpoints" / step[2])["global_step"] == 8


def test_last_checkpoint_every_n_steps(tmp_path):
    """For long (ImageNet) epochs: every_n_train_steps instead of every epoch."""
    overrides = [
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_epochs=null",
        "callbacks.last_checkpoint.every_n_train_steps=3",
    ]
    datamodule, module, trainer = build(compose(CONF, "train", overrides, output_dir=tmp_path))
    trainer.fit(module, datamodule=datamodule)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [
        "last.ckpt",
        "step00000003.ckpt",
        "step00000006.ckpt",
    ]
    assert lightning_ckpt(folder / "last.ckpt")["global_step"] == 6


def wait_for_first_checkpoint(proc: subprocess.Popen, logs: Path, run_name: str) -> Path:
    deadline = time.monotonic() + 240
    last = None
    while last is None and proc.poll() is None and time.monotonic() < deadline:
        found = list((logs / run_name).rglob("checkpoints/last.ckpt"))
        last = found[0] if found else None
        time.sleep(0.05)
    assert last is not None and proc.poll() is None, "the run ended before its first checkpoint"
    return last


@pytest.mark.slow  # ~8 s without resume, more with: a fresh python train.py stopped with SIGTERM (and one resumed)
@pytest.mark.parametrize("resume", [(), ("ckpt_path=last",)])
def test_sigterm_mid_run_exits_nonzero_with_one_line(resume, tmp_path):
    """SIGTERM (a scheduler's or `kill`'s) of a real ``python train.py``: Lightning stops at the next step with a
    bare SystemExit (status 0, silence); the job must say it was interrupted and how to resume (issue 17.4.2)."""
    proc = train_script(tmp_path, *TINY, "trainer.max_epochs=1000", "run_name=termed", *resume)
    wait_for_first_checkpoint(proc, tmp_path, "termed")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err


@pytest.mark.slow  # ~20 s: two train.py processes (torch + Lightning imports), one stopped with SIGINT
def test_a_second_job_on_a_running_run_directory_is_refused_and_ctrl_c_says_how_to_resume(tmp_path):
    """Issue 22.5: the same command started while the first runs started at step 0 in the same directory and
    deleted the first run's metrics rows; issue 22.1: Ctrl-C printed only Lightning's "graceful shutdown"."""
    first = train_script(tmp_path, *TINY, "trainer.max_epochs=1000", "run_name=busy")
    run_dir = wait_for_first_checkpoint(first, tmp_path, "busy").parents[1]
    rows = metric_rows(run_dir)
    code, err = finish(train_script(tmp_path, *TINY, "trainer.max_epochs=1000", "run_name=busy"))
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: another job is running in {run_dir} (pid {first.pid}): wait for it to finish, or stop it and "
        "run the same command again to resume"
    ), err[-3000:]
    assert metric_rows(run_dir)[: len(rows)] == rows
    first.send_signal(signal.SIGINT)
    code, err = finish(first)
    assert code == 1 and err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume", err[
        -3000:
    ]
    assert "Traceback" not in err


@pytest.mark.slow  # ~5 s: a fresh python holds the lock and is killed
def test_a_killed_job_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from dmae_lightning.jobs.rundir import "
            "RunDirLock; RunDirLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"another job is running in {tmp_path} \\(pid {holder.pid}\\)"):
        RunDirLock(tmp_path)
    holder.kill()
    holder.wait()
    RunDirLock(tmp_path).release()  # the kernel dropped the dead process's lock


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path):
    """kill -9 of a real ``python train.py`` after its first checkpoint, then the same command with
    ``ckpt_path=last``: same final step and bit-identical weights and optimizer state as an uninterrupted run
    (the resume starts at an epoch boundary), and metrics.csv holds every epoch and every step."""
    epochs = 4
    common = [*TINY, f"trainer.max_epochs={epochs}"]
    full = train_script(tmp_path, *common, "run_name=full")
    killed = train_script(tmp_path, *common, "run_name=killed")
    last = wait_for_first_checkpoint(killed, tmp_path, "killed")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    run_dir = last.parents[1]
    step_at_kill = max(lightning_ckpt(p)["global_step"] for p in run_dir.glob("checkpoints/step*.ckpt"))
    print(f"killed with checkpoints up to global step {step_at_kill}")
    assert 0 < step_at_kill < epochs * STEPS_PER_EPOCH and step_at_kill % STEPS_PER_EPOCH == 0
    rows_before = metric_rows(run_dir)
    assert rows_before, "nothing logged before the kill"

    code, err = finish(train_script(tmp_path, *common, "run_name=killed", "ckpt_path=last"))
    assert code == 0, err[-3000:]
    code, err_full = finish(full)
    assert code == 0, err_full[-3000:]
    assert run_dir_of(tmp_path, "killed") == run_dir  # the resume went into the same run directory

    a = lightning_ckpt(run_dir_of(tmp_path, "full") / "checkpoints" / "last.ckpt")
    b = lightning_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == epochs * STEPS_PER_EPOCH
    full_loss = latest_by_step(metric_rows(run_dir_of(tmp_path, "full")), "train/loss_step")
    resumed_loss = latest_by_step(metric_rows(run_dir), "train/loss_step")
    differ = [s for s in full_loss if resumed_loss.get(s) != full_loss[s]]
    assert not differ, f"train/loss differs from step {differ[0]} on: {full_loss} vs {resumed_loss}"
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))

    # metrics.csv: the rows of the killed attempt are still there, every epoch and step is present, and
    # the later row of a repeated step (the resumed run's) equals the uninterrupted run's value.
    rows = metric_rows(run_dir)
    filled = [{k: v for k, v in r.items() if v} for r in rows]
    assert filled[: len(rows_before)] == [{k: v for k, v in r.items() if v} for r in rows_before]
    full_rows = metric_rows(run_dir_of(tmp_path, "full"))
    for key in ("train/loss_step", "val/loss"):
        assert latest_by_step(rows, key) == latest_by_step(full_rows, key), key
    assert {r["epoch"] for r in rows if r.get("val/loss")} == {str(e) for e in range(epochs)}
    assert sorted(latest_by_step(rows, "train/loss_step")) == list(range(epochs * STEPS_PER_EPOCH))


class Crash(RuntimeError):
    """A run that dies at the start of an epoch, after the previous epoch's checkpoint was written."""


@pytest.fixture
def crash_at_epoch(monkeypatch):
    """``crash_at_epoch(e)``: the next training run raises Crash when epoch e starts (once). A resume is the
    same command with ckpt_path=last: the run directory's configuration must not change (issue 14.1)."""
    from dmae_lightning.training.pretrain import DMAEPretrainModule

    def arm(epoch: int) -> None:
        def hook(module):
            if module.current_epoch == epoch:
                monkeypatch.undo()
                raise Crash(f"killed at the start of epoch {epoch}")

        monkeypatch.setattr(DMAEPretrainModule, "on_train_epoch_start", hook, raising=False)

    return arm


def crashed_run(cfg, crash_at_epoch, epoch: int) -> None:
    crash_at_epoch(epoch)
    with pytest.raises(Crash):
        train(cfg)


# ============================================================================================== item 2
# Resuming appends to csv/metrics.csv, never deletes it.
# ============================================================================================== item 2
@pytest.mark.parametrize("resume", [["ckpt_path=last"], []])
def test_resume_appends_to_metrics_csv(resume, tmp_path, crash_at_epoch):
    """The same command without ckpt_path=last resumes too (issue 22.1: it restarted at step 0 over the
    interrupted run's checkpoints and deleted its metrics); a finished run is then left alone."""
    crashed_run(
        compose(CONF, "train", [*TINY, "trainer.max_epochs=2"], output_dir=tmp_path), crash_at_epoch, 1
    )
    first = metric_rows(tmp_path)
    assert sorted(latest_by_step(first, "train/loss_step")) == [0, 1, 2, 3]
    metrics = train(compose(CONF, "train", [*TINY, "trainer.max_epochs=2", *resume], output_dir=tmp_path))
    rows = metric_rows(tmp_path)
    assert rows[: len(first)] == first  # nothing the first attempt logged is gone (same header: same keys)
    assert sorted(latest_by_step(rows, "train/loss_step")) == list(range(8))
    assert {r["epoch"] for r in rows if r.get("val/loss")} == {"0", "1"}
    if resume:
        return
    # issue 22.1: running a finished run's command again restarted it at step 0 and deleted its history
    files = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "run.lock"
    }
    assert train(compose(CONF, "train", [*TINY, "trainer.max_epochs=2"], output_dir=tmp_path)) == metrics
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files
    assert lightning_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 8


@pytest.mark.parametrize("torn", ["row", "header"])
def test_torn_last_row_of_a_killed_run_is_dropped_on_resume(tmp_path, torn, crash_at_epoch):
    """A kill while a row was being written leaves it without its newline: appending must not glue the next
    row onto it (the torn row belongs to a step after the checkpoint, which the resumed run logs again). A
    file without even a whole header is started afresh."""
    crashed_run(
        compose(CONF, "train", [*TINY, "trainer.max_epochs=2"], output_dir=tmp_path), crash_at_epoch, 1
    )
    metrics = tmp_path / "csv" / "metrics.csv"
    complete = metrics.read_text() if torn == "row" else ""
    metrics.write_text(complete + ("0.5,0,0.12" if torn == "row" else "epoch,lr-Ad"))
    train(compose(CONF, "train", [*TINY, "trainer.max_epochs=2", "ckpt_path=last"], output_dir=tmp_path))
    text = metrics.read_text()
    assert text.startswith(complete or "epoch,lr-AdamW/pg1,") and "0.5,0,0.12" not in text
    assert len({len(row) for row in csv.reader(text.splitlines())}) == 1  # every row has every column
    assert {r["epoch"] for r in metric_rows(tmp_path) if r.get("val/loss")} == (
        {"0", "1"} if complete else {"1"}
    )


def test_kill_during_the_header_rewrite_leaves_metrics_csv_intact(tmp_path, monkeypatch):
    """A new metric name makes Lightning rewrite metrics.csv with a wider header. It does so in place, so a
    kill in the middle leaves a cut-short file. Ours writes a new file and renames it over the old one."""
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    metrics = tmp_path / "csv" / "metrics.csv"
    before = metrics.read_text()

    def killed(self, rows):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    logger.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # "b" is new: the header is rewritten
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert metrics.read_text() == before == "a,step\n1.0,0\n"


# ============================================================================================== item 4
# A CIFAR-10 folder with truncated batch files: one line naming the file.
# ============================================================================================== item 4
def write_cifar(root: Path) -> list[tuple[str, str]]:
    """Small files in torchvision's python-batch layout; returns (name, md5) in torchvision's order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    listed = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(entry))
        listed.append((name, hashlib.md5((folder / name).read_bytes()).hexdigest()))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return listed


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """Written CIFAR-10 files with torchvision's md5 list pointed at them, so torchvision's own integrity
    check runs (the real md5s cannot match written files)."""
    listed = write_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", [list(e) for e in listed[:5]])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", [list(listed[5])])
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    monkeypatch.setitem(torchvision.datasets.CIFAR10.meta, "md5", hashlib.md5(meta.read_bytes()).hexdigest())
    return tmp_path


def test_cifar_intact_files_load(cifar_root):
    dm = CIFAR10DataModule(cifar_root, batch_size=2)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("test")) == 2


@pytest.mark.parametrize(
    "name, damage", [("data_batch_3", "truncated"), ("test_batch", "truncated"), ("data_batch_2", "removed")]
)
def test_truncated_cifar_batch_is_one_line_naming_the_file(cifar_root, name, damage):
    folder = cifar_root / "cifar-10-batches-py"
    if damage == "truncated":
        truncate(folder / name)
    else:
        (folder / name).unlink()
    with pytest.raises(DataError) as info:
        CIFAR10DataModule(cifar_root, batch_size=2).dataset("test")  # what certification reads
    message = str(info.value)
    expected = "is damaged (its md5 differs" if damage == "truncated" else "is missing:"
    assert message.startswith(f"CIFAR-10 file {folder / name} {expected}") and "\n" not in message
    # Training: the same line, as the one-line ConfigError of train.py, before the model is built.
    overrides = ["data=cifar10", f"data.root={cifar_root}", "model=vit_micro_patch4"]
    with pytest.raises(ConfigError) as info:
        build(compose(CONF, "train", overrides, output_dir=cifar_root / "run"))
    assert str(info.value) == message


# ============================================================================================== item 5
# ckpt_path=/does/not/exist.ckpt: one line before anything is built.
# ============================================================================================== item 5
def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *TINY,
            "trainer.max_epochs=1",
            f"paths.log_dir={tmp_path}",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=180,
    )


def test_missing_ckpt_path_is_one_line_before_anything_is_built(tmp_path, monkeypatch):
    import dmae_lightning.jobs.train as train_mod

    def no_build(cfg):
        raise AssertionError("build() ran")

    monkeypatch.setattr(train_mod, "build", no_build)
    with pytest.raises(ConfigError, match=r"^cannot resume: checkpoint /does/not/exist.ckpt does not exist"):
        train(compose(CONF, "train", [*TINY, "ckpt_path=/does/not/exist.ckpt"], output_dir=tmp_path))


# ============================================================================================== item 6
# ckpt_path= a malicious or non-checkpoint pickle: one line, never torch's weights_only=False advice.
# ============================================================================================== item 6
class RunsCode:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_file(path: Path, marker: Path, how: str) -> Path:
    if how == "torch.save":
        torch.save({"state_dict": {}, "x": RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))  # torch reads pickle protocols <= 4
    return path


@pytest.mark.slow  # ~8 s: a fresh python train.py (torch + Lightning imports)
def test_malicious_ckpt_path_is_one_line_from_the_script_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = malicious_file(tmp_path / "evil.ckpt", marker, "torch.save")
    proc = run_cli(tmp_path, f"ckpt_path={bad}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"error: cannot resume: {bad} is not a loadable PyTorch checkpoint: it holds a pickled posix.system, "
        "which is not loaded (weights_only: only tensors, plain containers and argparse.Namespace)"
    )
    assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_plain_malicious_pickle_is_refused_before_anything_is_built(tmp_path):
    marker = tmp_path / "pwned"
    bad = malicious_file(tmp_path / "evil.pkl", marker, "pickle")
    with pytest.raises(ConfigError) as info:
        train(compose(CONF, "train", [*TINY, f"ckpt_path={bad}"], output_dir=tmp_path / "run"))
    assert str(info.value).startswith(
        f"cannot resume: {bad} is not a loadable PyTorch checkpoint: it holds a"
    )
    assert "posix.system" in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_weights_file_is_not_a_resumable_checkpoint(tmp_path):
    """An official-style weights file passed as ckpt_path (meant for pretrained=): say so, in one line."""
    weights = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, weights)
    with pytest.raises(ConfigError, match=r"is not a training checkpoint to resume .* use pretrained="):
        train(compose(CONF, "train", [*TINY, f"ckpt_path={weights}"], output_dir=tmp_path / "run"))


# ============================================================================================== item 7
# A damaged last.ckpt on resume: one line naming it; fall back to the kept earlier checkpoint with a warning.
# ============================================================================================== item 7
@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, single_thread):
    """A 3-epoch run that died when its third epoch started (checkpoints at steps 4 and 8) and an
    uninterrupted 3-epoch run to compare with."""
    from dmae_lightning.training.pretrain import DMAEPretrainModule

    root = tmp_path_factory.mktemp("two_epochs")
    with pytest.MonkeyPatch.context() as mp:

        def hook(module):
            if module.current_epoch == 2:
                raise Crash("killed at the start of epoch 2")

        mp.setattr(DMAEPretrainModule, "on_train_epoch_start", hook, raising=False)
        with pytest.raises(Crash):
            train(compose(CONF, "train", [*TINY, "trainer.max_epochs=3"], output_dir=root / "run"))
    train(compose(CONF, "train", [*TINY, "trainer.max_epochs=3"], output_dir=root / "full"))
    return root


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps the last.ckpt link
    return dst


def test_damaged_last_checkpoint_falls_back_to_the_earlier_one(two_epochs, tmp_path, caplog):
    """The newest file cut in half (what a kill during a non-atomic write leaves): one warning line, resume
    from the one before (step 4, the end of the warm-up, which does not depend on the run's length), and
    the run ends as the uninterrupted 3-epoch run."""
    run = copy_run(two_epochs / "run", tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    truncate(last.resolve())
    with caplog.at_level("WARNING"):
        train(compose(CONF, "train", [*TINY, "trainer.max_epochs=3", "ckpt_path=last"], output_dir=run))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "resuming" in r.getMessage()
    ]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{last} is not a loadable PyTorch checkpoint: damaged")
    assert warnings[0].endswith(f"resuming from {run / 'checkpoints' / 'step00000004.ckpt'} instead")
    a = lightning_ckpt(two_epochs / "full" / "checkpoints" / "last.ckpt")
    b = lightning_ckpt(last)
    assert a["global_step"] == b["global_step"] == 12
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_missing_last_link_resumes_from_the_newest_kept_file(two_epochs, tmp_path, caplog):
    """A kill between removing the old last.ckpt link and making the new one: the newest file, no warning."""
    run = copy_run(two_epochs / "run", tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()
    cfg = compose(CONF, "train", [*TINY, "trainer.max_epochs=3", "ckpt_path=last"], output_dir=run)
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(cfg) == str(run / "checkpoints" / "step00000008.ckpt")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_damaged_last_checkpoint_without_fallback_is_one_line(two_epochs, tmp_path):
    run = copy_run(two_epochs / "run", tmp_path / "run")
    for path in (run / "checkpoints").glob("step*.ckpt"):
        truncate(path, keep=0.3)
    with pytest.raises(ConfigError) as info:
        train(compose(CONF, "train", [*TINY, "trainer.max_epochs=3", "ckpt_path=last"], output_dir=run))
    message = str(info.value)
    assert message.startswith(f"cannot resume: {run / 'checkpoints' / 'last.ckpt'} is not a loadable PyTorch")
    assert message.endswith("no other checkpoint in the folder loads either") and "\n" not in message


def test_last_without_any_checkpoint_starts_from_scratch(tmp_path):
    """ckpt_path=last may be set before the first run (a requeued job's command): no checkpoint, step 0."""
    metrics = train(
        compose(CONF, "train", [*TINY, "trainer.max_epochs=1", "ckpt_path=last"], output_dir=tmp_path)
    )
    assert np.isfinite(metrics["train/loss"])
    assert lightning_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH


# ============================================================================================= item 12
# An ImageNet folder with a truncated JPEG: one line naming the file and the index (data side).
# ============================================================================================= item 12
def test_truncated_jpeg_names_the_file_and_index(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / wnid / f"{wnid}_{i}.JPEG", quality=95)
    broken = tmp_path / "val" / "n02" / "n02_0.JPEG"
    truncate(broken)
    dataset = ImageNetDataModule(tmp_path, batch_size=2, num_classes=2).dataset("val")
    assert dataset[1][0].shape == (3, 224, 224) and dataset[3][1] == 1  # the others load
    with pytest.raises(BrokenImageError) as info:
        dataset[2]
    message = str(info.value)
    assert "\n" not in message and str(broken) in message and "image 2 " in message
    assert info.value.index == 2 and info.value.path == str(broken)
    assert isinstance(info.value, ConfigError)  # the entry points print it as this one line
    copy = pickle.loads(pickle.dumps(info.value))  # as it would cross a process boundary
    assert (str(copy), copy.path, copy.index) == (message, str(broken), 2)


# Certification side: the job stops on the broken image with one line naming it; what was done is kept.
@pytest.mark.slow  # ~9 s: a fresh python certify.py (torch + Lightning imports)
def test_certification_stops_at_a_truncated_jpeg_with_one_line_and_keeps_the_rest(tmp_path):
    from helpers.certify import make_classifier_checkpoint

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for wnid in ("n01", "n02"):
        (root / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / wnid / f"{wnid}_{i}.JPEG", quality=95)
    broken = root / "val" / "n02" / "n02_0.JPEG"  # idx 2
    truncate(broken)
    ckpt = make_classifier_checkpoint(tmp_path / "ten.ckpt", steps=2)
    state = torch.load(ckpt, weights_only=True)  # as a 2-class fine-tuning would write it
    state["hyper_parameters"]["num_classes"] = 2
    for key in ("model.head.weight", "model.head.bias"):
        state["state_dict"][key] = state["state_dict"][key][:2].clone()
    torch.save(state, tmp_path / "two.ckpt")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "certify.py"), f"weights={tmp_path / 'two.ckpt'}", "data=imagenet",
         f"data.root={root}", "data.num_classes=2", "data.num_workers=1", "model=vit_micro_patch8", "split=val", "n0=10", "n=100",
         "batch_size=100", "logger=none", f"hydra.run.dir={out}"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: certification stopped at idx 2: image 2 (") and str(broken) in last
    assert "Traceback" not in proc.stderr
    done = [line.split("\t")[0] for line in (out / "certify.rank0.tsv").read_text().splitlines()[1:]]
    assert done == ["0", "1"]  # certified before the broken image, kept for the resume


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*TINY, "model=vit_micro_patch4"],
            r"is a checkpoint of dmae_vit_micro_patch8 \(\d+ tensors differ, e.g. "
            r"model.decoder_pos_embed: \(1, 17, 64\) there, \(1, 65, 64\) here\); this run trains dmae_vit_micro_patch4",
        ),
        (
            ["experiment=finetune_digits", "data.subset_first=64", "pretrained=null"],
            r"is a checkpoint of dmae_vit_micro_patch8 .*this run "
            r"trains vit_micro_patch8: resume a checkpoint of this run, or start from its weights with pretrained=",
        ),
    ],
)
def test_resuming_another_model_s_checkpoint_is_one_line_before_work(
    overrides, message, two_epochs, tmp_path
):
    """Issue 22: a patch-8 pre-training checkpoint resumed with model=vit_micro_patch4, or as fine-tuning, ended in
    a 39-42-line load_state_dict traceback after work had started."""
    ckpt = two_epochs / "full" / "checkpoints" / "last.ckpt"
    cfg = compose(CONF, "train", [*overrides, f"ckpt_path={ckpt}"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=f"^cannot resume: {ckpt} {message}") as err:
        train(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_a_requeued_run_s_newer_hpc_checkpoint_is_resumed_by_the_plain_command(two_epochs, tmp_path):
    """A SLURM requeue leaves hpc_ckpt_<n>.ckpt in the run directory; with ckpt_path null Lightning takes it only
    inside a SLURM job, and an explicit last.ckpt would take precedence over it: the newer one is resumed."""
    run = copy_run(two_epochs / "run", tmp_path / "run")
    cfg = compose(CONF, "train", [*TINY, "trainer.max_epochs=3"], output_dir=run)
    assert resume_checkpoint(cfg) == str(
        run / "checkpoints" / "last.ckpt"
    )  # interrupted: resumed, not redone
    hpc = run / "hpc_ckpt_1.ckpt"
    hpc.write_bytes((run / "checkpoints" / "step00000004.ckpt").read_bytes())
    assert resume_checkpoint(cfg) == str(hpc)
    os.utime(hpc, (1, 1))  # older than last.ckpt
    assert resume_checkpoint(cfg) == str(run / "checkpoints" / "last.ckpt")


def test_resuming_with_another_worker_count_says_so(two_epochs, tmp_path, caplog):
    """Issue 22: a run killed after epoch 3 and resumed with data.num_workers=1 (0 before) ended with other weights
    than the uninterrupted run, silently; the resume now says so in one line (the count is not in the identity)."""
    from dmae_lightning.jobs.train import prepare

    run = copy_run(two_epochs / "run", tmp_path / "run")
    with caplog.at_level("WARNING"):
        prepare(compose(CONF, "train", [*TINY, "trainer.max_epochs=3", "data.num_workers=0"], output_dir=run))
        assert "num_workers" not in caplog.text
        prepare(compose(CONF, "train", [*TINY, "trainer.max_epochs=3", "data.num_workers=1"], output_dir=run))
    (line,) = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert (
        line.startswith("resuming with data.num_workers=1 where the run so far used 0") and "\n" not in line
    )
