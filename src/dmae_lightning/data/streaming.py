"""Streaming training shards with litdata: convert once, then read from a local path or an object store.

``prepare_imagenet`` / ``prepare_cifar10`` (``python prepare.py``) write litdata's optimized chunks of
``{"image": ..., "label": int}``: for ImageNet the JPEG file's own bytes (no re-encoding), for CIFAR-10 the
uint8 [32, 32, 3] pixels. A data module with ``streaming=<dir or s3://... URL>`` then reads its training
split through ``StreamingDataset`` / ``StreamingDataLoader``: each rank and worker streams its own chunks
(no DistributedSampler), the loader's position is part of Lightning's checkpoint (the fit loop saves a
loader that has ``state_dict``), and every sample's augmentation is seeded by (seed, epoch, sample index),
so a run resumed mid-epoch draws the same batches, crops and flips as the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from torchvision import datasets

from dmae_lightning.data import CIFAR10_FOLDER, UNDECODABLE, DataError, cifar10_problem, read_cifar10_batch
from dmae_lightning.data.pipelines import read_file
from dmae_lightning.errors import one_line
from dmae_lightning.rng import derive_seed

AUGMENT_STREAM = 3  # keeps the streaming augmentation seeds apart from rng.py's noise streams
CHUNK_BYTES = "64MB"


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
            fn=fn, inputs=inputs, output_dir=str(out), chunk_bytes=CHUNK_BYTES, num_workers=workers,
            mode="overwrite", verbose=False,
        )
    finally:
        multiprocessing.set_start_method(start_method, force=True)


def prepare_imagenet(root: str | Path, out: str | Path, workers: int = 4) -> int:
    """``root/train/<wnid>/*.JPEG`` -> chunks in ``out``; returns the number of images written.

    Labels are the indices of the sorted wnids, as ImageFolder gives them.
    """
    folder = Path(root) / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet train folder {folder} is missing: expected {folder}/<wnid>/<image>.JPEG")
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
        pixels, labels = read_cifar10_batch(folder / name)  # [N, 32, 32, 3] uint8, HWC as torchvision's CIFAR10
        items += list(zip(pixels, labels))
    _write(_cifar_item, items, out, workers)
    return len(items)


# --- reading shards --------------------------------------------------------------------------------
def check_shards(input_dir: str | Path, rebuild: str) -> int:
    """The number of items in the local shards ``input_dir``, after checking what litdata would otherwise
    trip over mid-epoch with a long traceback (a chunk that is missing or cut short: a timeout waiting for it
    to "arrive"; an index that does not parse): ``index.json`` parses, lists chunks, and every chunk file
    exists with the size the index records (when the chunks are not compressed: then it records the
    unpacked size). DataError naming the file and ``rebuild``, the command that writes the shards again.
    """
    folder = Path(input_dir)
    index = folder / "index.json"

    def refuse(problem: str) -> DataError:
        return DataError(f"streaming shards {input_dir}: {problem}: rebuild them with {rebuild}")

    try:
        meta = json.loads(index.read_bytes())
        chunks, config = meta["chunks"], meta["config"]
        if not isinstance(chunks, list) or not all(isinstance(c, dict) and isinstance(c.get("filename"), str)
                                                   for c in chunks):
            raise ValueError('"chunks" is not a list of chunks with file names')
        compressed = bool(config.get("compression")) if isinstance(config, dict) else False
        count = sum(int(c.get("chunk_size") or 0) for c in chunks)
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, or not litdata's layout
        reason = f"no {err} entry" if isinstance(err, KeyError) else one_line(err)
        raise refuse(f"{index} is not a litdata index ({reason})") from None
    if not chunks:
        raise refuse(f"{index} lists no chunks")
    for chunk in chunks:
        path = folder / chunk["filename"]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise refuse(f"chunk {path} is missing") from None
        except OSError as err:
            raise refuse(f"chunk {path} cannot be read ({one_line(err)})") from None
        expected = chunk.get("chunk_bytes")
        if not compressed and isinstance(expected, int) and size != expected:
            raise refuse(f"chunk {path} has {size} bytes, not the {expected} that index.json records")
    return count


class SeededStreamingImages(StreamingDataset):
    """``(decode(item["image"]), label)`` with the decode (augmentation) seeded per sample.

    torchvision's random transforms draw from the global torch RNG, which differs between worker
    processes and between a run and its resumption; seeding it by (seed, epoch, sample index) for the
    duration of each decode makes every sample's crop and flip a function of the data alone.
    """

    def __init__(self, input_dir: str, decode: Callable, seed: int, **kwargs):
        super().__init__(input_dir, shuffle=True, drop_last=True, seed=seed, **kwargs)
        self.decode, self.augment_seed, self.source = decode, seed, input_dir

    def __getitem__(self, index):
        item = super().__getitem__(index)
        key = getattr(index, "index", index)  # litdata passes a ChunkedIndex while iterating
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.augment_seed, AUGMENT_STREAM, self.current_epoch, int(key)))
            try:
                return self.decode(item["image"]), item["label"]
            except UNDECODABLE as err:  # prepare.py stores the files' bytes as they are, broken ones too
                empty = isinstance(item["image"], bytes) and not item["image"]
                reason = "the stored file is empty (0 bytes)" if empty else one_line(err)
                # a DataError: one line, also from a loader worker (see data.DataError)
                raise DataError(f"item {int(key)} of streaming shards {self.source} cannot be decoded: {reason}") from None


class ResumableStreamingDataLoader(StreamingDataLoader):
    """litdata clears its "resuming" flag only when an epoch is iterated to exhaustion; Lightning ends an
    epoch at its known length without exhausting the iterator, so a resumed partial epoch would be
    replayed as the next epoch. The flag has done its work once the resumed iteration yields (the
    start position and the worker order are set up before the first batch)."""

    def __iter__(self):
        for count, batch in enumerate(super().__iter__()):
            if count == 0:
                self.restore = False
            yield batch


def streaming_loader(
    input_dir: str,
    decode: Callable,
    batch_size: int,
    num_workers: int,
    seed: int,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
) -> StreamingDataLoader:
    """The training loader over prepared shards (shuffled by chunk and item with ``seed``, last partial
    batch dropped, as the folder loader does)."""
    dataset = SeededStreamingImages(input_dir, decode, seed)
    if len(dataset) < batch_size:
        raise ValueError(f"streaming shards {input_dir} hold {len(dataset)} images, fewer than batch_size={batch_size}")
    return ResumableStreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


# --- the prepare command ---------------------------------------------------------------------------
PREPARERS = {"imagenet": prepare_imagenet, "cifar10": prepare_cifar10}


def main(argv: list[str] | None = None) -> None:
    """``python prepare.py {imagenet,cifar10} --root SOURCE --out DIR_OR_URL [--workers N]``."""
    parser = argparse.ArgumentParser(
        prog="prepare.py", description="Write the training split as litdata shards for data.streaming=..."
    )
    parser.add_argument("data", choices=sorted(PREPARERS))
    parser.add_argument("--root", required=True, help="the data module's root (ImageNet folder, CIFAR-10 root)")
    parser.add_argument("--out", required=True, help="output folder or object-store URL (s3://bucket/prefix)")
    parser.add_argument("--workers", type=int, default=4, help="processes reading and writing")
    args = parser.parse_args(argv)
    try:
        count = PREPARERS[args.data](args.root, args.out, workers=args.workers)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {count} {args.data} training images to {args.out}: train with data={args.data} data.streaming={args.out}")
