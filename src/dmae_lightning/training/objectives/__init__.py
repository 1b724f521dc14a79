"""Fine-tuning objectives of the base classifier, one module per objective, each a frozen dataclass behind
:class:`~.base.Objective` (the loss of a batch of clean images, soft targets, the network, the job's noise and
the batch's seeded generator), registered here in :data:`OBJECTIVES` by its ``name``, which the ``objective``
config group chooses (conf/objective/<name>.yaml: ``name`` and the class's fields). A new objective is one module
here, one line in :data:`OBJECTIVES` and one yaml.

- ``gaussian`` (:class:`.consistency.GaussianAugmentation`): cross-entropy on noisy inputs (Cohen et al. 2019)
- ``consistency`` (:class:`.consistency.Consistency`): plus Jeong & Shin's (2020) regulariser over noisy copies
- ``stability`` (:class:`.stability.Stability`): clean cross-entropy plus a clean-vs-noisy term (Li et al. 2019)
- ``macer`` (:class:`.macer.Macer`): smoothed classifier's cross-entropy plus a radius hinge (Zhai et al. 2020)
- ``smoothadv`` (:class:`.smoothadv.SmoothAdv`): L2 PGD on the smoothed classifier, CE on x' + noise (Salman et al.
  2019)
- ``smoothmix`` (:class:`.smoothmix.SmoothMix`): CE plus mixing toward the smoothed adversary (Jeong et al. 2021)

Imports: torch, the noise and the models' layers (no Lightning)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dmae_lightning.noise import Noise
from dmae_lightning.training.objectives.base import Objective, noisy_copies
from dmae_lightning.training.objectives.consistency import (
    Consistency,
    GaussianAugmentation,
    consistency_terms,
)
from dmae_lightning.training.objectives.macer import Macer, macer_terms
from dmae_lightning.training.objectives.smoothadv import SmoothAdv
from dmae_lightning.training.objectives.smoothmix import SmoothMix
from dmae_lightning.training.objectives.stability import Stability, stability_terms

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (GaussianAugmentation, Consistency, Stability, Macer, SmoothAdv, SmoothMix)
}


def objective_from_config(config: Mapping[str, Any], noise: Noise) -> Objective:
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


__all__ = [
    "OBJECTIVES",
    "Consistency",
    "GaussianAugmentation",
    "Macer",
    "Objective",
    "SmoothAdv",
    "SmoothMix",
    "Stability",
    "consistency_terms",
    "macer_terms",
    "noisy_copies",
    "objective_from_config",
    "stability_terms",
]
