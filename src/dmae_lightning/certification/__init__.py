"""Randomized-smoothing certification: one module per concern.

- :mod:`.protocol`    the procedure interface and its Draw requests (what a new procedure implements)
- :mod:`.sampler`     the Monte Carlo engine: block-seeded noise, many images per forward batch
- :mod:`.procedures`  CERTIFY, PREDICT, sequential CERTIFY_RADII (one interface, ``PROCEDURES``) and ``Smooth``
- :mod:`.sequential_test` the confidence sequence behind CERTIFY_RADII (numpy/scipy only)
- :mod:`.records`     per-image record types, crash-safe TSV shards and JSON files
- :mod:`.metrics`     certified accuracy, ACR, abstain rate, tables and plots
- :mod:`.params`      the job's validated settings
- :mod:`.rundir`      shards, resume and the params file of a run directory
- :mod:`.predictor`   the Lightning module that runs a rank's images
- :mod:`.job`         ``certify(cfg)``, the job behind ``python certify.py``
- :mod:`.callback`    certified accuracy during fine-tuning
- :mod:`.analyze`     ``python -m dmae_lightning.certification.analyze RUN_DIR...``
"""

from .procedures import PROCEDURES, Certify, CertifyRadii, Predict, Smooth, lower_confidence_bound
from .protocol import Draw, Procedure
from .records import ABSTAIN, CertifyRecord, PredictRecord, RadiiRecord, Record
from .sampler import NOISE_BLOCK, NOISE_SCHEME, NonFiniteLogits, Sampler

__all__ = [
    "ABSTAIN", "NOISE_BLOCK", "NOISE_SCHEME", "PROCEDURES", "Certify", "CertifyRadii", "CertifyRecord", "Draw",
    "NonFiniteLogits", "Predict", "PredictRecord", "Procedure", "RadiiRecord", "Record", "Sampler", "Smooth",
    "lower_confidence_bound",
]
