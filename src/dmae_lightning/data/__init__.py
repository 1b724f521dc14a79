"""Data sets: one module per data set, each a LightningDataModule that yields ``(image, label)`` pairs of
[0,1] pixel images at native resolution (models resize and normalise inside).

- :mod:`.base`      ``ImageDataModule`` (splits, subsets, loaders, streaming switch) and the data errors
- :mod:`.imagenet`  ImageNet class folders; :mod:`.cifar10` the CIFAR-10 python batches; :mod:`.digits` the
                    bundled scikit-learn digits (the offline real data)
- :mod:`.pipelines` JPEG decoding paths (PIL, torchvision tensors, on the device)
- :mod:`.streaming` litdata shards: ``python prepare.py`` writes them, training streams them

A new data set is one module here (a subclass of ``ImageDataModule`` with ``dataset(split)`` sources and
``num_classes``), one ``conf/data/<name>.yaml`` and one line below. Imports: torch, torchvision, timm, litdata
(lazily), scikit-learn, and from this package only ``dmae_lightning.errors`` and ``dmae_lightning.rng``;
nothing from models, training, certification or jobs.
"""

from dmae_lightning.data.base import SPLITS, ImageDataModule
from dmae_lightning.data.cifar10 import (
    CIFAR10_FOLDER,
    CIFAR10Batches,
    CIFAR10DataModule,
    cifar10_problem,
    read_cifar10_batch,
)
from dmae_lightning.data.digits import DigitsDataModule
from dmae_lightning.data.errors import UNDECODABLE, BrokenImageError, DataError
from dmae_lightning.data.imagenet import ImageNetDataModule

__all__ = [
    "CIFAR10_FOLDER",
    "SPLITS",
    "UNDECODABLE",
    "BrokenImageError",
    "CIFAR10Batches",
    "CIFAR10DataModule",
    "DataError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "cifar10_problem",
    "read_cifar10_batch",
]
