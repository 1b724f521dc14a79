"""Fixtures shared by several test modules: one intra-op thread, small digits data modules, a quiet CPU
Trainer, CIFAR-10's md5 check relaxed for written files and one small classifier checkpoint per session.

A fixture that one module uses lives in that module; plain helpers (data writers, the small classifier, the
training probes) are in the ``helpers`` package (``tests/helpers``, importable because pyproject.toml's pytest
options put ``tests/`` on ``sys.path``). No test module imports another."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision.datasets.cifar
from pytorch_lightning.loggers import CSVLogger

from dmae_lightning.data import DigitsDataModule

# The helpers' asserts (single_run_dir, the probes' checks) explain their failures as a test module's do.
pytest.register_assert_rewrite("helpers")


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the tiny models: on a shared 2-core machine two OpenMP threads per process
    can slow a step from 0.04 s to over 2 s (threads spin waiting for a core); one is never much slower.
    (The subprocesses that the tests start get OMP_NUM_THREADS=1 for the same reason.) Modules whose every
    test wants it say ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a micro ViT that classifies noisy digits about half right (sigma 0.25),
    made once per session (helpers.certify.make_classifier_checkpoint) with one intra-op thread: being
    session-scoped it is set up before any module's ``single_thread``, and two threads spinning on a shared
    2-core machine made its 40 training steps take 10-50 s instead of 2."""
    from helpers.certify import make_classifier_checkpoint

    with one_intra_op_thread():
        return make_classifier_checkpoint(tmp_path_factory.mktemp("ckpt") / "classifier.ckpt")


@pytest.fixture
def make_digits():
    """``make_digits(batch_size=16, subset_first=64, **kw)``: a fresh DigitsDataModule (each Trainer
    attaches itself to its data module, so tests do not share one)."""

    def make(batch_size: int = 16, subset_first: int | None = 64, **kwargs) -> DigitsDataModule:
        return DigitsDataModule(batch_size=batch_size, subset_first=subset_first, **kwargs)

    return make


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(callbacks=[...], csv=False, root=None, **trainer_kwargs)``: a CPU Trainer without
    progress bar, model summary or sanity check; no logger unless ``csv=True``, no checkpointing unless
    the callbacks bring a ModelCheckpoint."""

    def make(callbacks=(), csv: bool = False, root: Path | None = None, **kwargs) -> pl.Trainer:
        root = Path(root or tmp_path)
        callbacks = list(callbacks)
        options = dict(
            default_root_dir=str(root),
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(str(root), name="csv", version="") if csv else False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        options.update(kwargs)
        return pl.Trainer(**options)

    return make


@pytest.fixture
def relax_cifar_md5(monkeypatch):
    """CIFAR-10's published-md5 check relaxed to an existence check: written test files cannot match the
    published md5. dmae_lightning.data.cifar10_problem (training and prepare.py) and torchvision's download
    both call torchvision.datasets.cifar.check_integrity, so this is the one place to swap."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
