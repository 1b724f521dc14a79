"""ImageNet from class folders (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/...``), decoded per
image by the chosen pipeline (:mod:`.pipelines`), streamed from shards when asked (:mod:`.streaming`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, rand_augment_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from dmae_lightning.data.base import ImageDataModule
from dmae_lightning.data.errors import UNDECODABLE, BrokenImageError, _why_undecodable
from dmae_lightning.data.pipelines import (
    PIPELINES,
    DecodedImages,
    DecodePrefetcher,
    bytes_tensor,
    collate_bytes,
    decode_crop_flip,
    open_rgb,
    prefetching_loader,
    read_file,
    tensor_train_transform,
)


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


class ImageNetDataModule(ImageDataModule):
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
            more = (
                f" (nor do {', '.join(empty[1:4])}{', ...' if len(empty) > 4 else ''})"
                if len(empty) > 1
                else ""
            )
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
                "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN),
                "interpolation": Image.Resampling.BICUBIC,
            }
            randaug = rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
        if self.pipeline == "tensor":
            return tensor_train_transform(224, self._crop_scale, randaug)
        steps = [
            open_rgb,
            transforms.RandomResizedCrop(
                224, scale=self._crop_scale, interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            *([randaug] if randaug else []),
            transforms.ToTensor(),
        ]
        return transforms.Compose(steps)  # float [3, 224, 224] in [0,1]

    def _stream_decode(self) -> Callable:
        return self._train_decode()  # the shards hold the JPEG files' bytes

    def _collate(self, split: str) -> Callable | None:
        return collate_bytes if split == "train" and self.pipeline == "device" else None

    def train_dataloader(self):
        loader = super().train_dataloader()
        if self.pipeline == "device":  # under a trainer, batches come through the decode prefetcher
            return prefetching_loader(loader, self._decode_prefetcher)
        return loader

    def _decode_prefetcher(self) -> DecodePrefetcher | None:
        """When training (a trainer attached), the decoder of the device the trainer trains on: on a GPU it
        decodes the next batch on a side stream during the step; elsewhere it decodes each batch when
        transfer_batch_to_device receives it, as the plain batches are. None without a trainer."""
        if self.trainer is None:
            return None
        device = self.trainer.strategy.root_device
        decode = functools.partial(decode_crop_flip, device=device, size=224, scale=self._crop_scale)
        return DecodePrefetcher.for_device(decode, device)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """The device pipeline's training batches (a list of encoded files) are decoded on ``device``; those
        of the decode prefetcher (training) are received there, on the current stream."""
        if self.pipeline == "device" and isinstance(batch[0], DecodedImages):
            images, labels = batch
            return images.receive().to(device), labels.to(device)
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
