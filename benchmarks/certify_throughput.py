"""Certification throughput: noisy forward passes per second of Smooth.certify, per model and precision.

    python benchmarks/certify_throughput.py --models vit_micro_patch8 vit_tiny_patch8 --n 1000 --device cpu
    python benchmarks/certify_throughput.py --models vit_base_patch16 --img-size 224 --n 10000 --device cuda \
        --precision fp32 bf16 --batch 1000

Prints a table and writes the numbers, with device and library versions, to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import pytorch_lightning as pl
import timm
import torch
from dmae_lightning.smoothing import Smooth

from dmae_lightning.models import create_model
from dmae_lightning.rng import seeded_generator


def measure(name: str, img_size: int, n0: int, n: int, batch: int, precision: str, images: int, device: str):
    model = create_model(name, num_classes=10).to(device).eval()
    smooth = Smooth(model, num_classes=10, sigma=0.25, precision=precision)
    x = torch.rand(3, img_size, img_size, device=device)
    smooth.certify(
        x, n0, min(n, batch), 0.001, batch, generator=seeded_generator(0, 0, device=device)
    )  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for idx in range(images):
        smooth.certify(x, n0, n, 0.001, batch, generator=seeded_generator(0, idx, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / images
    return {
        "model": name,
        "img_size": img_size,
        "precision": precision,
        "batch": batch,
        "n0": n0,
        "n": n,
        "seconds_per_image": seconds,
        "samples_per_second": (n0 + n) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_micro_patch8", "vit_tiny_patch8"])
    parser.add_argument("--img-size", type=int, default=32, help="native image size fed to Smooth")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1100)
    parser.add_argument("--precision", nargs="+", default=["fp32"])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="certify_throughput.json")
    args = parser.parse_args()

    rows = [
        measure(name, args.img_size, args.n0, args.n, args.batch, precision, args.images, args.device)
        for name in args.models
        for precision in args.precision
    ]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    meta = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }
    print(f"{'model':24} {'precision':9} {'batch':>6} {'s/image':>9} {'samples/s':>11}   ({meta})")
    for r in rows:
        print(
            f"{r['model']:24} {r['precision']:9} {r['batch']:6d} {r['seconds_per_image']:9.3f} "
            f"{r['samples_per_second']:11.0f}"
        )
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
