"""Stability training (Li et al., NeurIPS 2019, "Certified adversarial robustness with additive noise"), as the
baseline of Jeong & Shin (2020): cross-entropy of the clean image plus ``lbd`` times the cross-entropy of the
noisy prediction against the clean one. Imports: torch, the noise, :mod:`.base`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmae_lightning.noise import Noise
from dmae_lightning.training.objectives.base import Objective, Terms


def stability_terms(clean: torch.Tensor, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over images of H(p, q) = -sum_c p_c log q_c and of KL(p || q), p = softmax(``clean``) and
    q = softmax(``noisy``) (logits [B, K]). H(p, q) = KL(p || q) + H(p) is the regulariser; both p and q carry
    gradient (nothing detached), as in the reference code."""
    log_p = F.log_softmax(clean.float(), dim=1)  # [B, K]
    log_q = F.log_softmax(noisy.float(), dim=1)  # [B, K]
    p = log_p.exp()
    xent = -(p * log_q).sum(dim=1)  # [B]
    kl = (p * (log_p - log_q)).sum(dim=1)  # [B]
    return xent.mean(), kl.mean()


@dataclass(frozen=True)
class Stability(Objective):
    """CE(f(x), t) + lbd * mean_i H(softmax f(x_i), softmax f(x_i + delta_i)), one noisy copy per image.

    As jh-jeong/smoothing-consistency ``code/train_stab.py`` (Jeong & Shin's baseline of Li et al. 2019):
    ``loss_xent = criterion(model(inputs), targets)`` is the cross-entropy of the CLEAN image, and
    ``stab = _cross_entropy(logits_n, logits)`` = -sum softmax(clean) * log_softmax(noisy), i.e. the KL from the
    clean to the noisy prediction, KL(p_clean || p_noisy), plus the clean prediction's entropy; gradient flows
    through both predictions (nothing detached). Default lbd = 2 (its ``--lbd`` default; EXPERIMENTS.MD: 2 at
    every sigma). The clean images and their noisy copies go through the network as one batch [2B] (the
    reference makes two calls; the same for networks without batch statistics, such as the ViTs here)."""

    name: ClassVar[str] = "stability"
    lbd: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.lbd, bool) or not isinstance(self.lbd, int | float) or not self.lbd >= 0:
            raise ValueError(f"stability needs lbd >= 0, got {self.lbd!r}")

    def loss(
        self,
        model: nn.Module,
        imgs: torch.Tensor,
        targets: torch.Tensor,
        noise: Noise,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, Terms]:
        noisy = noise.perturb(imgs, generator)  # [B, C, H, W]: the only random draw
        logits = model(torch.cat([imgs, noisy])).float()  # [2B, K]: clean rows first
        clean, noisy_logits = logits.chunk(2)
        ce = F.cross_entropy(clean, targets)  # of the clean image, against the (mixed, smoothed) target
        xent, kl = stability_terms(clean, noisy_logits)
        return ce + self.lbd * xent, {"ce": ce, "stability_xent": xent, "stability_kl": kl}
