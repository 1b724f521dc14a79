"""Training throughput: images/s, peak memory and model FLOP utilisation of pre-training and fine-tuning steps.

    python benchmarks/train_throughput.py                                   # small models on the CPU, seconds
    python benchmarks/train_throughput.py --device cuda --models vit_base_patch16 --batch 256 --img-size 224

For each model and task (DMAE pre-training; fine-tuning with noise and plain cross-entropy) it runs, side by
side, our LightningModule inside a ``Trainer`` and the same model, optimizer and schedule in a plain PyTorch
loop (what Lightning costs), each eager and with ``torch.compile``. Every configuration runs in a fresh
process (clean compile caches, its own peak memory). Data are random images made once and reused, so the
input pipeline is not measured here (see data_throughput.py). Model FLOPs per image come from
``torch.utils.flop_counter`` on one eager forward + backward; utilisation (GPU only) is against a bf16
matmul timed in the same run. Prints a table and writes the numbers, with device and library versions,
to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from common import bf16_matmul_flops_per_s, environment, synchronize, write_results
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from dmae_lightning.noise import GaussianNoise
from dmae_lightning.rng import TRAIN_STREAM, seeded_generator
from dmae_lightning.training.base import compile_in_place
from dmae_lightning.training.finetune import BaseClassifierModule, mix_then_noise
from dmae_lightning.training.optim import parameter_groups, warmup_cosine_factor
from dmae_lightning.training.pretrain import DMAEPretrainModule

OPT = dict(name="adamw", base_lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=0, min_lr=0.0)


# --- one configuration (runs in its own process) -----------------------------------------------------
class SameBatch(Dataset):
    """``steps`` items, each the same pre-made batch: the loader costs almost nothing and both runners
    pay the same host-to-device copy."""

    def __init__(self, batch: int, img_size: int, steps: int, pin: bool):
        images = torch.rand(batch, 3, img_size, img_size)  # [B, 3, S, S] in [0,1]
        labels = torch.randint(0, 1000, (batch,))  # [B]
        self.batch = (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.batch


class RandomData(pl.LightningDataModule):
    def __init__(self, data: SameBatch):
        super().__init__()
        self.data, self.batch_size = data, len(data.batch[1])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)


def build_module(task: str, model: str, img_size: int) -> pl.LightningModule:
    kwargs = dict(model_kwargs=dict(img_size=img_size), optimizer=dict(OPT), noise=GaussianNoise(0.25))
    if task == "pretrain":
        return DMAEPretrainModule(f"dmae_{model}", **kwargs)
    # The fine-tuning step: noise and plain cross-entropy (no mixup, no consistency copies).
    return BaseClassifierModule(model, num_classes=1000, mixup=None, label_smoothing=0.0, **kwargs)


def plain_loss(task: str, module: pl.LightningModule, imgs: torch.Tensor, labels: torch.Tensor, step: int):
    """The loss of one step as a plain loop writes it: the module's network and its noise/mask seeding."""
    generator = seeded_generator(0, TRAIN_STREAM, 0, step, step, device=imgs.device)
    if task == "pretrain":
        return module(imgs, generator)[0]
    inputs, targets = mix_then_noise(imgs, labels, module.mix, module.noise, 1, generator)
    return F.cross_entropy(module(inputs).float(), targets)


