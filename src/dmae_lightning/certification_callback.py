"""Certified accuracy of the smoothed classifier during training, on a fixed subset of a split.

At the end of every ``every_n_epochs``-th validation epoch, CERTIFY runs on ``num_images`` evenly spaced
images of ``trainer.datamodule.dataset(split)`` (not the first ones: a class-sorted ImageFolder would give
one class), split across the ranks (rank R takes ``idx[R::world]``).
Image ``idx`` draws its noise from ``seeded_generator(seed, CERTIFY_STREAM, idx)`` as in the
certification job, so the numbers do not depend on the number of ranks and, for equal settings, equal
what ``certify.py`` reports for those images. Counts are summed over the ranks before logging
``cert/acc@<r>`` (certified accuracy at radius r), ``cert/acr`` and ``cert/abstain_rate``.
A small n keeps it cheap; the radii it can certify are at most sigma * Phi^-1(alpha^(1/n)).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from .results import ABSTAIN, default_radii, radius_key
from .rng import CERTIFY_STREAM, seeded_generator
from .smoothing import AUTOCAST_DTYPES, Smooth


class CertificationCallback(pl.Callback):
    """Logs certified accuracy of ``pl_module.model`` smoothed at ``pl_module.hparams.sigma``.

    radii: null gives the paper's for the data set (ImageNet's for imagenet, CIFAR-10's otherwise).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 50,
        n0: int = 20,
        n: int = 200,
        alpha: float = 0.001,
        batch: int = 200,
        split: str = "val",
        radii: list[float] | None = None,
        seed: int = 0,
        precision: str = "fp32",
    ):
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("num_images", num_images),
            ("n0", n0),
            ("n", n),
            ("batch", batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CertificationCallback: {name} must be an integer >= 1, got {value!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"CertificationCallback: alpha must lie strictly between 0 and 1, got {alpha!r}")
        if radii is not None and (not radii or any(not math.isfinite(r) or r < 0 for r in radii)):
            raise ValueError(f"CertificationCallback: radii must be null or numbers >= 0, got {radii!r}")
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"CertificationCallback: precision must be one of {sorted(AUTOCAST_DTYPES)}")
        if seed < 0:
            raise ValueError(f"CertificationCallback: seed must be >= 0, got {seed}")
        self.every_n_epochs, self.num_images, self.n0, self.n = every_n_epochs, num_images, n0, n
        self.alpha, self.batch, self.split, self.seed, self.precision = alpha, batch, split, seed, precision
        self.radii = tuple(float(r) for r in radii) if radii is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail at the start of fit, not after the first epoch, when something is missing."""
        if stage != "fit":
            return
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "dataset"):
            raise ValueError(
                "CertificationCallback needs a datamodule with dataset(split) (dmae_lightning.data)"
            )
        if "sigma" not in pl_module.hparams or "num_classes" not in pl_module.hparams:
            raise ValueError(
                "CertificationCallback needs hparams sigma and num_classes (SmoothedClassifierModule)"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        for name, value in self.compute(trainer, pl_module).items():
            # Already summed over the ranks: every rank logs the same value, no further sync needed.
            pl_module.log(name, value, sync_dist=False, on_step=False, on_epoch=True)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The metrics over all ranks' images (every rank returns the same values)."""
        dataset = trainer.datamodule.dataset(self.split)
        radii = self.radii or default_radii(getattr(trainer.datamodule, "name", ""))
        step = max(1, len(dataset) // self.num_images)
        indices = list(range(0, len(dataset), step))[: self.num_images]
        model = getattr(pl_module, "model", pl_module)
        smooth = Smooth(
            model, int(pl_module.hparams.num_classes), float(pl_module.hparams.sigma), self.precision
        )
        # Per rank: [certified correct at each radius..., sum of radius over correct, abstentions, images]
        sums = torch.zeros(len(radii) + 3, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for idx in indices[trainer.global_rank :: trainer.world_size]:
                image, label = dataset[idx]
                image = image.to(pl_module.device)  # [C,H,W]
                generator = seeded_generator(self.seed, CERTIFY_STREAM, idx, device=pl_module.device)
                prediction, radius = smooth.certify(image, self.n0, self.n, self.alpha, self.batch, generator)
                correct = prediction == int(label)
                for i, r in enumerate(radii):
                    sums[i] += correct and radius >= r
                sums[-3] += radius if correct else 0.0
                sums[-2] += prediction == ABSTAIN
                sums[-1] += 1
        finally:
            model.train(was_training)
        sums = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum").cpu()  # [R+3]
        count = float(sums[-1])
        metrics = {f"cert/acc@{radius_key(r)}": float(sums[i]) / count for i, r in enumerate(radii)}
        metrics["cert/acr"] = float(sums[-3]) / count
        metrics["cert/abstain_rate"] = float(sums[-2]) / count
        return metrics
