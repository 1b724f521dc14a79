"""Randomized-smoothing certification, a library importable without Hydra or Lightning's Trainer.

- :mod:`.protocol`    the procedure interface and its requests (Draw, DrawAround, Attack: what a procedure yields)
- :mod:`.procedures`  CERTIFY, PREDICT, sequential CERTIFY_RADII, the attack (``PROCEDURES``: a class and an entry)
- :mod:`.smooth`      ``Smooth``: the smoothed classifier that runs any procedure on labelled images
- :mod:`.sampler`     the Monte Carlo engine: block-seeded noise, many images per forward batch
- :mod:`.confidence`  Clopper-Pearson bounds and the confidence sequence behind CERTIFY_RADII (numpy/scipy)
- :mod:`.checks`      the range rules of counts, alpha and precision, and "N evenly spaced images"
- :mod:`.records`     per-image record types, crash-safe TSV shards and JSON files (no torch)
- :mod:`.metrics`     certified accuracy, its data-set-level bound, ACR, abstain rate, the attack cross-check (no torch)
- :mod:`.summary`     each kind of procedure's typed result (no torch)
- :mod:`.runs`        a run's summary.json as a typed object, and its one reader
- :mod:`.report`      Markdown/LaTeX tables and plots (no torch)
- :mod:`.callback`    certified accuracy during fine-tuning (a Lightning callback)

Imports: torch, scipy, numpy, and from this package only :mod:`dmae_lightning.noise`, :mod:`dmae_lightning.rng`
and :mod:`dmae_lightning.files`. The names below are imported on first use, so that ``records``, ``metrics``
and ``report`` (and the analysis over them) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "PROCEDURES": "procedures",
    "AttackPredict": "procedures",
    "Certify": "procedures",
    "CertifyRadii": "procedures",
    "Predict": "procedures",
    "lower_confidence_bound": "procedures",
    "Attack": "protocol",
    "Draw": "protocol",
    "DrawAround": "protocol",
    "Procedure": "protocol",
    "ABSTAIN": "records",
    "AttackRecord": "records",
    "CertifyRecord": "records",
    "PredictRecord": "records",
    "RadiiRecord": "records",
    "Record": "records",
    "NOISE_BLOCK": "sampler",
    "NOISE_SCHEME": "sampler",
    "NonFiniteLogits": "sampler",
    "Sampler": "sampler",
    "Smooth": "smooth",
    "CertifiedSummary": "summary",
    "EmpiricalSummary": "summary",
    "PredictionSummary": "summary",
    "RunSummary": "runs",
    "read_summary": "runs",
}
__all__ = [
    "ABSTAIN",
    "Attack",
    "AttackPredict",
    "AttackRecord",
    "CertifiedSummary",
    "Certify",
    "CertifyRadii",
    "CertifyRecord",
    "Draw",
    "DrawAround",
    "EmpiricalSummary",
    "NOISE_BLOCK",
    "NOISE_SCHEME",
    "NonFiniteLogits",
    "PROCEDURES",
    "Predict",
    "PredictRecord",
    "PredictionSummary",
    "Procedure",
    "RadiiRecord",
    "Record",
    "RunSummary",
    "Sampler",
    "Smooth",
    "lower_confidence_bound",
    "read_summary",
]  # the keys of _HOMES, spelled out for linters


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from dmae_lightning.certification.procedures import (
        PROCEDURES,
        AttackPredict,
        Certify,
        CertifyRadii,
        Predict,
        lower_confidence_bound,
    )
    from dmae_lightning.certification.protocol import Attack, Draw, DrawAround, Procedure
    from dmae_lightning.certification.records import (
        ABSTAIN,
        AttackRecord,
        CertifyRecord,
        PredictRecord,
        RadiiRecord,
        Record,
    )
    from dmae_lightning.certification.runs import RunSummary, read_summary
    from dmae_lightning.certification.sampler import NOISE_BLOCK, NOISE_SCHEME, NonFiniteLogits, Sampler
    from dmae_lightning.certification.smooth import Smooth
    from dmae_lightning.certification.summary import CertifiedSummary, EmpiricalSummary, PredictionSummary
