"""Load weights from every checkpoint layout a DMAE user meets, without unpickling arbitrary objects.

Layouts understood:
- official DMAE/MAE pre-training releases: ``{"model": state_dict, "optimizer": ..., "epoch": ...,
  "scaler": ..., "args": argparse.Namespace}``;
- official fine-tuned classifiers: the same dict (or a plain state dict) with timm ViT names,
  ``fc_norm`` and ``head`` and no ``norm``;
- this project's Lightning checkpoints (``{"state_dict": {"model.<name>": ...}, ...}``);
- plain state dicts (the DMAE authors' fine-tuned files, timm's, ``module.`` / ``_orig_mod.`` prefixes);
- exported directories (``python -m dmae_lightning.jobs.export``, docs/export.md): ``model.safetensors`` (the
  network's state dict) and ``config.json`` (architecture, noise, ...), read without pickle; and any other
  ``.safetensors`` file, or a directory holding ``model.safetensors`` without our ``config.json`` (a timm or
  Hugging Face snapshot), as a plain state dict.

:func:`read_checkpoint` is the one reader: it gives an exported directory the shape of a Lightning checkpoint
(``{"state_dict": {"model.<name>": ...}, "hyper_parameters": {...}}``), so whatever reads a checkpoint's
hyper-parameters (the certification job, :func:`checkpoint_noise`) reads an export's config the same way.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from dmae_lightning.models.dmae import DMAEViT
from dmae_lightning.models.vit import VisionTransformerClassifier
from dmae_lightning.noise import GaussianNoise, Noise, noise_from_config

# Prefixes that wrappers put in front of parameter names: the LightningModule attribute,
# DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")
_DECODER_PREFIXES = ("decoder_", "mask_token")

# An exported directory: huggingface_hub's file names (constants.SAFETENSORS_SINGLE_FILE, CONFIG_NAME, the model
# card REPOCARD_NAME), the config marked as ours by EXPORT_FORMAT.
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_CARD = "README.md"
EXPORT_FORMAT = "dmae-lightning-export"
EXPORT_FORMAT_VERSION = 1
# read_checkpoint's key of an exported directory's config.json (besides state_dict and hyper_parameters)
EXPORTED = "exported_config"


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
    """The checkpoint at ``path`` as a dict, never unpickling anything but tensors and plain containers.

    A file: ``torch.load`` with ``weights_only=True`` (only ``argparse.Namespace`` is allow-listed), or a
    ``.safetensors`` file (a plain state dict). An exported directory (:func:`read_exported`): the shape of a
    Lightning checkpoint, without torch.load. ``mmap``: map the tensors instead of reading them (a cheap check
    that the file loads); only files in torch's zip format can be mapped, older ones are read.
    """
    path = Path(path)
    if path.is_dir():
        return read_exported(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            mapped = mmap and zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as err:  # unpickling, zip and magic-number errors all mean "not a checkpoint we load"
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint: {_load_failure(err)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (no pickle: a JSON header and raw bytes)."""
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        text = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
        raise ValueError(f"{path} is not a loadable safetensors file ({detail})") from None


def read_export_config(directory: str | Path) -> dict[str, Any] | None:
    """An exported directory's config.json (ours: its ``format`` is EXPORT_FORMAT); None when the directory has
    none or another program's (a timm or Hugging Face snapshot); ValueError (one line) when it is damaged."""
    path = Path(directory) / EXPORT_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is damaged ({str(err).splitlines()[0][:200]}): export the run again"
        ) from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        return None
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: exported in format version {version!r}, this code reads up to {EXPORT_FORMAT_VERSION}: "
            "update dmae-lightning"
        )
    if not isinstance(config.get("architecture"), str) or not isinstance(
        config.get("model_kwargs", {}), dict
    ):
        raise ValueError(f"{path} names no architecture (a string) and model_kwargs (a mapping)")
    return config


def exported_hyper_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """An export's config.json as a Lightning checkpoint's ``hyper_parameters``: the training settings, then
    model_name, model_kwargs, num_classes, noise and objective as the training modules name them."""
    hparams = dict(config.get("training") or {})
    hparams["model_name"] = config["architecture"]
    hparams["model_kwargs"] = dict(config.get("model_kwargs") or {})
    for key in ("num_classes", "noise", "objective"):
        if config.get(key) is not None:
            hparams[key] = config[key]
    return hparams


def read_exported(directory: str | Path) -> dict:
    """An exported directory as a checkpoint dict, without pickle: ``{"state_dict": {"model.<name>": tensor},
    "hyper_parameters": {...}, EXPORTED: config}``, the layout of a Lightning checkpoint; a directory with
    ``model.safetensors`` but without our config.json (a timm or Hugging Face snapshot) as a plain state dict."""
    directory = Path(directory)
    weights = directory / EXPORT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory} does not exist or is not a file (a directory, without the {EXPORT_WEIGHTS} "
            "of an exported model)"
        )
    config = read_export_config(directory)
    state = _read_safetensors(weights)
    if config is None:
        return state
    return {
        "state_dict": {f"model.{key}": value for key, value in state.items()},
        "hyper_parameters": exported_hyper_parameters(config),
        EXPORTED: config,
    }


def trained_noise(hparams: dict) -> Noise | None:
    """The training noise a checkpoint's hyper-parameters name (``noise``; ``sigma`` in checkpoints before it);
    None when they name none (official releases, plain state dicts)."""
    if "noise" in hparams:
        return noise_from_config(hparams["noise"])
    return GaussianNoise(float(hparams["sigma"])) if "sigma" in hparams else None


def checkpoint_noise(path: str | Path) -> Noise | None:
    """The training noise recorded in the checkpoint at ``path`` (tensors mapped, not read; of an exported
    directory only config.json is read); None when the file records none, or is missing or not loadable
    (whoever loads it next says why in one line)."""
    try:
        if Path(path).is_dir():
            config = read_export_config(path)
            hparams = None if config is None else exported_hyper_parameters(config)
        else:
            hparams = read_checkpoint(path, mmap=True).get("hyper_parameters")
        return trained_noise(hparams) if isinstance(hparams, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def checkpoint_state_dict(ckpt: dict, path: str | Path = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors and the name of the layout they came in."""
    if isinstance(ckpt.get("state_dict"), dict):
        layout, raw = "exported" if EXPORTED in ckpt else "lightning", ckpt["state_dict"]
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
