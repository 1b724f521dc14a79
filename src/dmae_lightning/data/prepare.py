"""``python prepare.py <dataset> --root R --out O``: a training split written once as litdata shards (optimized
chunks of uint8 images and labels) that :mod:`.streaming` reads. Imports: litdata and the data sets."""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
from litdata import optimize
from torchvision import datasets

from dmae_lightning.data.cifar10 import CIFAR10_FOLDER, cifar10_problem, read_cifar10_batch
from dmae_lightning.data.errors import DataError
from dmae_lightning.data.pipelines import read_file
from dmae_lightning.data.streaming import CHUNK_BYTES


# --- preparing shards ------------------------------------------------------------------------------
def _imagenet_item(sample: tuple[str, int]) -> dict:
    path, label = sample
    return {"image": read_file(path), "label": int(label)}


def _write(fn: Callable, inputs: list, out: Path | str, workers: int) -> None:
    # litdata's optimize sets the process-wide start method to "spawn" and leaves it: every DataLoader of the
    # process (a test session's) would then start its workers by re-importing everything, seconds each.
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        optimize(
            fn=fn,
            inputs=inputs,
            output_dir=str(out),
            chunk_bytes=CHUNK_BYTES,
            num_workers=workers,
            mode="overwrite",
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(start_method, force=True)


def prepare_imagenet(root: str | Path, out: str | Path, workers: int = 4) -> int:
    """``root/train/<wnid>/*.JPEG`` -> chunks in ``out``; returns the number of images written.

    Labels are the indices of the sorted wnids, as ImageFolder gives them.
    """
    folder = Path(root) / "train"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet train folder {folder} is missing: expected {folder}/<wnid>/<image>.JPEG"
        )
    samples = datasets.ImageFolder(folder, loader=read_file).samples
    _write(_imagenet_item, samples, out, workers)
    return len(samples)


def _cifar_item(item: tuple[np.ndarray, int]) -> dict:
    pixels, label = item
    return {"image": pixels, "label": int(label)}


def prepare_cifar10(root: str | Path, out: str | Path, workers: int = 1) -> int:
    """The five training batches in ``root/cifar-10-batches-py`` -> chunks of uint8 [32, 32, 3] and labels.

    As for training (data.py), each batch's md5 must be the published one and the batches are read by the
    restricted unpickler, so a crafted file is refused before any of its code can run.
    """
    folder = Path(root) / CIFAR10_FOLDER
    names = [name for name, _ in datasets.CIFAR10.train_list]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}")
    problem = cifar10_problem(folder, names)
    if problem is not None:
        raise DataError(f"{problem}: download the published batches again")
    items = []
    for name in names:
        pixels, labels = read_cifar10_batch(
            folder / name
        )  # [N, 32, 32, 3] uint8, HWC as torchvision's CIFAR10
        items += list(zip(pixels, labels))
    _write(_cifar_item, items, out, workers)
    return len(items)


# --- the prepare command ---------------------------------------------------------------------------
PREPARERS = {"imagenet": prepare_imagenet, "cifar10": prepare_cifar10}


def main(argv: list[str] | None = None) -> None:
    """``python prepare.py {imagenet,cifar10} --root SOURCE --out DIR_OR_URL [--workers N]``."""
    parser = argparse.ArgumentParser(
        prog="prepare.py", description="Write the training split as litdata shards for data.streaming=..."
    )
    parser.add_argument("data", choices=sorted(PREPARERS))
    parser.add_argument(
        "--root", required=True, help="the data module's root (ImageNet folder, CIFAR-10 root)"
    )
    parser.add_argument("--out", required=True, help="output folder or object-store URL (s3://bucket/prefix)")
    parser.add_argument("--workers", type=int, default=4, help="processes reading and writing")
    args = parser.parse_args(argv)
    try:
        count = PREPARERS[args.data](args.root, args.out, workers=args.workers)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"wrote {count} {args.data} training images to {args.out}: train with data={args.data} data.streaming={args.out}"
    )
