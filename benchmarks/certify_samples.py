"""Samples and time: fixed-n CERTIFY against sequential certification at fixed radii, on the same images.

    python benchmarks/certify_samples.py --ckpt logs/quickstart/.../finetune/checkpoints/last.ckpt \
        --grid 0 0.25 0.5 --n 10000
    python benchmarks/certify_samples.py --ckpt ... --grid 0 0.25 0.5 0.75 --n 100000 --max 120

Both procedures run on the same images of the data set's split through the same sampler (block-seeded
noise, images sharing forward batches). Prints certified accuracy per grid radius for both, total and
per-image samples, wall time, and the ratios; writes JSON (device, versions, numbers) to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import environment, synchronize, write_results

from dmae_lightning.certification import Certify, CertifyRadii, Smooth
from dmae_lightning.certification.metrics import certified_accuracy, radius_key
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.jobs.certify.job import trained_noise_of
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import load_weights, read_checkpoint
from dmae_lightning.noise import Noise


def load(ckpt: Path, device: str) -> tuple[torch.nn.Module, int, Noise]:
    """A fine-tuned classifier of this project's Lightning checkpoint: (model, classes, training noise)."""
    hp = read_checkpoint(ckpt)["hyper_parameters"]
    model = create_model(hp["model_name"], num_classes=hp["num_classes"], **(hp.get("model_kwargs") or {}))
    load_weights(model, ckpt)
    return model.to(device).eval(), int(hp["num_classes"]), trained_noise_of(hp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a fine-tuned digits classifier (.ckpt)")
    parser.add_argument("--grid", nargs="+", type=float, default=[0.0, 0.25, 0.5])
    parser.add_argument("--n", type=int, default=10_000, help="fixed n, and the sequential cap")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max", type=int, help="first images of the test split only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/results/local/...)")
    args = parser.parse_args()

    model, num_classes, noise = load(args.ckpt, args.device)
    dataset = DigitsDataModule().dataset("test")
    count = min(len(dataset), args.max or len(dataset))
    images = [(idx, dataset[idx][0].to(args.device), int(dataset[idx][1])) for idx in range(count)]
    smooth = Smooth(model, num_classes, noise)
    procedures = {
        "certify": Certify(args.n0, args.n, args.alpha),
        "certify_radii": CertifyRadii(tuple(args.grid), args.n, args.alpha, n0=args.n0),
    }
    rows = {}
    for name, procedure in procedures.items():
        synchronize(args.device)
        start = time.perf_counter()
        records = smooth.run(procedure, images, args.batch, args.seed)
        synchronize(args.device)
        seconds = time.perf_counter() - start
        samples = procedure.summarise(records, tuple(args.grid), noise).samples
        rows[name] = {
            "certified_accuracy": certified_accuracy(records, args.grid),
            "samples": samples,
            "samples_per_image": samples / count,
            "seconds": seconds,
            "samples_per_s": samples / seconds,
        }
    fixed, seq = rows["certify"], rows["certify_radii"]
    ratios = {
        "sample_saving": fixed["samples"] / seq["samples"],
        "time_saving": fixed["seconds"] / seq["seconds"],
        "throughput_ratio": seq["samples_per_s"] / fixed["samples_per_s"],
        "max_accuracy_gap_points": max(
            abs(100 * (fixed["certified_accuracy"][k] - seq["certified_accuracy"][k]))
            for k in fixed["certified_accuracy"]
        ),
    }
    meta = {
        **environment(args.device),
        "checkpoint": str(args.ckpt),
        "images": count,
        "noise": noise.config(),
        "grid": args.grid,
        "n": args.n,
        "n0": args.n0,
        "alpha": args.alpha,
        "batch": args.batch,
    }
    print(f"{meta}\n")
    keys = [radius_key(r) for r in args.grid]
    print("| procedure | " + " | ".join(f"r={k}" for k in keys) + " | samples | per image | s | samples/s |")
    print("|---|" + "---:|" * (len(keys) + 4))
    for name, r in rows.items():
        accs = " | ".join(f"{100 * r['certified_accuracy'][k]:.1f}" for k in keys)
        print(
            f"| {name} | {accs} | {r['samples']:,} | {r['samples_per_image']:,.0f} | {r['seconds']:.1f} | "
            f"{r['samples_per_s']:,.0f} |"
        )
    print(
        f"\nsequential uses {ratios['sample_saving']:.2f}x fewer samples, {ratios['time_saving']:.2f}x less time; "
        f"largest accuracy gap {ratios['max_accuracy_gap_points']:.2f} points; "
        f"throughput ratio {ratios['throughput_ratio']:.2f}"
    )
    write_results(
        args.out,
        f"certify_samples_n{args.n}_{args.device}.json",
        meta,
        [{"procedure": k, **v} for k, v in rows.items()] + [{"ratios": ratios}],
    )


if __name__ == "__main__":
    main()
