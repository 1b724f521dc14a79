"""Certification throughput, side by side in one run: our sampler against the official DMAE loop.

    python benchmarks/certify_throughput.py                       # small models on the CPU, seconds
    python benchmarks/certify_throughput.py --device cuda --models vit_base_patch16 vit_large_patch16 \
        --img-size 224 --n 10000 --precision default 32-true bf16-mixed --compile

For each model: noisy samples per second of
- ``reference``: a loop written the way the official code (quanlin-wu/dmae ``util/smooth.py``) does it:
  repeat the image per sample, ``randn_like``, fp16 autocast on CUDA, per-batch ``unique`` counts copied to
  the host; one image at a time;
- ``ours <precision> [compiled]``: ``Smooth.run`` with CERTIFY (block-seeded noise, several images per
  forward batch, counts on the device);
- ``forward only``: the base classifier's forward pass on ready batches (the ceiling).
Each row gives the ratio to the reference and, on a GPU, the model FLOP utilisation: FLOPs per forward
(torch.utils.flop_counter) x samples/s over a bf16 matmul rate measured in the same run.
Prints a table and writes JSON (device, versions, rows) to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import bf16_matmul_flops_per_s, environment, forward_flops, synchronize, write_results

from dmae_lightning.certification import Certify, Smooth
from dmae_lightning.models import create_model
from dmae_lightning.noise import GaussianNoise

SIGMA, ALPHA = 0.25, 0.001


def reference_certify(model, x, n0, n, batch, num_classes, device):
    """The official loop's shape of work: per batch repeat x, randn_like, autocast, unique counts to the host."""

    def counts(num):
        totals = torch.zeros(num_classes, dtype=torch.long)
        remaining = num
        while remaining > 0:
            this = min(batch, remaining)
            remaining -= this
            repeated = x.repeat((this, 1, 1, 1))  # [b,C,H,W]
            noisy = repeated + torch.randn_like(repeated) * SIGMA
            with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                predictions = model(noisy).argmax(1)
            classes, found = predictions.unique(return_counts=True)
            totals[classes.cpu()] += found.cpu()  # host sync per batch, as in the reference
        return totals

    with torch.no_grad():
        guess = int(counts(n0).argmax())
        return int(counts(n)[guess])


def timed(device, fn, *args) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def bench_model(name, args, matmul_rate) -> list[dict]:
    device, num_classes = args.device, args.num_classes
    model = create_model(name, num_classes=num_classes, img_size=args.img_size).to(device).eval()
    images = [(i, torch.rand(3, args.img_size, args.img_size, device=device), 0) for i in range(args.images)]
    flops = forward_flops(model, images[0][1][None])
    samples = args.images * (args.n0 + args.n)
    rows = []

    def row(what, seconds, extra=None):
        rate = samples / seconds
        rows.append(
            {
                "model": name,
                "what": what,
                "samples_per_s": rate,
                "seconds_per_image": seconds / args.images,
                "gflop_per_forward": flops / 1e9,
                "mfu": rate * flops / matmul_rate if matmul_rate else None,
                **(extra or {}),
            }
        )

    warm = images[:1]
    for x in warm:  # warm-up: cuDNN/cuBLAS choices, allocator
        reference_certify(model, x[1], args.n0, args.batch, args.batch, num_classes, device)
    reference_s = sum(
        timed(device, reference_certify, model, x, args.n0, args.n, args.batch, num_classes, device)
        for _, x, _ in images
    )
    row("reference (official loop)", reference_s)
    procedure = Certify(args.n0, args.n, ALPHA)
    for precision in args.precision:
        for compile in [False, True] if args.compile else [False]:
            chosen = None if precision == "default" else precision  # None: Smooth's by-device default
            smooth = Smooth(model, num_classes, GaussianNoise(SIGMA), precision=chosen, compile=compile)
            warm_procedure = Certify(args.n0, args.batch, ALPHA)
            compile_s = timed(device, smooth.run, warm_procedure, warm, args.batch)
            sampler = smooth.sampler(args.batch, 0, device)
            seconds = timed(device, smooth.run, procedure, images, args.batch)
            label = f"ours {sampler.precision}{' compiled' if compile else ''}" + (
                " (default)" if chosen is None else ""
            )
            row(label, seconds, {"warm_up_s": compile_s})
    batch = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    forward = torch.compile(model) if args.compile else model

    def forward_only():
        with torch.inference_mode(), autocast:
            for _ in range(-(-samples // args.batch)):
                forward(batch).argmax(1)

    with torch.inference_mode(), autocast:
        forward(batch)
    row(
        f"forward only{' compiled' if args.compile else ''} ({'bf16' if device == 'cuda' else 'fp32'})",
        timed(device, forward_only),
    )
    reference_rate = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_reference"] = r["samples_per_s"] / reference_rate
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_micro_patch8", "vit_tiny_patch8"])
    parser.add_argument("--img-size", type=int, default=32, help="native image size")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument(
        "--precision", nargs="+", default=["default"], help="default (by device) 32-true bf16-mixed 16-mixed"
    )
    parser.add_argument("--compile", action="store_true", help="also run the compiled sampler and forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, help="JSON (default benchmarks/results/local/certify_throughput_<device>.json)"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; TF32 would be a third precision
    matmul_rate = bf16_matmul_flops_per_s(args.device)
    meta = {
        **environment(args.device),
        "bf16_matmul_tflops": matmul_rate / 1e12 if matmul_rate else None,
        "n0": args.n0,
        "n": args.n,
        "batch": args.batch,
        "images": args.images,
        "img_size": args.img_size,
    }
    rows = [r for name in args.models for r in bench_model(name, args, matmul_rate)]
    print(f"{meta}\n")
    print("| model | what | samples/s | s/image | vs reference | MFU |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"| {r['model']} | {r['what']} | {r['samples_per_s']:,.0f} | {r['seconds_per_image']:.3f} | "
            f"{r['vs_reference']:.2f}x | {mfu} |"
        )
    write_results(args.out, f"certify_throughput_{args.device}.json", meta, rows)


if __name__ == "__main__":
    main()
