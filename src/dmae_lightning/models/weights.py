"""Load weights from every checkpoint layout a DMAE user meets, without unpickling arbitrary objects.

Layouts understood:
- official DMAE/MAE pre-training releases: ``{"model": state_dict, "optimizer": ..., "epoch": ...,
  "scaler": ..., "args": argparse.Namespace}``;
- official fine-tuned classifiers: the same dict (or a plain state dict) with timm ViT names,
  ``fc_norm`` and ``head`` and no ``norm``;
- this project's Lightning checkpoints (``{"state_dict": {"model.<name>": ...}, ...}``);
- plain state dicts.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dmae_lightning.models import DMAEViT, VisionTransformerClassifier
from dmae_lightning.noise import GaussianNoise, Noise, noise_from_config

# Prefixes that wrappers put in front of parameter names: the LightningModule attribute,
# DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")
_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class LoadReport:
    """What ``load_weights`` did beyond copying tensors one to one."""

    layout: str
    interpolated: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """One short line: counts and the first few keys (an official file drops two dozen decoder keys)."""
        parts = [
            f"{label} {len(keys)} ({_short(keys, 3)})"
            for label, keys in (
                ("resampled", self.interpolated),
                ("fresh", self.reinitialised),
                ("dropped", self.dropped),
            )
            if keys
        ]
        return "; ".join(parts) or "every tensor loaded as is"


def _load_failure(err: Exception) -> str:
    """One line out of torch.load's multi-line error: the refused class, or what is wrong with the file.

    torch's own text leads with advice to retry with ``weights_only=False``, which is exactly what
    must not be done with an untrusted file, so it is not passed on.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours part of its message
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"it holds a pickled {refused.group(1)}, which is not loaded "
            "(weights_only: only tensors, plain containers and argparse.Namespace)"
        )
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and "weights_only" not in line
        and not line.strip().startswith("Check the documentation")
    ]
    detail = f"{type(err).__name__}: {lines[-1][:200]}" if lines else type(err).__name__
    return f"damaged or not in PyTorch's format ({detail})"


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``; only ``argparse.Namespace`` is allow-listed.

    ``mmap``: map the tensors instead of reading them (a cheap check that the file loads); only files in
    torch's zip format can be mapped, older ones are read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            mapped = mmap and zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as err:  # unpickling, zip and magic-number errors all mean "not a checkpoint we load"
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint: {_load_failure(err)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def trained_noise(hparams: dict) -> Noise | None:
    """The training noise a checkpoint's hyper-parameters name (``noise``; ``sigma`` in checkpoints before it);
    None when they name none (official releases, plain state dicts)."""
    if "noise" in hparams:
        return noise_from_config(hparams["noise"])
    return GaussianNoise(float(hparams["sigma"])) if "sigma" in hparams else None


def checkpoint_noise(path: str | Path) -> Noise | None:
    """The training noise recorded in the checkpoint at ``path`` (tensors mapped, not read); None when the file
    records none, or is missing or not loadable (whoever loads it next says why in one line)."""
    try:
        hparams = read_checkpoint(path, mmap=True).get("hyper_parameters")
        return trained_noise(hparams) if isinstance(hparams, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def checkpoint_state_dict(ckpt: dict, path: str | Path = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors and the name of the layout they came in."""
    if isinstance(ckpt.get("state_dict"), dict):
        layout, raw = "lightning", ckpt["state_dict"]
        raw = {k: v for k, v in raw.items() if k.startswith("model.")}  # the module's network only
    elif isinstance(ckpt.get("model"), dict):
        layout, raw = "official", ckpt["model"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        layout, raw = "state_dict", ckpt
    else:
        raise ValueError(
            f"{path} is not a model checkpoint: expected a 'state_dict' or 'model' entry or a plain state dict, "
            f"found keys {sorted(ckpt)[:8]}"
        )
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    if not state:
        raise ValueError(f"{path} holds no model tensors")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # a diverged run's weights: certifying them would give every image the top radius
        raise ValueError(
            f"{path} holds non-finite (NaN/Inf) weights in {_short(broken)}: a diverged or damaged model"
        )
    return state, layout


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict:
    """Fit a source state dict to ``model``: drop what a classifier does not use, resample position
    embeddings to the model's grid, and leave a head of another class count to the model's own init."""
    target = model.state_dict()
    state = dict(state)
    if isinstance(model, VisionTransformerClassifier):
        unused = [k for k in state if k.startswith(_DECODER_PREFIXES)]
        if model.global_pool == "avg":
            unused += [k for k in state if k.startswith("norm.")]  # pooled features use fc_norm instead
        for key in unused:
            del state[key]
        report.dropped += unused
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in state and key in target and state[key].shape != target[key].shape:
            src, dst = state[key], target[key]
            old = int(round((src.shape[1] - 1) ** 0.5))
            new = int(round((dst.shape[1] - 1) ** 0.5))
            if src.shape[-1] != dst.shape[-1] or old * old != src.shape[1] - 1:
                continue  # not resamplable: reported as mis-shaped below
            state[key] = resample_abs_pos_embed(
                src, new_size=[new, new], old_size=[old, old], num_prefix_tokens=1
            )
            report.interpolated.append(f"{key} {old}x{old}->{new}x{new}")
    head = [k for k in ("head.weight", "head.bias") if k in state and k in target]
    if head and any(state[k].shape != target[k].shape for k in head):
        for key in head:
            del state[key]
        report.dropped += head
    return state


def _allowed_missing(model: nn.Module, state: dict) -> set[str]:
    """Keys a classifier may lack in its source: a fresh head / fc_norm when starting from pre-training."""
    if not isinstance(model, VisionTransformerClassifier):
        return set()
    fresh = ("head.", "fc_norm.", "head_norm.")
    return {k for k in model.state_dict() if k.startswith(fresh)}


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(
    model: DMAEViT | VisionTransformerClassifier, path: str | Path, ckpt: dict | None = None
) -> LoadReport:
    """Load ``path`` into ``model`` (in place). Raises one clear ValueError when the tensors do not fit.
    ``ckpt``: the file's content when the caller has read it already (:func:`read_checkpoint`), so a large
    checkpoint is read once."""
    state, layout = checkpoint_state_dict(read_checkpoint(path) if ckpt is None else ckpt, path)
    report = LoadReport(layout=layout)
    state = adapt_state_dict(state, model, report)
    target = model.state_dict()
    allowed = _allowed_missing(model, state)
    missing = sorted(k for k in target if k not in state and k not in allowed)
    unexpected = sorted(k for k in state if k not in target)
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    )
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_short(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped (file vs model)", misshaped),
            )
            if keys
        ]
        raise ValueError(f"{path} does not fit {type(model).__name__} ({layout} layout): " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    # Modules left at the model's own initialisation (a fresh head has std 2e-5).
    report.reinitialised += sorted({k.split(".")[0] for k in target if k not in state})
    return report
