"""LightningDataModules for ImageNet, CIFAR-10 and scikit-learn's digits.

Every module yields ``(image, label)``: image a float tensor in [0,1] of shape [3, H, W] at the data
set's native resolution, label an int (int64 once batched). Nothing is normalised here: the models
resize and normalise inside, so noise and certified radii live in pixel space (docs/DESIGN.md).
``dataset(split)`` gives the certification job direct, index-stable access to each split.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import tarfile
import urllib.error
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import rand_augment_transform
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets import cifar as torchvision_cifar
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import InterpolationMode

from dmae_lightning.errors import ConfigError, one_line
from dmae_lightning.models.layers import IMAGENET_MEAN
from dmae_lightning.pipelines import (
    PIPELINES,
    bytes_tensor,
    collate_bytes,
    decode_crop_flip,
    open_rgb,
    read_file,
    tensor_train_transform,
)

SPLITS = ("train", "val", "test")
# The splits each Lightning stage needs; a stage not listed here (or None) builds all three.
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def _raised_in_worker(text: str, error_type: type) -> str:
    """The message a DataLoader worker raised, out of PyTorch's re-raise of it; other texts as they are.

    A worker's exception does not travel itself: the main process gets its type and its formatted traceback,
    and raises ``error_type("Caught <type> in DataLoader worker process <n>.\nOriginal Traceback (most recent
    call last):\n ... \n<module>.<type>: <message>\n")`` (torch.utils._utils.ExceptionWrapper.reraise). The
    last line that starts with the type's qualified name holds the message (ours are one line).
    """
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    prefix = f"{error_type.__module__}.{error_type.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):]
    return text


class DataError(ConfigError):
    """Missing, damaged or unreadable data files: one line, which the entry points print wherever it is raised.

    Raised in a DataLoader worker, it reaches the main process as PyTorch rebuilds it there, from its type and
    the worker's traceback: the constructor keeps the one line of the original (``_raised_in_worker``), so a
    training job still prints ``error: <message>`` and not the worker's traceback.
    """

    def __init__(self, message: str):
        super().__init__(_raised_in_worker(message, type(self)))


class BrokenImageError(DataError):
    """An image file that cannot be decoded, raised by the dataset when item ``index`` is read.

    Raised per item, not when the folder is scanned (decoding a million JPEGs up front would take hours),
    so a job meets it at that image; ``path`` and ``index`` let the caller record the image as failed.
    ``BrokenImageError(text)`` alone is PyTorch rebuilding one raised in a DataLoader worker (see DataError):
    the fields are read back from the message.
    """

    _MESSAGE = re.compile(r"image (-?\d+) \((.*?)\) cannot be decoded: (.*)", re.DOTALL)

    def __init__(self, path: str, index: int | None = None, reason: str | None = None):
        if index is None:  # rebuilt from a worker's message
            message = _raised_in_worker(path, type(self))
            match = self._MESSAGE.fullmatch(message)
            path, index, reason = (match[2], int(match[1]), match[3]) if match else (None, None, message)
        else:
            message = f"image {index} ({path}) cannot be decoded: {reason}"
        super().__init__(message)
        self.path, self.index, self.reason = path, index, reason

    def __reduce__(self):  # pickled with its three fields (the default would call it with the message alone)
        fields = (self.path, self.index, self.reason) if self.index is not None else (str(self),)
        return type(self), fields


class _ImageDataModule(pl.LightningDataModule):
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
    num_classes: int
    AUGMENTS: tuple[str, ...]
    STREAMS = False

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
        self._stream_loader = None  # the training loader over the shards, once built
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
            raise ValueError("subset_every / subset_first do not apply to streaming shards: prepare a smaller set")
        if "://" in streaming:  # an object store: litdata reads the index when the loader is built
            return
        from dmae_lightning.streaming import check_shards  # litdata: imported only when streaming

        command = self._prepare_command(streaming)
        if not (Path(streaming) / "index.json").is_file():
            raise FileNotFoundError(f"streaming shards {streaming} are missing (no index.json): write them with {command}")
        count = check_shards(streaming, command)
        if count < self.batch_size:
            raise ConfigError(f"streaming shards {streaming} hold {count} images, fewer than "
                              f"batch_size={self.batch_size}: lower data.batch_size")

    def _prepare_command(self, out: str) -> str:
        """The prepare.py command that writes this data set's shards to ``out`` (subclasses set ``root``
        before the base constructor's checks, whose messages give it)."""
        return shlex.join(["python", "prepare.py", self.name, "--root", str(self.root), "--out", str(out)])

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
            keep = list(range(0, len(full), self.subset_every))[: self.subset_first]
            self._datasets[source] = full if len(keep) == len(full) else Subset(full, keep)
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
        n = len(self.dataset("train"))
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
            from dmae_lightning.streaming import streaming_loader  # litdata: imported only when streaming

            self._stream_loader = streaming_loader(
                self.streaming, self._stream_decode(), self.batch_size, self.num_workers, self.seed,
                collate_fn=self._collate("train"), pin_memory=self.pin_memory,
            )
            if self._stream_state is not None:
                self._stream_loader.load_state_dict(self._stream_state)
                self._stream_state = None
            return self._stream_loader
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


