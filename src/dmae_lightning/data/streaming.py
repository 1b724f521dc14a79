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

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from litdata import StreamingDataLoader, StreamingDataset

from dmae_lightning.data.errors import UNDECODABLE, DataError
from dmae_lightning.errors import one_line
from dmae_lightning.rng import derive_seed

AUGMENT_STREAM = 3  # keeps the streaming augmentation seeds apart from rng.py's noise streams
CHUNK_BYTES = "64MB"


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
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and isinstance(c.get("filename"), str) for c in chunks
        ):
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
                raise DataError(
                    f"item {int(key)} of streaming shards {self.source} cannot be decoded: {reason}"
                ) from None


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
) -> ResumableStreamingDataLoader:
    """The training loader over prepared shards (shuffled by chunk and item with ``seed``, last partial
    batch dropped, as the folder loader does)."""
    dataset = SeededStreamingImages(input_dir, decode, seed)
    if len(dataset) < batch_size:
        raise ValueError(
            f"streaming shards {input_dir} hold {len(dataset)} images, fewer than batch_size={batch_size}"
        )
    return ResumableStreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )
