"""Fine-tuning objectives of the base classifier: the loss of a batch of noisy copies' logits and their soft
targets. One class per objective; ``BaseClassifierModule`` draws ``copies`` noisy copies of each (mixed) clean
image and hands the logits here. A new objective is one class (and, for its hyper-parameters, one config).

- :class:`GaussianAugmentation`: cross-entropy on noisy inputs (Cohen et al. 2019, plain "RS" fine-tuning)
- :class:`Consistency`: the same plus Jeong & Shin's (2020) consistency regulariser over ``m`` copies
Imports: torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
class GaussianAugmentation:
    """Cross-entropy of the noisy copies against their (mixed, smoothed) targets."""

    copies: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"copies must be an integer >= 1, got {self.copies!r}")

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, the terms to log) of logits [m*B, C] copy-major and soft targets [m*B, C]."""
        ce = F.cross_entropy(logits.float(), targets)
        return ce, {"ce": ce}


@dataclass(frozen=True)
class Consistency(GaussianAugmentation):
    """CE + lbd * mean_i KL(p_avg || p_i) + eta * H(p_avg) over ``copies`` = m >= 2 copies (method.md: m = 2,
    lbd = 2, eta = 0.5 at sigma 0.25 and 0.5, 0.1 at sigma 1.0)."""

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

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, terms = super().loss(logits, targets)
        kl, entropy = consistency_terms(logits, self.copies)
        return ce + self.lbd * kl + self.eta * entropy, {
            **terms,
            "consistency_kl": kl,
            "consistency_entropy": entropy,
        }


def objective_from_consistency(settings: dict) -> GaussianAugmentation:
    """The objective the ``consistency`` settings name (``enabled``, ``m``, ``lbd``, ``eta``)."""
    if settings["enabled"]:
        return Consistency(copies=settings["m"], lbd=settings["lbd"], eta=settings["eta"])
    return GaussianAugmentation()
