"""LightningDataModules for ImageNet, CIFAR-10 and scikit-learn's digits.

Every module yields ``(image, label)``: image a float tensor in [0,1] of shape [3, H, W] at the data
set's native resolution, label an int (int64 once batched). Nothing is normalised here: the models
resize and normalise inside, so noise and certified radii live in pixel space (docs/DESIGN.md).
``dataset(split)`` gives the certification job direct, index-stable access to each split.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sized
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, Subset

from dmae_lightning.errors import ConfigError

if TYPE_CHECKING:
    from dmae_lightning.data.streaming import ResumableStreamingDataLoader

SPLITS = ("train", "val", "test")
# The splits each Lightning stage needs; a stage not listed here (or None) builds all three.
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
}


def dataset_size(dataset: Dataset) -> int:
    """The number of items of a map-style dataset (every split of these modules is one); TypeError for a
    dataset without a length (an iterable-style one)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no length: the data modules need map-style datasets")
    return len(dataset)


class ImageDataModule(pl.LightningDataModule):
    """Options, subsetting, caching and loaders shared by the concrete data modules.

    Subclasses set ``name``, ``image_size``, ``num_classes`` and ``AUGMENTS`` and implement
    ``_build(source)``, the full dataset of one source split with its transform. ``_source`` maps a
    split to the source it reads, so splits that read the same files share one dataset object.
    ``subset_every`` keeps every k-th item, then ``subset_first`` the first N of those (quick runs).
    ``num_classes`` may be given (so configs can interpolate ``${data.num_classes}``); it must match.
    ``streaming``: a folder or object-store URL of training shards written by ``prepare.py``; the training
    loader then streams them (streaming.py, shuffled and augmented with ``seed``) while val/test and
    ``dataset(split)`` keep reading the source files. Shards in a folder are checked when the module is built
    (``streaming.check_shards``: index, chunk files and sizes, at least one batch). Subclasses that support it set ``STREAMS`` and
    implement ``_stream_decode()``, the training transform of one stored image.
    """

    name: str
    image_size: int
    AUGMENTS: tuple[str, ...]
    STREAMS = False

    @property
    def num_classes(self) -> int:
        """The number of classes: a class constant where it is fixed (CIFAR-10, digits), found in the data
        otherwise (ImageNet's class folders)."""
        raise NotImplementedError

    def __init__(
        self,
        batch_size: int,
        augment: str,
        num_classes: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        subset_every: int = 1,
        subset_first: int | None = None,
        streaming: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if subset_every < 1:
            raise ValueError(f"subset_every must be >= 1, got {subset_every}")
        if subset_first is not None and subset_first < 1:
            raise ValueError(f"subset_first must be >= 1 or null, got {subset_first}")
        if augment not in self.AUGMENTS:
            raise ValueError(
                f"unknown augment {augment!r} for {self.name}: choose one of {list(self.AUGMENTS)}"
            )
        self.save_hyperparameters()
        self.streaming = streaming
        self.seed = seed
        self._stream_loader: ResumableStreamingDataLoader | None = None  # over the shards, once built
        self._stream_state: dict | None = None  # its position from a checkpoint, applied when it is built
        self.batch_size = batch_size
        self.augment = augment
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Persistent workers only exist when there are workers; DataLoader rejects the flag otherwise.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.subset_every = subset_every
        self.subset_first = subset_first
        self._expected_classes = num_classes
        self._datasets: dict[str, Dataset] = {}
        if streaming is not None:
            self._check_streaming(streaming, subset_every, subset_first)

    def _check_streaming(self, streaming: str, subset_every: int, subset_first: int | None) -> None:
        """Options first, then (local folders only) the shards themselves: their index and chunk files, and
        that they hold a batch, so damaged shards stop the job here instead of deep inside litdata's reader."""
        if not self.STREAMS:
            raise ValueError(f"{self.name} has no streaming shards: set data.streaming=null")
        if subset_every != 1 or subset_first is not None:
            raise ValueError(
                "subset_every / subset_first do not apply to streaming shards: prepare a smaller set"
            )
        if "://" in streaming:  # an object store: litdata reads the index when the loader is built
            return
        from dmae_lightning.data.streaming import check_shards  # litdata: imported only when streaming

        command = self._prepare_command(streaming)
        if not (Path(streaming) / "index.json").is_file():
            raise FileNotFoundError(
                f"streaming shards {streaming} are missing (no index.json): write them with {command}"
            )
        count = check_shards(streaming, command)
        if count < self.batch_size:
            raise ConfigError(
                f"streaming shards {streaming} hold {count} images, fewer than "
                f"batch_size={self.batch_size}: lower data.batch_size"
            )

    def _prepare_command(self, out: str) -> str:
        """The prepare.py command that writes this data set's shards to ``out`` (subclasses set ``root``
        before the base constructor's checks, whose messages give it)."""
        root = getattr(self, "root", None)
        if root is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets STREAMS but no root to prepare shards from"
            )
        return shlex.join(["python", "prepare.py", self.name, "--root", str(root), "--out", str(out)])

    def _stream_decode(self) -> Callable:
        raise NotImplementedError

    def _source(self, split: str) -> str:
        return split

    def _build(self, source: str) -> Dataset:
        raise NotImplementedError

    def _check_num_classes(self, found: int, where: str) -> None:
        """Keeps a stated ``num_classes`` from silently disagreeing with the data."""
        if self._expected_classes is not None and self._expected_classes != found:
            raise ValueError(f"data.num_classes={self._expected_classes} but {where} has {found} classes")

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` after the subset options; val/test use the eval transform."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {list(SPLITS)}")
        source = self._source(split)
        if source not in self._datasets:
            full = self._build(source)
            size = dataset_size(full)
            keep = list(range(0, size, self.subset_every))[: self.subset_first]
            self._datasets[source] = full if len(keep) == size else Subset(full, keep)
        return self._datasets[source]

    def setup(self, stage: str | None = None) -> None:
        """Builds (and so checks) the splits the stage needs before any training work starts; the training
        split must hold a batch (the training job calls ``setup("fit")`` before it builds the model)."""
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            if not (split == "train" and self.streaming):  # streamed: the source files may be elsewhere
                self.dataset(split)
                if split == "train":
                    self._check_train_size()

    def _check_train_size(self) -> None:
        """With drop_last a training split smaller than a batch gives empty epochs: training would silently
        do nothing. (Streaming shards are counted when the module is built.)"""
        n = dataset_size(self.dataset("train"))
        if n < self.batch_size:
            raise ConfigError(
                f"{self.name} train split has {n} images, fewer than batch_size={self.batch_size}: lower "
                "data.batch_size"
            )

    def _collate(self, split: str) -> Callable | None:
        """The loader's collate_fn for ``split`` (None: PyTorch's default)."""
        return None

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=self._collate(split),
        )

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            from dmae_lightning.data.streaming import (
                streaming_loader,  # litdata: imported only when streaming
            )

            loader = streaming_loader(
                self.streaming,
                self._stream_decode(),
                self.batch_size,
                self.num_workers,
                self.seed,
                collate_fn=self._collate("train"),
                pin_memory=self.pin_memory,
            )
            if self._stream_state is not None:
                loader.load_state_dict(self._stream_state)
                self._stream_state = None
            self._stream_loader = loader
            return loader
        self._check_train_size()  # again: setup may not have run
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    # The streaming loader's position travels in the data module's part of the checkpoint. Lightning also
    # saves it with the fit loop, but restores it only into a loader built after the loop state is loaded,
    # and the lr schedule (estimated_stepping_batches) builds the loader before that.
    def state_dict(self) -> dict:
        return {"stream_loader": self._stream_loader.state_dict()} if self._stream_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._stream_state = state.get("stream_loader")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
