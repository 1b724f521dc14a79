"""Cost of drawing the certification noise: DiscreteGaussianNoise against GaussianNoise, next to a ViT-B forward.

    python benchmarks/noise_cost.py                       # CPU, [100,3,224,224] blocks, ViT-B on 10 images
    python benchmarks/noise_cost.py --device cuda --forward-images 100

Times ``noisy_copies`` for one seeded block of 100 noisy copies of a 224x224 image (a fresh seeded
generator per block, as the certification sampler does) for both noises (GaussianNoise is torch.randn, as
public randomized-smoothing code draws it), and timm's vit_base_patch16_224 forward (eval, no grad, float32)
on ``--forward-images`` of those copies, scaled to 100 images (the forward is linear in the batch beyond a
few images). Prints a table (median of ``--repeats``) and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from common import environment, synchronize, write_results

from dmae_lightning.noise import DiscreteGaussianNoise, GaussianNoise

BLOCK = 100


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (threshold tables, allocator, kernels)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument(
        "--forward-images", type=int, default=10, help="ViT-B forward batch (time scaled to 100)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/local/...)")
    args = parser.parse_args()
    device = args.device
    image = (torch.randint(0, 256, (3, 224, 224)) / 255).to(device)  # [3,224,224], 8-bit
    out = torch.empty(BLOCK, 3, 224, 224, device=device)  # [100,3,224,224]

    noise_seconds = {}
    for noise in (GaussianNoise(args.sigma), DiscreteGaussianNoise(args.sigma)):

        def draw(noise=noise):
            noise.noisy_copies(image, torch.Generator(device=device).manual_seed(1), out)

        noise_seconds[type(noise).__name__] = median_seconds(draw, device, args.repeats)

    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device).eval()
    batch = out[: args.forward_images]
    with torch.inference_mode():
        forward = median_seconds(lambda: model(batch), device, args.repeats) * BLOCK / args.forward_images

    gauss = noise_seconds["GaussianNoise"]
    rows = [
        {
            "noise": name,
            "noise_s_per_block": seconds,
            "forward_s_per_100_images": forward,
            "noise_over_forward": seconds / forward,
            "certification_slowdown_vs_gaussian": (seconds + forward) / (gauss + forward) - 1,
        }
        for name, seconds in noise_seconds.items()
    ]
    print(f"{'noise':<24}{'noise s/block':>14}{'ViT-B s/100':>13}{'noise/fwd':>11}{'cert. slowdown':>16}")
    for r in rows:
        print(
            f"{r['noise']:<24}{r['noise_s_per_block']:>14.4f}{r['forward_s_per_100_images']:>13.3f}"
            f"{r['noise_over_forward']:>10.2%}{r['certification_slowdown_vs_gaussian']:>15.2%}"
        )
    meta = {
        **environment(device),
        "block": [BLOCK, 3, 224, 224],
        "sigma": args.sigma,
        "forward_images": args.forward_images,
        "repeats": args.repeats,
        "model": "vit_base_patch16_224",
    }
    write_results(args.out, f"noise_cost_{device}.json", meta, rows)


if __name__ == "__main__":
    main()
