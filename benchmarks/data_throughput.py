"""Input-pipeline throughput: images/s of each data module's training loader (decode + augment + collate).

    python benchmarks/data_throughput.py                          # CPU: 1..cpu_count workers
    python benchmarks/data_throughput.py --device cuda --workers 1 2 4 8 --images 4096 --batch 256

ImageNet is measured on an ImageNet-layout folder of real JPEGs that the script writes once (--root):
crops of scikit-learn's two bundled photographs with a little sensor-like grain, re-encoded at ImageNet's
common sizes to about 110 KB each (the ImageNet train set averages ~110 KB at ~400x350). Each pipeline
(``pil`` reference, ``tensor``, ``device``; pipelines.py) and augment is timed for each worker count;
the device pipeline includes the decode + crop + flip on --device (on the CPU: its fallback). CIFAR-10
is timed on python batches of random bytes written the same way (torchvision's md5 check relaxed, as in
the tests), digits on its bundled data. Prints a table and writes JSON (device, versions) to --out.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.datasets.cifar
from common import environment, synchronize, write_results
from PIL import Image
from sklearn.datasets import load_sample_images

from dmae_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule

# ImageNet's most common sizes (width, height), a landscape majority, and some larger photos.
SIZES = [(500, 375)] * 5 + [(375, 500)] * 2 + [(500, 333), (500, 400), (800, 600)]


def write_imagenet(root: Path, images: int, classes: int = 8, seed: int = 0) -> float:
    """``root/train/<wnid>/<i>.JPEG``; returns the mean file size in KB. Kept if already complete."""
    files = sorted((root / "train").glob("*/*.JPEG"))
    if len(files) == images:
        return float(np.mean([f.stat().st_size for f in files])) / 1e3
    rng = np.random.default_rng(seed)
    photos = [np.asarray(p) for p in load_sample_images().images]  # two 427x640 RGB photographs
    for i in range(images):
        photo = photos[i % 2]
        w, h = SIZES[rng.integers(len(SIZES))]
        side = rng.uniform(0.5, 1.0)
        ch, cw = int(photo.shape[0] * side), int(photo.shape[1] * side)
        y, x = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
        crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.normal(
            0, 10, size=(h, w, 3)
        )  # upscaled photos are too smooth to weigh what ImageNet's do
        pixels = np.clip(np.asarray(crop) + grain, 0, 255).astype(np.uint8)
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=93)
    return write_imagenet(root, images, classes, seed)


def write_cifar(root: Path, per_batch: int, seed: int = 0) -> None:
    """torchvision's python-batch layout with random bytes (the pipeline cost does not depend on content)."""
    folder = root / "cifar-10-batches-py"
    if (folder / "test_batch").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": [0] * per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(c) for c in range(10)]}, f)


def time_loader(dm, batches: int, device: torch.device) -> float:
    """Images/s over ``batches`` batches after the first (worker start-up), including the device transfer."""
    loader = dm.train_dataloader()
    it = iter(loader)
    dm.transfer_batch_to_device(next(it), device, 0)
    synchronize(device.type)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = dm.transfer_batch_to_device(next(it), device, 0)
        seen += len(images)
    synchronize(device.type)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/dmae_data_throughput"))
    parser.add_argument(
        "--images", type=int, default=384, help="JPEGs in the synthetic ImageNet train folder"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(range(0, (os.cpu_count() or 1) + 1)),
        help="loader worker counts; 0 decodes in the main process (the cost of one image, no overlap)",
    )
    parser.add_argument("--pipelines", nargs="+", default=["pil", "tensor", "device"])
    # randaug is not in the default: timm's rand-m9-mstd0.5-inc1 can draw posterize with 0 bits, which
    # Pillow 13 rejects (ValueError), so a long run stops; measure it with --augments flip randaug.
    parser.add_argument("--augments", nargs="+", choices=["flip", "randaug"], default=["flip"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/results/local/...)")
    args = parser.parse_args()
    device = torch.device(args.device)
    mean_kb = write_imagenet(args.root / "imagenet", args.images)
    write_cifar(args.root / "cifar10", per_batch=2000)
    # The random CIFAR bytes cannot match torchvision's md5 of the real files: check existence only.
    torchvision.datasets.cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    batches = args.images // args.batch - 1

    configs = [
        ("imagenet", pipeline, augment)
        for augment in args.augments
        for pipeline in args.pipelines
        if not (pipeline == "device" and augment != "flip")
    ] + [("cifar10", "-", "flip"), ("digits", "-", "shift")]
    rows = []
    for name, pipeline, augment in configs:
        for workers in args.workers:
            common = dict(
                batch_size=args.batch, augment=augment, num_workers=workers, persistent_workers=False
            )
            if name == "imagenet":
                dm = ImageNetDataModule(args.root / "imagenet", num_classes=8, pipeline=pipeline, **common)
            elif name == "cifar10":
                dm = CIFAR10DataModule(args.root / "cifar10", **common)
            else:
                dm = DigitsDataModule(**common)
            rate = time_loader(dm, min(batches, len(dm.train_dataloader()) - 1), device)
            row = dict(data=name, pipeline=pipeline, augment=augment, workers=workers, images_per_s=rate)
            rows.append(row)
            print(f"  {name} {pipeline} {augment} workers={workers}: {rate:.0f} images/s", flush=True)

    meta = {
        **environment(device.type),
        "cpu_cores": os.cpu_count(),
        "synthetic_imagenet": {"images": args.images, "mean_kb": mean_kb, "batch": args.batch},
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on a shared machine slows every number
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "command": " ".join(sys.argv),
    }
    print(f"\n{meta}")
    print(f"{'data':9} {'pipeline':8} {'augment':8} {'workers':>7} {'images/s':>9} {'per worker':>10}")
    for r in rows:
        print(
            f"{r['data']:9} {r['pipeline']:8} {r['augment']:8} {r['workers']:7d} {r['images_per_s']:9.0f} "
            f"{r['images_per_s'] / max(1, r['workers']):10.0f}"
        )
    write_results(args.out, f"data_throughput_{device.type}.json", meta, rows)


if __name__ == "__main__":
    main()
