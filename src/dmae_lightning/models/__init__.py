"""Model factory: ``create_model(name, **overrides)``, names and overrides in timm's style.

``dmae_*`` names build the pre-training model (:class:`DMAEViT`), the others the classifier
(:class:`VisionTransformerClassifier`) with the same encoder, so a ``dmae_X`` checkpoint
initialises a ``X`` classifier.
"""

from __future__ import annotations

import inspect

from dmae_lightning.models.dmae import DMAEViT
from dmae_lightning.models.vit import VisionTransformerClassifier

# Encoder sizes; the pre-training variants add the decoder.
_ENCODERS: dict[str, dict] = {
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
_DECODERS = {
    "vit_base_patch16": _PAPER_DECODER,
    "vit_large_patch16": _PAPER_DECODER,
    "vit_tiny_patch4": _SMALL_DECODER,
    "vit_tiny_patch8": _SMALL_DECODER,
    "vit_micro_patch4": dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
    "vit_micro_patch8": dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
}


def list_models() -> list[str]:
    return sorted([*_ENCODERS, *(f"dmae_{name}" for name in _ENCODERS)])


def create_model(name: str, **overrides) -> DMAEViT | VisionTransformerClassifier:
    """Build a model by name; ``overrides`` use the constructor's (timm-style) argument names."""
    is_pretrain = name.startswith("dmae_")
    encoder = name.removeprefix("dmae_")
    if encoder not in _ENCODERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    kwargs = dict(_ENCODERS[encoder], **(_DECODERS[encoder] if is_pretrain else {}))
    cls = DMAEViT if is_pretrain else VisionTransformerClassifier
    unknown = sorted(set(overrides) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"{name!r} takes no argument(s) {', '.join(unknown)}")
    kwargs.update(overrides)
    return cls(**kwargs)


__all__ = ["DMAEViT", "VisionTransformerClassifier", "create_model", "list_models"]