def count_flops(task: str, module: pl.LightningModule, img_size: int, device: str) -> float:
    """Model FLOPs of one forward + backward per image (two images, eager)."""
    imgs = torch.rand(2, 3, img_size, img_size, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        plain_loss(task, module, imgs, labels, 0).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


class Clock(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of training, and the warm-up's own time."""

    def __init__(self, warmup: int, sync):
        self.warmup, self.sync, self.times = warmup, sync, {}

    def on_train_start(self, trainer, pl_module):
        self.sync()
        self.times["start"] = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.sync()
            self.times["warm"] = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.sync()
        self.times["end"] = time.perf_counter()


def run_lightning(module, data: SameBatch, cfg: dict, sync) -> dict:
    clock = Clock(cfg["warmup"], sync)
    cuda = cfg["device"] == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=cfg["warmup"] + cfg["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(module, RandomData(data))
    return clock.times


def run_plain(module, data: SameBatch, cfg: dict, sync) -> dict:
    device, total = cfg["device"], cfg["warmup"] + cfg["steps"]
    module.to(device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(module.model, OPT["weight_decay"], None), lr=1e-4, betas=OPT["betas"]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, 0, total, 0.0))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    times = {}
    sync()
    times["start"] = time.perf_counter()
    for step, (imgs, labels) in enumerate(DataLoader(data, batch_size=None)):
        if step == cfg["warmup"]:
            sync()
            times["warm"] = time.perf_counter()
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = plain_loss(cfg["task"], module, imgs, labels, step)
        if not torch.isfinite(loss).item():  # the check every loop makes (and Lightning's module does)
            raise FloatingPointError(f"non-finite loss at step {step}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    sync()
    times["end"] = time.perf_counter()
    return times


def measure_one(cfg: dict) -> dict:
    """One (model, task, runner, compile) configuration in this process."""
    torch.manual_seed(0)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    cuda = device == "cuda"
    sync = lambda: synchronize(device)  # noqa: E731
    module = build_module(cfg["task"], cfg["model"], cfg["img_size"]).to(device)
    flops = count_flops(cfg["task"], module, cfg["img_size"], device)
    if cfg["compile"]:
        compile_in_place(module.model, True)
    data = SameBatch(cfg["batch"], cfg["img_size"], cfg["warmup"] + cfg["steps"], pin=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = (run_lightning if cfg["runner"] == "lightning" else run_plain)(module, data, cfg, sync)
    seconds = times["end"] - times["warm"]
    images_per_s = cfg["batch"] * cfg["steps"] / seconds
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        **cfg,
        "images_per_s": images_per_s,
        "warmup_s": times["warm"] - times["start"],  # includes the compile for compiled runs
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "max allocated (CUDA)" if cuda else "process peak RSS",
        "flops_per_image": flops,
        "achieved_tflops": flops * images_per_s / 1e12,
    }


# --- the whole benchmark ---------------------------------------------------------------------------
def run_in_subprocess(cfg: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, env=os.environ
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(
            f"{cfg['model']} {cfg['task']} {cfg['runner']} compile={cfg['compile']} failed: {tail}"
        )
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_micro_patch4", "vit_tiny_patch4"])
    parser.add_argument(
        "--tasks", nargs="+", choices=["pretrain", "finetune"], default=["pretrain", "finetune"]
    )
    parser.add_argument(
        "--runners", nargs="+", choices=["lightning", "plain"], default=["lightning", "plain"]
    )
    parser.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32, help="native image size (the models' input size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the fastest is kept (shared machines)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file (default benchmarks/results/local/train_throughput_<device>.json)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    matmul = bf16_matmul_flops_per_s(args.device)  # None on the CPU: utilisation is a GPU figure
    rows = []
    for model in args.models:
        for task in args.tasks:
            for mode in args.compile:
                for runner in args.runners:
                    cfg = dict(
                        model=model,
                        task=task,
                        runner=runner,
                        compile=mode == "compiled",
                        device=args.device,
                        batch=args.batch,
                        img_size=args.img_size,
                        steps=args.steps,
                        warmup=args.warmup,
                        threads=args.threads,
                    )
                    row = max(
                        (run_in_subprocess(cfg) for _ in range(args.repeats)), key=lambda r: r["images_per_s"]
                    )
                    row["mfu"] = row["achieved_tflops"] * 1e12 / matmul if matmul else None
                    rows.append(row)
                    print(f"  {model} {task} {mode} {runner}: {row['images_per_s']:.1f} images/s", flush=True)
    meta = {
        **environment(args.device),
        "cpu_cores": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on a shared machine slows every number
        "repeats": args.repeats,
        "bf16_matmul_tflops": matmul / 1e12 if matmul else None,
        "command": " ".join(sys.argv),
    }
    print(f"\n{meta}")
    print(
        f"{'model':18} {'task':9} {'mode':9} {'runner':10} {'images/s':>9} {'vs plain':>8} {'warm-up s':>9} "
        f"{'peak GiB':>8} {'GFLOP/img':>9} {'MFU':>6}"
    )
    plain = {(r["model"], r["task"], r["compile"]): r["images_per_s"] for r in rows if r["runner"] == "plain"}
    for r in rows:
        ref = plain.get((r["model"], r["task"], r["compile"]))
        ratio = f"{r['images_per_s'] / ref:8.3f}" if ref else f"{'':8}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
        print(
            f"{r['model']:18} {r['task']:9} {'compiled' if r['compile'] else 'eager':9} {r['runner']:10} "
            f"{r['images_per_s']:9.1f} {ratio} {r['warmup_s']:9.1f} {r['peak_memory_gib']:8.2f} "
            f"{r['flops_per_image'] / 1e9:9.3f} {mfu}"
        )
    write_results(args.out, f"train_throughput_{args.device}.json", meta, rows)


if __name__ == "__main__":
    main()
