"""Shared parts of the benchmark scripts: device description, library versions, FLOPs, the bf16 matmul
rate that model FLOP utilisation is measured against, and the JSON/table output."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytorch_lightning as pl
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"  # the tracked records the docs quote
LOCAL_RESULTS = RESULTS / "local"  # git-ignored: where a run writes unless --out names a file


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": f"{device}: {name}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_flops(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on the [1,C,H,W] batch ``sample`` (torch's flop counter)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(sample)
    return counter.get_total_flops()


def bf16_matmul_flops_per_s(device: str, size: int = 8192, repeats: int = 50) -> float | None:
    """Dense bf16 matmul rate of this GPU, measured now (None on the CPU: utilisation is a GPU figure)."""
    if device != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def write_results(out: Path | None, name: str, meta: dict, rows: list[dict]) -> Path:
    """JSON to ``out``, by default to ``benchmarks/results/local/<name>`` (git-ignored): a rerun does not
    overwrite the tracked record ``benchmarks/results/<name>`` unless ``--out`` names it."""
    out = Path(out) if out else LOCAL_RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return out
