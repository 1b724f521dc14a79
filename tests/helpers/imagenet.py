"""An ImageNet-layout folder (``<root>/<split>/<wnid>/<wnid>_<i>.JPEG``) of small random JPEGs for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: labels 0, 1, 2
SIZES = [(300, 260), (180, 240), (257, 400)]  # (width, height): landscape, portrait, odd


def write_imagenet(root: Path, splits=("train", "val"), per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                w, h = SIZES[i % len(SIZES)]
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=95)
