"""Fine-tuning objectives of the base classifier: the loss of a batch of noisy copies' logits and their soft
targets. One class per objective, registered in :data:`OBJECTIVES` under its ``name``, which the ``objective``
config group chooses (conf/objective/<name>.yaml: ``name`` and the class's fields); ``BaseClassifierModule``
draws ``copies`` noisy copies of each (mixed) clean image and hands the logits here. A new objective is one
class here and one yaml there.

- :class:`GaussianAugmentation` (``gaussian``): cross-entropy on noisy inputs (Cohen et al. 2019, plain "RS")
- :class:`Consistency` (``consistency``): the same plus Jeong & Shin's (2020) regulariser over ``copies`` copies
Imports: torch and the noise."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dmae_lightning.noise import Noise


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

    name: ClassVar[str] = "gaussian"
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

    @classmethod
    def for_noise(cls, settings: dict[str, Any], noise: Noise) -> GaussianAugmentation:
        """The objective with ``settings`` (its fields) for training under ``noise``."""
        return cls(**settings)


@dataclass(frozen=True)
class Consistency(GaussianAugmentation):
    """CE + lbd * mean_i KL(p_avg || p_i) + eta * H(p_avg) over ``copies`` = m >= 2 copies (method.md: m = 2,
    lbd = 2, eta = 0.5 at sigma 0.25 and 0.5, 0.1 at sigma 1.0)."""

    name: ClassVar[str] = "consistency"
    PAPER_ETA: ClassVar[dict[float, float]] = {0.25: 0.5, 0.5: 0.5, 1.0: 0.1}  # by training sigma
    copies: int = 2
    lbd: float = 2.0
    eta: float = 0.5

    @classmethod
    def for_noise(cls, settings: dict[str, Any], noise: Noise) -> GaussianAugmentation:
        """``eta: null`` takes the paper's weight at the noise's sigma (:data:`PAPER_ETA`)."""
        if settings.get("eta") is None:
            if noise.sigma not in cls.PAPER_ETA:
                raise ValueError(
                    f"the consistency paper gives no eta for sigma {noise.sigma:g} (only for "
                    f"{', '.join(f'{s:g}' for s in cls.PAPER_ETA)}): set objective.eta"
                )
            settings = {**settings, "eta": cls.PAPER_ETA[noise.sigma]}
        return cls(**settings)

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


OBJECTIVES: dict[str, type[GaussianAugmentation]] = {
    cls.name: cls for cls in (GaussianAugmentation, Consistency)
}


def objective_from_config(config: Mapping[str, Any], noise: Noise) -> GaussianAugmentation:
    """The objective that ``config`` names (``name``: a key of :data:`OBJECTIVES`; the rest: its fields), for
    training under ``noise``; ValueError (one line) for an unknown name or field."""
    settings = dict(config)
    name = settings.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"objective name must be one of {'|'.join(OBJECTIVES)}, got {name!r}")
    cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"objective {name} has no setting {', '.join(unknown)} (it has {', '.join(sorted(fields))})"
        )
    return cls.for_noise(settings, noise)
