"""scikit-learn's bundled handwritten digits: the offline real data of the quickstart and the tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import transforms

from dmae_lightning.data.base import (
    ImageDataModule,
)


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


class DigitsDataModule(ImageDataModule):
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
