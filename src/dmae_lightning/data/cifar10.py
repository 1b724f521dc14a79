"""CIFAR-10 from the published python batches, md5-checked and read by a restricted unpickler."""

from __future__ import annotations

import os
import pickle
import tarfile
import urllib.error
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets import cifar as torchvision_cifar
from torchvision.datasets.utils import download_and_extract_archive

from dmae_lightning.data.base import ImageDataModule
from dmae_lightning.data.errors import DataError
from dmae_lightning.errors import one_line

# --- CIFAR-10 python batches ----------------------------------------------------------------------------
CIFAR10_FOLDER = "cifar-10-batches-py"

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer  # type: ignore[attr-defined]  # private: not in numpy's stubs
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]  # the same function
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]  # the same function

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
        raise DataError(
            f"CIFAR-10 file {path} is not a CIFAR-10 python batch ({reason}): refusing it"
        ) from None
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"CIFAR-10 file {path} is not a CIFAR-10 python batch (no {key!r} entry)")
    return entry


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """A python batch's images, uint8 [N, 32, 32, 3] (HWC, as torchvision's CIFAR10), and labels."""
    entry = _unpickle_cifar10(path, "data")
    data, labels = entry["data"], entry.get("labels")
    images = (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    )
    if not (
        images
        and isinstance(labels, list)
        and len(labels) == len(data)
        and all(isinstance(y, int) for y in labels)
    ):
        raise DataError(
            f"CIFAR-10 file {path} is not a CIFAR-10 python batch (expected uint8 [N, 3072] data and "
            "N int labels)"
        )
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


class CIFAR10DataModule(ImageDataModule):
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
                    reason = (
                        one_line(err.reason) if isinstance(err.reason, BaseException) else str(err.reason)
                    )
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
