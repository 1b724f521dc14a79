"""Streaming shards: prepare.py writes litdata chunks of the training split, the data modules stream them
(same images and labels as the source files, every image once per epoch, with workers too), and bad options
stop with one line. Exact mid-epoch resume is tested in test_pretrain.py::test_resume_mid_epoch."""

from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from helpers.cifar import write_cifar, write_hostile
from helpers.imagenet import write_imagenet

from dmae_lightning.data import CIFAR10DataModule, DataError, DigitsDataModule, ImageNetDataModule
from dmae_lightning.data.pipelines import open_rgb
from dmae_lightning.data.prepare import main as prepare_main
from dmae_lightning.data.streaming import streaming_loader
from dmae_lightning.errors import ConfigError

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


@pytest.mark.parametrize("workers", [0, 2])
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


@pytest.mark.slow  # ~10 s: prepare.py's worker process imports torch
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


def damage_truncated_chunk(shards: Path) -> str:
    chunk = shards / "chunk-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    return rf"chunk {re.escape(str(chunk))} has 1000 bytes, not the \d+ that index\.json records"


def damage_deleted_chunk(shards: Path) -> str:
    (shards / "chunk-0-0.bin").unlink()
    return f"chunk {re.escape(str(shards / 'chunk-0-0.bin'))} is missing"


def damage_garbage_index(shards: Path) -> str:
    (shards / "index.json").write_bytes(b"\x00garbage{")
    return rf"{re.escape(str(shards / 'index.json'))} is not a litdata index \(.+\)"


def damage_index_without_chunks(shards: Path) -> str:  # what an interrupted prepare.py can leave
    (shards / "index.json").write_text(json.dumps({"chunks": [], "config": None}))
    return rf"{re.escape(str(shards / 'index.json'))} lists no chunks"


@pytest.mark.parametrize(
    "damage",
    [damage_truncated_chunk, damage_deleted_chunk, damage_garbage_index, damage_index_without_chunks],
)
def test_damaged_shards_are_refused_up_front_with_one_line(imagenet, tmp_path: Path, damage):
    """Issue 22: a truncated or deleted chunk ended, once training read it, in a 92-line litdata
    ChunkWaitTimeoutError, a garbage index.json in 88 lines. The shards are checked when the data module is
    built: one line naming the file and the command that writes them again."""
    root, out = imagenet
    shards = shutil.copytree(out, tmp_path / "shards")
    what = damage(shards)
    with pytest.raises(DataError) as info:
        ImageNetDataModule(root, batch_size=4, streaming=str(shards))
    message = str(info.value)
    rebuild = f"python prepare.py imagenet --root {root} --out {shards}"
    assert re.fullmatch(
        rf"streaming shards {re.escape(str(shards))}: {what}: rebuild them with {re.escape(rebuild)}", message
    )


def test_batch_size_larger_than_the_shards_is_refused_up_front(imagenet):
    root, out = imagenet
    with pytest.raises(
        ConfigError,
        match=rf"^streaming shards {re.escape(str(out))} hold 12 images, fewer than batch_size=5000",
    ):
        ImageNetDataModule(root, batch_size=5000, streaming=str(out))


def decode_half(data: bytes):
    """The training decode of a stored JPEG cut short, as prepare.py stores a truncated file's bytes."""
    return open_rgb(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_stored_image_is_one_line(imagenet, workers: int, monkeypatch: pytest.MonkeyPatch):
    """prepare.py stores the files' bytes without decoding them: a broken one in the shards stops training
    with one line (a DataError, also out of a loader worker) instead of PyTorch's re-raise of the worker's
    traceback."""
    _, out = imagenet
    batches = iter(streaming_loader(str(out), decode_half, batch_size=4, num_workers=workers, seed=0))
    with pytest.raises(DataError) as info:
        next(batches)
    error = info.value.with_traceback(None)  # its frames hold the loader's iterator
    del info
    assert re.fullmatch(
        rf"item \d+ of streaming shards {re.escape(str(out))} cannot be decoded: .+", str(error)
    )
    assert "\n" not in str(error)
    # A worker that raised does not leave by itself: PyTorch stops it after waiting 5 s, here 0.2 s.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    del batches
    gc.collect()  # (the loader and its iterator refer to each other)


def test_prepare_refuses_a_hostile_cifar_batch_without_running_it(tmp_path: Path, relax_cifar_md5):
    """A batch that passes the md5 check (relaxed here) but is no CIFAR-10 batch: one line, its code never runs."""
    write_cifar(tmp_path)
    path, marker = tmp_path / "cifar-10-batches-py" / "data_batch_1", tmp_path / "MARKER"
    write_hostile(path, marker)
    with pytest.raises(SystemExit) as info:
        prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert re.match(
        rf"error: CIFAR-10 file {re.escape(str(path))} is not a CIFAR-10 python batch", str(info.value)
    )
    assert "\n" not in str(info.value) and not marker.exists()


def test_prepare_checks_the_published_md5_before_unpickling(tmp_path: Path):
    write_cifar(tmp_path)  # the real md5 check (no monkeypatch): written files are not the published ones
    path, marker = tmp_path / "cifar-10-batches-py" / "data_batch_1", tmp_path / "MARKER"
    write_hostile(path, marker)
    damaged = (
        rf"^error: CIFAR-10 file {re.escape(str(path))} is damaged \(its md5 differs from the published one\)"
    )
    with pytest.raises(SystemExit, match=damaged):
        prepare_main(["cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert not marker.exists() and not (tmp_path / "out").exists()
