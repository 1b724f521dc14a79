"""Randomized-smoothing certification, a library importable without Hydra or Lightning's Trainer.

- :mod:`.protocol`    the procedure interface and its Draw requests (what a new procedure implements)
- :mod:`.procedures`  CERTIFY, PREDICT, sequential CERTIFY_RADII (``PROCEDURES``: a new one is a class and an entry)
- :mod:`.smooth`      ``Smooth``: the smoothed classifier that runs any procedure on labelled images
- :mod:`.sampler`     the Monte Carlo engine: block-seeded noise, many images per forward batch
- :mod:`.confidence`  Clopper-Pearson bounds and the confidence sequence behind CERTIFY_RADII (numpy/scipy)
- :mod:`.checks`      the range rules of counts, alpha and precision
- :mod:`.records`     per-image record types, crash-safe TSV shards and JSON files (no torch)
- :mod:`.metrics`     certified accuracy, its data-set-level bound, ACR, abstain rate (no torch)
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
    "Certify": "procedures",
    "CertifyRadii": "procedures",
    "Predict": "procedures",
    "lower_confidence_bound": "procedures",
    "Draw": "protocol",
    "Procedure": "protocol",
    "ABSTAIN": "records",
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
    "PredictionSummary": "summary",
    "RunSummary": "runs",
    "read_summary": "runs",
}
__all__ = [
    "ABSTAIN",
    "NOISE_BLOCK",
    "NOISE_SCHEME",
    "PROCEDURES",
    "Certify",
    "CertifyRadii",
    "CertifyRecord",
    "Draw",
    "NonFiniteLogits",
    "Predict",
    "PredictRecord",
    "Procedure",
    "RadiiRecord",
    "Record",
    "Sampler",
    "Smooth",
    "CertifiedSummary",
    "PredictionSummary",
    "RunSummary",
    "read_summary",
    "lower_confidence_bound",
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
        Certify,
        CertifyRadii,
        Predict,
        lower_confidence_bound,
    )
    from dmae_lightning.certification.protocol import Draw, Procedure
    from dmae_lightning.certification.records import (
        ABSTAIN,
        CertifyRecord,
        PredictRecord,
        RadiiRecord,
        Record,
    )
    from dmae_lightning.certification.runs import RunSummary, read_summary
    from dmae_lightning.certification.sampler import NOISE_BLOCK, NOISE_SCHEME, NonFiniteLogits, Sampler
    from dmae_lightning.certification.smooth import Smooth
    from dmae_lightning.certification.summary import CertifiedSummary, PredictionSummary
