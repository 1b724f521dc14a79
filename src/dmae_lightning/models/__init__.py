"""Models, registered by name with one config each (timm's style): ``create_model(name, **overrides)``.

- :mod:`.layers`   the shared ViT encoder parts (patch embedding, sin-cos positions, [0,1] pixel input)
- :mod:`.dmae`     ``DMAEViT``: the denoising masked autoencoder of pre-training
- :mod:`.vit`      ``VisionTransformerClassifier``: the encoder as the base classifier f of the smoothed g
- :mod:`.denoiser` ``DMAEDenoiser``, ``Denoised``: the DMAE (mask ratio 0) as a denoiser before any classifier
  (imported from its module, not re-exported here: it loads weights, and :mod:`.weights` imports this package)
- :mod:`.weights`  loading official DMAE/MAE files, fine-tuned releases and our checkpoints (weights_only)

``dmae_<encoder>`` names build the pre-training model, ``<encoder>`` the classifier with the same encoder, so
a ``dmae_X`` checkpoint initialises an ``X`` classifier. The classifiers are registered in timm's own
registry too: after ``import dmae_lightning.models``, ``timm.create_model("vit_micro_patch8", num_classes=10)``
builds one. A new size is one entry of ``ENCODERS`` (and of ``DECODERS``) plus ``conf/model/<name>.yaml``.
Imports: torch, timm, and from this package only :mod:`dmae_lightning.noise`.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

from timm.models import register_model

from dmae_lightning.models.dmae import DMAEViT
from dmae_lightning.models.vit import VisionTransformerClassifier

log = logging.getLogger(__name__)

PRETRAIN_PREFIX = "dmae_"
# The one config of each encoder; the pre-training variants add DECODERS[encoder].
ENCODERS: dict[str, dict[str, Any]] = {
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # Small variants for 32x32 inputs that train in seconds to minutes on a CPU.
    "vit_tiny_patch4": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit_tiny_patch8": dict(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vit_micro_patch4": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2),
    "vit_micro_patch8": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
}
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_DECODER = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
_MICRO_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
DECODERS: dict[str, dict[str, Any]] = {
    "vit_base_patch16": _PAPER_DECODER,
    "vit_large_patch16": _PAPER_DECODER,
    "vit_tiny_patch4": _SMALL_DECODER,
    "vit_tiny_patch8": _SMALL_DECODER,
    "vit_micro_patch4": _MICRO_DECODER,
    "vit_micro_patch8": _MICRO_DECODER,
}


def model_config(name: str) -> tuple[type[DMAEViT] | type[VisionTransformerClassifier], dict[str, Any]]:
    """The class and the constructor arguments registered under ``name``."""
    encoder = name.removeprefix(PRETRAIN_PREFIX)
    if encoder not in ENCODERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if name.startswith(PRETRAIN_PREFIX):
        return DMAEViT, {**ENCODERS[encoder], **DECODERS[encoder]}
    return VisionTransformerClassifier, dict(ENCODERS[encoder])


def list_models() -> list[str]:
    return sorted([*ENCODERS, *(f"{PRETRAIN_PREFIX}{name}" for name in ENCODERS)])


def create_model(
    name: str, pretrained: str | os.PathLike | None = None, **overrides: Any
) -> DMAEViT | VisionTransformerClassifier:
    """Build a model by name; ``overrides`` use the constructor's (timm-style) argument names.

    ``pretrained``: a checkpoint to load (:func:`.weights.load_weights`: an exported directory, our Lightning
    checkpoint, an official DMAE/MAE file, a plain state dict). When it records its architecture (an export's
    config.json, our checkpoints' hyper-parameters) under ``name``, its constructor arguments (``model_kwargs``,
    ``num_classes``, a DMAE's noise) are the defaults that ``overrides`` change; a ``dmae_X`` file builds an ``X``
    classifier with its encoder's arguments and a fresh head. A file of another architecture is refused.
    """
    if pretrained is None or pretrained is False:
        return _build(name, overrides)
    if pretrained is True:
        raise ValueError(
            f"{name}: no weights to download; pass pretrained=PATH (a file or an exported directory)"
        )
    from dmae_lightning.models.weights import load_weights, read_checkpoint  # weights imports this module

    source = Path(pretrained)
    ckpt = read_checkpoint(source)
    hparams = ckpt.get("hyper_parameters")
    recorded = hparams.get("model_name") if isinstance(hparams, dict) else None
    kwargs: dict[str, Any] = {}
    if isinstance(hparams, dict) and isinstance(recorded, str):
        cls, _ = model_config(name)
        accepted = set(inspect.signature(cls).parameters)
        if recorded == name:
            kwargs = {**(hparams.get("model_kwargs") or {})}
            for key in ("num_classes", "noise", "norm_pix_loss"):
                if key in hparams and key in accepted:
                    kwargs[key] = hparams[key]
        elif recorded == f"{PRETRAIN_PREFIX}{name}":  # a pre-training file, a classifier: its encoder's
            kwargs = {k: v for k, v in (hparams.get("model_kwargs") or {}).items() if k in accepted}
        else:
            raise ValueError(
                f"{pretrained} holds a {recorded}, not a {name}: create_model({recorded!r}, ...)"
            )
    model = _build(name, {**kwargs, **overrides})
    report = load_weights(model, source, ckpt)
    log.info("%s: loaded %s (%s layout): %s", name, pretrained, report.layout, report)
    return model


def _build(name: str, overrides: dict[str, Any]) -> DMAEViT | VisionTransformerClassifier:
    cls, kwargs = model_config(name)
    unknown = sorted(set(overrides) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"{name!r} takes no argument(s) {', '.join(unknown)}")
    return cls(**{**kwargs, **overrides})


def _timm_entry(name: str):
    """timm's registry calls ``fn(pretrained=..., pretrained_cfg=..., pretrained_cfg_overlay=..., cache_dir=...,
    **kwargs)``; the download options mean nothing here."""

    def build(
        pretrained: bool = False,
        pretrained_cfg=None,
        pretrained_cfg_overlay=None,
        cache_dir=None,
        **overrides: Any,
    ):
        if pretrained:  # timm would download; the DMAE releases are loaded with models.weights.load_weights
            raise ValueError(
                f"{name}: no weights to download; build it and load_weights(model, 'dmae_base.pth')"
            )
        return create_model(name, **overrides)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    return build


for _name in ENCODERS:  # the classifiers (timm's registry holds classifiers, not pre-training models)
    register_model(_timm_entry(_name))

__all__ = [
    "DECODERS",
    "ENCODERS",
    "DMAEViT",
    "VisionTransformerClassifier",
    "create_model",
    "list_models",
    "model_config",
]
