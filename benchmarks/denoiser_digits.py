"""DMAE as a denoiser for a classifier trained on clean images, on the bundled digits (docs/denoiser.md).

    python train.py experiment=pretrain_digits                       # the DMAE (about 2-3 min on a CPU)
    python train.py experiment=finetune_digits \\
        pretrained=logs/pretrain_digits_sigma0.25/latest/checkpoints/last.ckpt   # (d), optional
    python benchmarks/denoiser_digits.py --dmae logs/pretrain_digits_sigma0.25/latest/checkpoints/last.ckpt \\
        --finetuned logs/finetune_digits_sigma0.25/latest/checkpoints/last.ckpt

Rows, all certified with CERTIFY (n0, n, alpha 0.001, seed 0, the same per-image noise) on the 360 test
images at sigma 0.25: (a) a ViT classifier trained here on clean images (plain loop, from scratch), alone;
(b) the same classifier behind the DMAE denoiser (mask ratio 0); (c) (b) with the classifier fine-tuned on
denoised noisy images (Salman et al. 2020's variant, the denoiser frozen); (d) the fine-tuned DMAE encoder of
the quickstart (``--finetuned``). Certified accuracy at 0 / 0.25 / 0.5, ACR, wall times.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, write_results
from torch import nn

from dmae_lightning.certification import Certify, Smooth
from dmae_lightning.certification.metrics import average_certified_radius, certified_accuracy
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.models import create_model
from dmae_lightning.models.denoiser import Denoised, load_denoiser
from dmae_lightning.models.weights import load_weights, read_checkpoint
from dmae_lightning.noise import GaussianNoise

RADII = (0.0, 0.25, 0.5)


def split(dm: DigitsDataModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(dm.indices[name])
    return dm.images[index], dm.labels[index]


def fit(model: nn.Module, x, y, epochs: int, lr: float, prepare=None, seed: int = 0) -> float:
    """A plain AdamW loop (batch 64, linear warm-up then cosine, weight decay 0.05); ``prepare(batch, generator)`` turns the
    clean batch into the model's input (identity: clean training). Returns the wall time."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / 64)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            inputs = x[batch] if prepare is None else prepare(x[batch], g)
            loss = F.cross_entropy(model(inputs), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - started


@torch.no_grad()
def clean_accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def certify(name: str, model: nn.Module, x, y, args, **extra) -> dict:
    smooth = Smooth(model.eval(), 10, GaussianNoise(args.sigma), precision="32-true")
    images = [(i, x[i], int(y[i])) for i in range(len(x))][: args.max]
    started = time.perf_counter()
    records = smooth.run(Certify(args.n0, args.n, 0.001), images, batch_size=1000, seed=0)
    wall = time.perf_counter() - started
    acc = certified_accuracy(records, RADII)
    row = {
        "row": name,
        "certified_accuracy": acc,
        "acr": average_certified_radius(records),
        "certify_s": wall,
        "images": len(images),
        **extra,
    }
    cells = " ".join(f"r={r}: {100 * v:.1f}" for r, v in acc.items())
    print(f"{name}: {cells} ACR {row['acr']:.3f} ({wall:.0f} s)", flush=True)
    return row


def finetuned_classifier(path: str) -> nn.Module:
    hparams = read_checkpoint(path)["hyper_parameters"]
    model = create_model(
        hparams["model_name"], num_classes=hparams["num_classes"], **(hparams.get("model_kwargs") or {})
    )
    load_weights(model, path)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dmae", required=True, help="the DMAE pre-training checkpoint (the denoiser)")
    parser.add_argument("--finetuned", help="row (d): a fine-tuned classifier checkpoint (finetune_digits)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=60, help="clean training epochs of (a)")
    parser.add_argument(
        "--denoised-epochs", type=int, default=10, help="(c)'s fine-tuning epochs (0: no (c))"
    )
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument(
        "--max", type=int, default=None, help="at most this many test images (default: all 360)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: best on a shared CPU)")
    parser.add_argument(
        "--out", help="JSON file (default: benchmarks/results/local/denoiser_digits_cpu.json)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = DigitsDataModule()
    (xtr, ytr), (xte, yte) = split(dm, "train"), split(dm, "test")
    denoiser = load_denoiser(args.dmae, args.sigma)
    for p in denoiser.parameters():
        p.requires_grad_(False)

    clean = create_model("vit_micro_patch8", num_classes=10)
    train_s = fit(clean, xtr, ytr, args.epochs, 1e-3)
    rows = [certify("(a) clean classifier", clean, xte, yte, args, train_s=train_s)]
    rows[0]["clean_accuracy"] = clean_accuracy(clean, xte, yte)
    rows.append(certify("(b) DMAE denoiser + (a)", Denoised(denoiser, clean), xte, yte, args))
    if args.denoised_epochs:
        tuned = copy.deepcopy(clean)

        def denoised(batch, g):
            with torch.no_grad():
                return denoiser(batch + args.sigma * torch.randn(batch.shape, generator=g))

        train_s = fit(tuned, xtr, ytr, args.denoised_epochs, 3e-4, prepare=denoised, seed=1)
        rows.append(
            certify(
                "(c) denoiser + (a) tuned on denoised",
                Denoised(denoiser, tuned),
                xte,
                yte,
                args,
                train_s=train_s,
            )
        )
    if args.finetuned:
        rows.append(
            certify("(d) fine-tuned DMAE encoder", finetuned_classifier(args.finetuned), xte, yte, args)
        )
    meta = {
        **environment("cpu"),
        "sigma": args.sigma,
        "n0": args.n0,
        "n": args.n,
        "alpha": 0.001,
        "epochs": args.epochs,
        "denoised_epochs": args.denoised_epochs,
        "dmae": str(args.dmae),
        "finetuned": args.finetuned,
    }
    write_results(Path(args.out) if args.out else None, "denoiser_digits_cpu.json", meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
