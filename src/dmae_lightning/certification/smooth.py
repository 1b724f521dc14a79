"""The smoothed classifier g around a base classifier f: runs any procedure (:mod:`.procedures`) on labelled
images through block-seeded samplers (:mod:`.sampler`), with the one noise it was built with.
Imports: torch, and :mod:`.procedures`, :mod:`.sampler`, :mod:`.checks`, the noise."""

from __future__ import annotations

import torch
from torch import nn

from dmae_lightning.certification.checks import check_counts, check_precision
from dmae_lightning.certification.procedures import Certify, Predict
from dmae_lightning.certification.protocol import Procedure
from dmae_lightning.certification.records import ABSTAIN, Record
from dmae_lightning.certification.sampler import Sampler
from dmae_lightning.noise import Noise


class Smooth:
    """The smoothed classifier g around ``base_classifier`` ([B,C,H,W] [0,1] images -> [B,K] logits).

    The base classifier should be in eval mode (dropout or drop path would change f between draws).
    ``precision``: 32-true | bf16-mixed | 16-mixed (None: bf16-mixed on CUDA, 32-true elsewhere); ``compile``:
    torch.compile the base classifier (one graph, every batch padded to ``batch_size``); ``pipeline``: launch
    each forward batch before the previous one's counts are read back (None: on CUDA; the same results either
    way, :class:`~.sampler.Sampler`). ``noise``: the
    smoothing distribution (:mod:`dmae_lightning.noise`), fixed at construction; every procedure run here
    is started by a sampler that draws with it and computes its radii with it, so the two cannot differ (to
    sweep sigma, build one ``Smooth`` per noise). The noise of
    image ``idx`` comes from the (seed, idx) block streams of :mod:`.sampler`: the result depends on
    neither ``batch_size`` nor which other images are certified with it.
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        noise: Noise,
        precision: str | None = None,
        compile: bool = False,
        pipeline: bool | None = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(noise, Noise):
            raise TypeError(
                f"noise must be a dmae_lightning.noise.Noise (e.g. GaussianNoise(0.25)), got {noise!r}"
            )
        check_precision(precision)  # refuses an unknown name now, not at the first image
        self._noise = noise
        self.base_classifier, self.num_classes = base_classifier, num_classes
        self.precision, self.compile, self.pipeline = precision, compile, pipeline
        self._samplers: dict[tuple, Sampler] = {}  # keeps a compiled classifier across calls

    @property
    def noise(self) -> Noise:
        """The smoothing distribution (read-only: its samplers draw with it)."""
        return self._noise

    @noise.setter
    def noise(self, value: Noise) -> None:
        raise AttributeError(
            f"Smooth.noise is fixed at construction ({self._noise!r}): build a new "
            f"Smooth(base_classifier, num_classes, {value!r}) to certify with another noise"
        )

    def sampler(self, batch_size: int, seed: int, device: torch.device | str) -> Sampler:
        check_counts(batch_size=batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        key = (batch_size, seed, str(device), self._noise)  # a sampler serves one noise only
        if key not in self._samplers:
            self._samplers[key] = Sampler(
                self.base_classifier,
                self.num_classes,
                self._noise,
                seed,
                batch_size,
                self.precision,
                self.compile,
                device,
                self.pipeline,
            )
        return self._samplers[key]

    def run(self, procedure: Procedure, images, batch_size: int, seed: int = 0) -> list[Record]:
        """Records of ``procedure`` on ``images``: (idx, [C,H,W] image, label) triples sharing forward batches.

        Every idx must be distinct: an image's noise is seeded by its idx, and its record is returned by it."""
        images = list(images)
        seen: set[int] = set()
        for idx, *_ in images:
            if idx in seen:
                raise ValueError(
                    f"two images share idx {idx}: every image needs its own idx (its noise is "
                    "seeded by it, and its record is found by it)"
                )
            seen.add(idx)
        records: dict[int, Record] = {}
        sampler = None
        try:
            for idx, x, label in images:
                sampler = sampler or self.sampler(batch_size, seed, getattr(x, "device", "cpu"))
                records.update(sampler.submit(idx, x, label, procedure))
            if sampler is not None:
                records.update(sampler.drain())
        finally:  # an error leaves images in flight: the next call must start clean
            if sampler is not None:
                sampler.reset()
        return [records[idx] for idx, *_ in images]

    def certify_record(self, x, n0, n, alpha, batch_size, seed=0, idx=0, label=None, skip_wrong_guess=False):
        """CERTIFY of one image with its counts (a :class:`CertifyRecord`; label -1 when not given)."""
        if skip_wrong_guess and label is None:
            raise ValueError("skip_wrong_guess needs the image's label")
        procedure = Certify(n0, n, alpha, skip_wrong_guess)
        return self.run(procedure, [(idx, x, -1 if label is None else label)], batch_size, seed)[0]

    def certify(self, x, n0, n, alpha, batch_size, seed=0, idx=0) -> tuple[int, float]:
        """CERTIFY: (cA, radius), or (ABSTAIN, 0.0) when cA's probability cannot be bounded above 1/2."""
        record = self.certify_record(x, n0, n, alpha, batch_size, seed, idx)
        return record.predict, record.radius

    def predict(self, x, n, alpha, batch_size, seed=0, idx=0) -> int:
        """PREDICT: the top class, or ABSTAIN."""
        procedure = Predict(n, alpha)
        return self.run(procedure, [(idx, x, -1)], batch_size, seed)[0].predict
