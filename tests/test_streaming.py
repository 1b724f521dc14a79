"""Streaming shards: prepare.py writes litdata chunks of the training split, the data modules stream them
(same images and labels as the source files, every image once per epoch, with workers too), and bad options
stop with one line. Exact mid-epoch resume is tested in test_pretrain.py::test_resume_mid_epoch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from helpers.cifar import write_cifar, write_hostile
from test_data import write_imagenet

from dmae_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule
from dmae_lightning.streaming import main as prepare_main

pytestmark = pytest.mark.usefixtures("single_thread")


def fingerprints(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float]]:
    """(label, pixel sum) per image, sorted: equal lists mean the same images with the same labels."""
    return sorted((int(y), round(float(x.double().sum()), 3)) for x, y in zip(images, labels))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("streaming") / "imagenet"
    write_imagenet(root, per_class=4)  # 3 classes x 4 images of 3 sizes
    out = root.parent / "shards"
    prepare_main(["imagenet", "--root", str(root), "--out", str(out), "--workers", "1"])
    assert (out / "index.json").is_file()
    return root, out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2 worker processes: ~30 s
def test_streamed_imagenet_epoch_is_the_folder_once_each(imagenet, workers: int):
    root, out = imagenet
    folder = ImageNetDataModule(root, batch_size=4, augment="none").dataset("train")
    expected = fingerprints(torch.stack([x for x, _ in folder]), torch.tensor([y for _, y in folder]))
    dm = ImageNetDataModule(root, batch_size=4, augment="none", streaming=str(out), num_workers=workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batches = list(loader)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.shape == (12, 3, 224, 224) and labels.dtype == torch.int64
    assert fingerprints(images, labels) == expected  # the JPEG bytes were stored as they are


@pytest.mark.parametrize("pipeline", ["pil", "tensor", "device"])
def test_streamed_imagenet_training_pipelines(imagenet, pipeline: str):
    root, out = imagenet
    dm = ImageNetDataModule(root, batch_size=4, pipeline=pipeline, streaming=str(out))
    batch = next(iter(dm.train_dataloader()))
    images, labels = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and labels.shape == (4,)


def test_streamed_cifar_pixels_are_the_written_bytes(tmp_path: Path, monkeypatch):
    written = write_cifar(tmp_path, per_batch=4)
    monkeypatch.setattr(  # the written files cannot match torchvision's md5 of the real ones
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file()
    )
    prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "shards"), "--workers", "1"])
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, augment="none", streaming=str(tmp_path / "shards"))
    batches = list(dm.train_dataloader())
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])  # [20, 3072] CHW rows
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    targets = torch.tensor(sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    assert fingerprints(images, labels) == fingerprints(expected, targets)


def test_prepare_and_streaming_options_fail_with_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit, match=r"^error: ImageNet train folder .* is missing"):
        prepare_main(["imagenet", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^error: CIFAR-10 folder .* lacks data_batch_1"):
        prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="digits has no streaming shards"):
        DigitsDataModule(streaming=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no index.json.*python prepare.py"):
        ImageNetDataModule(tmp_path, streaming=str(tmp_path))
    with pytest.raises(ValueError, match="subset_every / subset_first do not apply"):
        ImageNetDataModule(tmp_path, streaming=str(tmp_path), subset_first=10)


def test_prepare_refuses_a_hostile_cifar_batch_without_running_it(tmp_path: Path, relax_cifar_md5):
    """A batch that passes the md5 check (relaxed here) but is no CIFAR-10 batch: one line, its code never runs."""
    write_cifar(tmp_path)
    path, marker = tmp_path / "cifar-10-batches-py" / "data_batch_1", tmp_path / "MARKER"
    write_hostile(path, marker)
    with pytest.raises(SystemExit) as info:
        prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert re.match(rf"error: CIFAR-10 file {re.escape(str(path))} is not a CIFAR-10 python batch", str(info.value))
    assert "\n" not in str(info.value) and not marker.exists()


def test_prepare_checks_the_published_md5_before_unpickling(tmp_path: Path):
    write_cifar(tmp_path)  # the real md5 check (no monkeypatch): written files are not the published ones
    path, marker = tmp_path / "cifar-10-batches-py" / "data_batch_1", tmp_path / "MARKER"
    write_hostile(path, marker)
    damaged = rf"^error: CIFAR-10 file {re.escape(str(path))} is damaged \(its md5 differs from the published one\)"
    with pytest.raises(SystemExit, match=damaged):
        prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert not marker.exists() and not (tmp_path / "out").exists()
