"""Gaussian data augmentation (Cohen et al. 2019, plain "RS" fine-tuning) and consistency regularisation (Jeong &
Shin 2020, DMAE's fine-tuning objective, method.md section 2): losses of ``copies`` noisy copies of each image.
Imports: torch, the noise, :mod:`.base`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmae_lightning.noise import Noise
from dmae_lightning.training.objectives.base import Objective, Terms, noisy_copies


def consistency_terms(logits: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jeong & Shin (2020) consistency regulariser on ``m`` noisy copies per image.

    ``logits`` is [m*B, C] laid out copy-major (copy j of image i at row j*B + i). Returns the mean
    over images of mean_j KL(p_avg || p_j) and of the entropy H(p_avg).
    """
    log_p = F.log_softmax(logits.float(), dim=1).unflatten(0, (m, -1))  # [m, B, C]
    p_avg = log_p.exp().mean(dim=0)  # [B, C]
    log_avg = p_avg.clamp_min(1e-20).log()  # [B, C]
    kl = (p_avg.unsqueeze(0) * (log_avg.unsqueeze(0) - log_p)).sum(dim=2).mean(dim=0)  # [B]
    entropy = -(p_avg * log_avg).sum(dim=1)  # [B]
    return kl.mean(), entropy.mean()


@dataclass(frozen=True)
class GaussianAugmentation(Objective):
    """Cross-entropy of ``copies`` noisy copies of each image against its (mixed, smoothed) target."""

    name: ClassVar[str] = "gaussian"
    copies: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"copies must be an integer >= 1, got {self.copies!r}")

    def loss(
        self,
        model: nn.Module,
        imgs: torch.Tensor,
        targets: torch.Tensor,
        noise: Noise,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, Terms]:
        inputs, copy_targets = noisy_copies(imgs, targets, noise, self.copies, generator)  # [m*B, ...]
        return self.loss_of_logits(model(inputs), copy_targets)  # logits [m*B, K]

    def loss_of_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        """(loss, terms) of the copies' logits [m*B, K] (copy-major) and soft targets [m*B, K]."""
        ce = F.cross_entropy(logits.float(), targets)
        return ce, {"ce": ce}


@dataclass(frozen=True)
class Consistency(GaussianAugmentation):
    """CE + lbd * mean_i KL(p_avg || p_i) + eta * H(p_avg) over ``copies`` = m >= 2 copies (method.md: m = 2,
    lbd = 2, eta = 0.5 at sigma 0.25 and 0.5, 0.1 at sigma 1.0)."""

    name: ClassVar[str] = "consistency"
    PAPER_ETA: ClassVar[dict[float, float]] = {0.25: 0.5, 0.5: 0.5, 1.0: 0.1}  # by training sigma
    BY_SIGMA: ClassVar[Mapping[str, tuple[str, Mapping[float, float]]]] = {"eta": ("eta", PAPER_ETA)}
    copies: int = 2
    lbd: float = 2.0
    eta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.copies < 2 or self.lbd < 0 or self.eta < 0:
            raise ValueError(
                f"consistency needs m >= 2 and lbd, eta >= 0, got m={self.copies}, lbd={self.lbd}, "
                f"eta={self.eta}"
            )

    def loss_of_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        ce, terms = super().loss_of_logits(logits, targets)
        kl, entropy = consistency_terms(logits, self.copies)
        return ce + self.lbd * kl + self.eta * entropy, {
            **terms,
            "consistency_kl": kl,
            "consistency_entropy": entropy,
        }
