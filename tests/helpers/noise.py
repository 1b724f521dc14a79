"""The certification noise scheme as documented, written out independently of the package's sampler."""

from __future__ import annotations

import torch

from dmae_lightning.certification import NOISE_BLOCK
from dmae_lightning.rng import CERTIFY_STREAM, seeded_generator


def reference_noise(seed, idx, stage, num, shape):
    """The documented noise scheme, written out: blocks of NOISE_BLOCK samples, block b of a stage drawn
    whole from seeded_generator(seed, CERTIFY_STREAM, idx, stage, b), the rows taken in order."""
    blocks = [
        torch.randn((NOISE_BLOCK, *shape), generator=seeded_generator(seed, CERTIFY_STREAM, idx, stage, b))
        for b in range(-(-num // NOISE_BLOCK))
    ]
    return torch.cat(blocks)[:num]  # [num,C,H,W]
