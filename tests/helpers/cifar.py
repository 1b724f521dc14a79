"""CIFAR-10 python batches written for tests: the real layout (also as Python 2 wrote it) and a hostile one."""

from __future__ import annotations

import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the published batches (protocol 2): every str and bytes as an
    8-bit string (loaded back as str with ``encoding="latin1"``) and numpy under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_string
    dispatch[bytes] = save_string

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def _dump(obj, path: Path, python2: bool) -> None:
    with open(path, "wb") as f:
        if python2:
            Python2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f)


def write_cifar(root: Path, per_batch: int = 2, n_test: int = 4, python2: bool = False) -> dict[str, tuple]:
    """The python-version layout in ``root/cifar-10-batches-py``: pickled dicts with 'batch_label', 'data'
    (uint8 [N, 3072], CHW rows), 'labels' and 'filenames', and ``batches.meta``; returns name -> (data, labels).

    The real files were pickled by Python 2 (``python2=True`` writes them that way), whose str keys load as
    str under ``encoding="latin1"``; str keys pickled by Python 3 load the same way.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {
            "batch_label": name,
            "data": data,
            "labels": labels,
            "filenames": [f"{i}.png" for i in range(n)],
        }
        _dump(entry, folder / name, python2)
        written[name] = (data, labels)
    meta = {"label_names": LABEL_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072}
    _dump(meta, folder / "batches.meta", python2)
    return written


class _RunsCode:
    """Unpickled, runs ``touch <marker>``: what a hostile batch file can do to plain ``pickle.load``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_hostile(path: Path, marker: Path) -> None:
    """Replaces the batch at ``path`` with a pickle in its layout whose 'data' runs code when loaded."""
    path.write_bytes(pickle.dumps({"batch_label": path.name, "data": _RunsCode(marker), "labels": [0]}))