# PIL: truncated or unidentified files (OSError), bad headers (SyntaxError), images over its pixel limit
# (DecompressionBombError; the warning between 1x and 2x the limit too, where warnings are errors);
# RuntimeError: torchvision's JPEG decoder (the tensor pipeline).
UNDECODABLE = (OSError, SyntaxError, RuntimeError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def _why_undecodable(path: str, err: BaseException) -> str:
    """One line on why ``path`` cannot be decoded (PIL says "cannot identify image file" of an empty file)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass  # gone since the folder was scanned: the error says so
    return one_line(err)


class _CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose items that cannot be decoded raise BrokenImageError (file and index, one line) instead
    of PIL's OSError, which names neither."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return super().__getitem__(index)
        except UNDECODABLE as err:
            path = self.samples[index][0]
            raise BrokenImageError(path, index, _why_undecodable(path, err)) from None


def _has_images(folder: Path) -> bool:
    """Whether ImageFolder finds an image in ``folder`` (it searches subfolders too, following links)."""
    return any(
        datasets.folder.has_file_allowed_extension(name, datasets.folder.IMG_EXTENSIONS)
        for _, _, names in os.walk(folder, followlinks=True)
        for name in names
    )


class ImageNetDataModule(_ImageDataModule):
    """ImageNet-1k from an ImageFolder tree ``root/{train,val}/<wnid>/<image>.JPEG``.

    ``val`` and ``test`` both read ``root/val``: the ImageNet protocol certifies the validation set.
    augment: "flip" = RandomResizedCrop(224, scale 0.2-1, bicubic) + flip (pre-training); "randaug" =
    RandomResizedCrop(224, scale 0.08-1, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 (fine-tuning);
    "none" = the deterministic eval transform, resize 256 (bicubic) + centre crop 224.
    pipeline (training split only): "pil" (torchvision v1 on full-size PIL images), "tensor" (reduced-size
    JPEG decoding where the crop allows + transforms.v2 on uint8) or "device" (decode, crop and flip on
    the training device, augment "flip" only); see pipelines.py. val/test always use the PIL eval transform.
    Folders are checked when a split is first built (``setup`` or ``dataset``), so a certification
    job that reads only ``val`` does not need ``train``.
    """

    name = "imagenet"
    image_size = 224
    AUGMENTS = ("none", "flip", "randaug")
    STREAMS = True

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int = 64,
        augment: str = "flip",
        pipeline: str = "pil",
        **kwargs,
    ):
        self.root = Path(root)  # before the base's checks: a streaming refusal gives the prepare.py command
        super().__init__(batch_size=batch_size, augment=augment, **kwargs)
        if pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {pipeline!r} for imagenet: choose one of {list(PIPELINES)}")
        if pipeline == "device" and augment != "flip":
            raise ValueError(f"pipeline='device' does augment='flip' only, got augment={augment!r}")
        self.pipeline = pipeline
        self._classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """The stated count, else the class folders of a loaded split, else those of ``root/train``."""
        if self._expected_classes is not None:
            return self._expected_classes
        if self._classes is None:
            self._classes = datasets.folder.find_classes(self._folder("train"))[0]
        return len(self._classes)

    def _missing(self, folder: Path) -> FileNotFoundError:
        return FileNotFoundError(
            f"ImageNet folder {folder} is missing or empty: expected {self.root}/train/<wnid>/<image>.JPEG "
            f"(and {self.root}/val/<wnid>/<image>.JPEG)"
        )

    def _without_images(self, folder: Path) -> FileNotFoundError:
        """The refusal of a split with class folders that hold no image: the folder itself if none holds one
        (a split never filled in), else the empty class folders by name."""
        classes = datasets.folder.find_classes(folder)[0]
        empty = [wnid for wnid in classes if not _has_images(folder / wnid)]
        if len(empty) < len(classes):
            more = f" (nor do {', '.join(empty[1:4])}{', ...' if len(empty) > 4 else ''})" if len(empty) > 1 else ""
            return FileNotFoundError(
                f"ImageNet class folder {folder / empty[0]} has no image files{more}: expected "
                f"{folder / empty[0]}/<image>.JPEG"
            )
        return self._missing(folder)

    def _folder(self, source: str) -> Path:
        """``root/<source>``, which must hold at least one class folder."""
        folder = self.root / source
        if not folder.is_dir() or not any(entry.is_dir() for entry in os.scandir(folder)):
            raise self._missing(folder)
        return folder

    def _source(self, split: str) -> str:
        return "train" if split == "train" else "val"

    @staticmethod
    def _eval_transform() -> Callable:
        return transforms.Compose(
            [
                transforms.Resize(256, interpolation=InterpolationMode.BICUBIC),
                transforms.CenterCrop(224),
                transforms.ToTensor(),  # float [3, 224, 224] in [0,1]
            ]
        )

    @property
    def _crop_scale(self) -> tuple[float, float]:
        return (0.2, 1.0) if self.augment == "flip" else (0.08, 1.0)

    def _train_decode(self) -> Callable:
        """Encoded file bytes -> training sample, for the chosen pipeline (the device pipeline decodes
        in transfer_batch_to_device and ships the bytes)."""
        if self.augment == "none":
            return transforms.Compose([open_rgb, self._eval_transform()])
        if self.pipeline == "device":
            return bytes_tensor
        randaug = None
        if self.augment == "randaug":
            # The hparams timm's create_transform passes; we call RandAugment directly because
            # create_transform either normalises or, with normalize=False, returns unscaled uint8.
            hparams = {
                "translate_const": int(224 * 0.45),
                "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
                "interpolation": Image.Resampling.BICUBIC,
            }
            randaug = rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
        if self.pipeline == "tensor":
            return tensor_train_transform(224, self._crop_scale, randaug)
        steps = [
            open_rgb,
            transforms.RandomResizedCrop(224, scale=self._crop_scale, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            *([randaug] if randaug else []),
            transforms.ToTensor(),
        ]
        return transforms.Compose(steps)  # float [3, 224, 224] in [0,1]

    def _stream_decode(self) -> Callable:
        return self._train_decode()  # the shards hold the JPEG files' bytes

    def _collate(self, split: str) -> Callable | None:
        return collate_bytes if split == "train" and self.pipeline == "device" else None

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """The device pipeline's training batches (a list of encoded files) are decoded on ``device``."""
        if self.pipeline == "device" and isinstance(batch[0], list):
            encoded, labels = batch
            return decode_crop_flip(encoded, device, 224, self._crop_scale), labels.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _build(self, source: str) -> Dataset:
        folder = self._folder(source)
        loader, transform = (
            (read_file, self._train_decode())
            if source == "train"
            else (datasets.folder.default_loader, self._eval_transform())
        )
        try:
            data = _CheckedImageFolder(folder, transform=transform, loader=loader)
        except FileNotFoundError:  # ImageFolder's complaint about a class folder without images
            raise self._without_images(folder) from None
        self._check_num_classes(len(data.classes), str(folder))
        if self._classes is None:
            self._classes = data.classes
        elif self._classes != data.classes:
            # Labels are indices into the sorted wnids: differing folders would silently shift them.
            raise ValueError(f"class folders of {folder} differ from those of the other ImageNet split")
        return data


# --- CIFAR-10 python batches ----------------------------------------------------------------------------
CIFAR10_FOLDER = "cifar-10-batches-py"

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.numeric import _frombuffer as _np_frombuffer

# Everything a CIFAR-10 batch may ask the unpickler for: numpy's rebuilding of an array (dict, list, str and
# bytes need no lookup). The published files were pickled under numpy.core; numpy >= 2 pickles under
# numpy._core, and Python >= 3.14's default protocol 5 writes arrays through _frombuffer.
_BATCH_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _np_reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _np_frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else.

    The batches are pickles, and ``pickle.load`` calls whatever a file names (a crafted batch can run
    ``os.system``); neither pickle nor torchvision has a loader limited to data, so the few globals a
    batch needs are listed here and any other request stops the load before it is called.
    """

    def find_class(self, module: str, name: str):
        try:
            return _BATCH_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}") from None


def _unpickle_cifar10(path: Path, key: str) -> dict:
    """The dict pickled in ``path`` (str keys, as torchvision reads it), which must hold ``key``."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as err:  # a refused global, or a pickle broken in any of many ways
        reason = one_line(err)
        raise DataError(f"CIFAR-10 file {path} is not a CIFAR-10 python batch ({reason}): refusing it") from None
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"CIFAR-10 file {path} is not a CIFAR-10 python batch (no {key!r} entry)")
    return entry


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """A python batch's images, uint8 [N, 32, 32, 3] (HWC, as torchvision's CIFAR10), and labels."""
    entry = _unpickle_cifar10(path, "data")
    data, labels = entry["data"], entry.get("labels")
    images = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    if not (images and isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(y, int) for y in labels)):
        raise DataError(f"CIFAR-10 file {path} is not a CIFAR-10 python batch (expected uint8 [N, 3072] data and "
                        "N int labels)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar10_published() -> list[tuple[str, str]]:
    """(file name, published md5) of the seven files, in torchvision's order: training batches, test, meta."""
    listed = [*datasets.CIFAR10.train_list, *datasets.CIFAR10.test_list]
    listed.append([datasets.CIFAR10.meta["filename"], datasets.CIFAR10.meta["md5"]])
    return [(name, md5) for name, md5 in listed]


def cifar10_problem(folder: Path, names: Collection[str] | None = None) -> str | None:
    """The first CIFAR-10 file in ``folder`` (of ``names``; default all seven) that is missing or whose md5
    differs from the published one, in words; None when all are intact. Run before any file is unpickled."""
    for name, md5 in _cifar10_published():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            return f"CIFAR-10 file {path} is missing"
        # torchvision's check, looked up where torchvision's own download calls it: one place to relax in tests
        if not torchvision_cifar.check_integrity(str(path), md5):
            return f"CIFAR-10 file {path} is damaged (its md5 differs from the published one)"
    return None


class CIFAR10Batches(Dataset):
    """The training (``train=True``) or test batch of ``folder`` as (image, label): the items, order,
    ``classes`` and PIL images torchvision's CIFAR10 gives, read with the restricted unpickler. The caller
    checks the md5s first (``cifar10_problem``)."""

    def __init__(self, folder: Path, train: bool, transform: Callable | None = None):
        listed = datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list
        batches = [read_cifar10_batch(folder / name) for name, _ in listed]
        self.data = np.concatenate([images for images, _ in batches])  # uint8 [N, 32, 32, 3]
        self.targets = [label for _, labels in batches for label in labels]
        meta = folder / datasets.CIFAR10.meta["filename"]
        self.classes = list(_unpickle_cifar10(meta, "label_names")["label_names"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple:
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 from the python batches in ``root/cifar-10-batches-py`` (32x32).

    ``val`` and ``test`` both read the official test batch: the paper certifies the test set and
    does no model selection on CIFAR-10. Downloading is opt-in (``download=True``: torchvision's download
    of the published archive, done in ``prepare_data`` on one process per node). Every file's md5 is
    checked against the published one before any is read, so damaged files are caught too, and the
    batches are read by a restricted unpickler (``CIFAR10Batches``). augment: "flip" (the paper's recipe)
    or "none".
    """

    name = "cifar10"
    image_size = 32
    num_classes = 10
    AUGMENTS = ("none", "flip")
    STREAMS = True

    def __init__(
        self,
        root: str | os.PathLike,
        download: bool = False,
        batch_size: int = 256,
        augment: str = "flip",
        **kwargs,
    ):
        self.root = Path(root)  # before the base's checks: a streaming refusal gives the prepare.py command
        super().__init__(batch_size=batch_size, augment=augment, **kwargs)
        self._check_num_classes(self.num_classes, "CIFAR-10")
        self.download = download
        self.folder = self.root / CIFAR10_FOLDER
        if not download and not self.folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 folder {self.folder} is missing: put the python batches there or set data.download=true"
            )

    def prepare_data(self) -> None:
        if self.download:
            self._fetch()

    def _fetch(self) -> None:
        """Downloads and unpacks the published archive (md5-checked by torchvision) unless every file is intact."""
        if cifar10_problem(self.folder) is not None:
            tv = datasets.CIFAR10
            try:
                download_and_extract_archive(tv.url, str(self.root), filename=tv.filename, md5=tv.tgz_md5)
            # URLError (no network, refused; an OSError), HTTPError (a URLError), a full disk (OSError), a
            # download whose md5 differs (torchvision's RuntimeError), an archive that does not unpack
            except (OSError, RuntimeError, tarfile.TarError, EOFError) as err:
                if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
                    reason = one_line(err.reason) if isinstance(err.reason, BaseException) else str(err.reason)
                else:
                    reason = one_line(err)
                raise DataError(
                    f"cannot download CIFAR-10 ({reason}): put the files in {self.folder} as the python batches"
                ) from None

    def _source(self, split: str) -> str:
        return "train" if split == "train" else "test"

    def _transform(self, source: str) -> Callable:
        steps = [transforms.RandomHorizontalFlip()] if source == "train" and self.augment == "flip" else []
        return transforms.Compose([*steps, transforms.ToTensor()])  # float [3, 32, 32], bytes / 255

    def _stream_decode(self) -> Callable:
        return transforms.Compose([Image.fromarray, self._transform("train")])  # shards: uint8 [32, 32, 3]

    def _build(self, source: str) -> Dataset:
        if self.download:  # only fetches what prepare_data has not already verified
            self._fetch()
        problem = cifar10_problem(self.folder)
        if problem is not None:
            raise DataError(f"{problem}: remove the folder and set data.download=true")
        return CIFAR10Batches(self.folder, train=source == "train", transform=self._transform(source))


class _ImageTensors(Dataset):
    """Precomputed [N, 3, H, W] images with labels and an optional per-item transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]  # [3, H, W]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, no download needed.

    A tiny real data set for end-to-end runs on a CPU. Pixels 0..16 are scaled to [0,1], upsampled
    bilinearly to 32x32 (smooth strokes; bilinear weights are convex, so values stay in [0,1], and a
    clamp removes float rounding) and repeated to 3 channels. A seeded stratified split gives exactly
    1,257 train / 180 val / 360 test images; the test split is for final evaluation only.
    augment: "none" or "shift" (random crop 32 with zero padding 2). No "flip": a mirrored digit
    is a different symbol.
    """

    name = "digits"
    image_size = 32
    num_classes = 10
    AUGMENTS = ("none", "shift")
    SPLIT_SIZES = {"train": 1257, "val": 180, "test": 360}

    def __init__(self, batch_size: int = 64, augment: str = "none", split_seed: int = 0, **kwargs):
        if augment == "flip":
            raise ValueError(
                "augment='flip' is wrong for digits (a mirrored digit is another symbol): use none or shift"
            )
        super().__init__(batch_size=batch_size, augment=augment, **kwargs)
        self._check_num_classes(self.num_classes, "digits")
        self.split_seed = split_seed
        digits = load_digits()
        pixels = torch.from_numpy(digits.images).float().div(16.0)  # [1797, 8, 8] in [0,1]
        upsampled = F.interpolate(
            pixels[:, None], size=32, mode="bilinear", align_corners=False
        )  # [1797, 1, 32, 32]
        self.images = upsampled.clamp(0.0, 1.0).repeat(1, 3, 1, 1)  # [1797, 3, 32, 32]
        self.labels = torch.from_numpy(digits.target).long()  # [1797]
        rest, test = train_test_split(
            np.arange(len(self.labels)),
            test_size=self.SPLIT_SIZES["test"],
            stratify=digits.target,
            random_state=split_seed,
        )
        train, val = train_test_split(
            rest, test_size=self.SPLIT_SIZES["val"], stratify=digits.target[rest], random_state=split_seed
        )
        # Sorted, so index i of a split follows the original order of the bundled file.
        self.indices = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def _build(self, source: str) -> Dataset:
        index = torch.from_numpy(self.indices[source])
        shift = source == "train" and self.augment == "shift"
        transform = transforms.RandomCrop(32, padding=2) if shift else None
        return _ImageTensors(self.images[index], self.labels[index], transform)
