"""Seeded random streams that do not depend on batch order, rank count or restarts.

Training noise and masks come from a generator seeded by (seed, rank, step, micro-batch), so DDP
ranks draw different noise while the model initialisation (global seed) stays identical, and a
resumed run draws exactly what the uninterrupted run would have drawn. Certification noise for
image ``idx`` comes in blocks, block b of stage s from a generator seeded by (seed, CERTIFY_STREAM, idx,
s, b) (see certification/sampler.py). The stream ids keep the three uses apart.
"""

from __future__ import annotations

import numpy as np
import torch

TRAIN_STREAM, VAL_STREAM, CERTIFY_STREAM = 0, 1, 2


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence hashing)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded by ``derive_seed(*keys)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*keys))
    return generator
