"""The certification job in tests: a real classifier checkpoint of a micro ViT, and the job run in-process
(``run``) or as ``python certify.py`` (``script``, ``finish``) with small settings (``SMALL``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dmae_lightning.data import DigitsDataModule
from dmae_lightning.jobs.certify.job import certify
from dmae_lightning.jobs.compose import compose
from dmae_lightning.noise import GaussianNoise
from dmae_lightning.training.finetune import BaseClassifierModule

from . import CONF, REPO

SIGMA = 0.25
SMALL = [
    "model=vit_micro_patch8",
    "n0=10",
    "n=100",
    "batch_size=100",
    "max=12",
    "alpha=0.001",
    "split=test",
    "seed=0",
    "logger=none",
]


def make_classifier_checkpoint(path: Path, steps: int = 40) -> Path:
    """A real Lightning checkpoint of a micro ViT that classifies noisy digits about half right.

    Most of the training is a plain loop (fast); a 1-step Lightning fit at a negligible learning rate
    then writes the file exactly as ``trainer.save_checkpoint`` does after fine-tuning.
    """
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64)
    module = BaseClassifierModule(
        model_name="vit_micro_patch8",
        model_kwargs={"img_size": 32},
        num_classes=10,
        noise=GaussianNoise(SIGMA),
        mixup=None,
        label_smoothing=0.0,
        optimizer=dict(name="adamw", base_lr=1e-9, weight_decay=0.0, warmup_epochs=0, min_lr=0.0),
    )
    train = datamodule.dataset("train")
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(train.labels), (128,), generator=generator)
        noisy = train.images[pick] + SIGMA * torch.randn(train.images[pick].shape, generator=generator)
        loss = F.cross_entropy(module.model(noisy), train.labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=path.parent,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path


def overrides_with(*overrides: str) -> list[str]:
    """SMALL with ``overrides`` replacing the values of the same keys."""
    merged = {o.split("=", 1)[0]: o for o in [*SMALL, *overrides]}
    return list(merged.values())


def certify_on_two_cpu_processes(ckpt_path: Path, tmp_path: Path, *overrides: str) -> Path:
    """``python certify.py`` with Lightning's DDP on the CPU (gloo, 2 processes), SMALL with ``overrides``;
    the run directory of the finished run."""
    args = [
        f"weights={ckpt_path}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *overrides_with(*overrides),
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    log = tmp_path / "out.log"
    proc = script(log, *args)
    output = finish(proc, log, 400)
    assert proc.returncode == 0, output
    (run_dir,) = (tmp_path / "logs").glob("*/latest")
    return run_dir


def compose_cfg(out_dir: Path, ckpt_path: Path | str, *overrides: str):
    """conf/certify.yaml as ``python certify.py`` would see it, with the run directory at ``out_dir``."""
    return compose(CONF, "certify", [f"weights='{ckpt_path}'", *overrides_with(*overrides)], out_dir)


def run(out_dir: Path, ckpt_path: Path, *overrides: str) -> dict:
    """The certification job in this process (SMALL settings, ``overrides`` on top); returns its summary."""
    return certify(compose_cfg(out_dir, ckpt_path, *overrides))


def script(log: Path, *args: str) -> subprocess.Popen:
    """``python certify.py ARGS`` in the repository, stdout and stderr to ``log``."""
    with open(log, "a") as out:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, str(REPO / "certify.py"), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()
