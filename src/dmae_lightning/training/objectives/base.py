"""The interface of a fine-tuning objective, and the noisy copies most objectives start from.
Imports: torch and the noise."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from dmae_lightning.noise import Noise

Terms = dict[str, torch.Tensor]  # what a loss logs besides itself, as train/<name>


def noisy_copies(
    imgs: torch.Tensor, targets: torch.Tensor, noise: Noise, m: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` noisy copies of each (mixed) clean image and their soft targets: [m*B, C, H, W] copy-major (copy j of
    image i at row j*B + i) and [m*B, K]. The copies share the image's mixing partner and lambda (mix first,
    repeat second) and carry exactly the smoothing noise (added after the mix, never mixed)."""
    return noise.perturb(imgs.repeat(m, 1, 1, 1), generator), targets.repeat(m, 1)


@dataclasses.dataclass(frozen=True)
class Objective(ABC):
    """A fine-tuning loss: :meth:`loss` of a batch of clean images (mixed when mixup is on) in [0,1], their soft
    targets, the network, the job's noise and the batch's seeded generator (fresh every step, per rank and
    resumable: every random draw of the loss comes from it). Subclasses are frozen dataclasses whose fields are
    the hyper-parameters (the yaml's keys), registered by ``name`` in :data:`~.OBJECTIVES`."""

    name: ClassVar[str]
    allows_mixup: ClassVar[bool] = True  # False: refused with mixup/cutmix in one line (needs hard labels)
    # Fields whose ``null`` takes the authors' value at the training noise's sigma: field -> (its name in words,
    # {sigma: value}); :meth:`for_noise` fills them, the one home of that rule.
    BY_SIGMA: ClassVar[Mapping[str, tuple[str, Mapping[float, float]]]] = {}

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        imgs: torch.Tensor,
        targets: torch.Tensor,
        noise: Noise,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, Terms]:
        """(loss, terms to log) of clean images [B, C, H, W] and soft targets [B, K]."""

    @classmethod
    def for_noise(cls, settings: dict[str, Any], noise: Noise) -> Objective:
        """The objective with ``settings`` (its fields) for training under ``noise``: a field of :data:`BY_SIGMA`
        left null takes the authors' value at the noise's sigma; ValueError (one line) at a sigma they give none for."""
        settings = dict(settings)
        for key, (what, table) in cls.BY_SIGMA.items():
            if settings.get(key) is None:
                if noise.sigma not in table:
                    raise ValueError(
                        f"the {cls.name} authors give no {what} for sigma {noise.sigma:g} (only for "
                        f"{', '.join(f'{s:g}' for s in table)}): set objective.{key}"
                    )
                settings[key] = table[noise.sigma]
        return cls(**settings)

    def at_epoch(self, epoch: int) -> Objective:
        """The objective as it trains in (0-based) epoch ``epoch`` (warm-ups applied); itself by default."""
        return self

    def settings(self) -> dict[str, Any]:
        """What the checkpoint records: the name and every field (defaults filled in)."""
        return {"name": self.name, **dataclasses.asdict(self)}
