"""Certified accuracy of the smoothed classifier during training, on a fixed subset of a split.

At the end of every ``every_n_epochs``-th validation epoch, CERTIFY runs on ``num_images`` evenly spaced
images of ``trainer.datamodule.dataset(split)`` (not the first ones: a class-sorted ImageFolder would give
one class), split across the ranks (rank R takes ``idx[R::world]``), all of a rank's images sharing
forward batches. The noise is the certification job's (seed, idx) block streams, so the numbers do not
depend on the number of ranks and, for equal settings, equal what ``certify.py`` reports for those
images. The records of all ranks are gathered and summarised by the procedure (:mod:`.summary`), as in the
job: ``cert/acc@<r>``, ``cert/acr`` and ``cert/abstain_rate``. A small n keeps it cheap; the radii it can
certify are at most the noise's radius at alpha^(1/n). The noise is the module's own (``pl_module.noise``), the
one it trains with.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from dmae_lightning.certification.checks import check_alpha, check_counts, check_precision, evenly_spaced
from dmae_lightning.certification.metrics import default_radii
from dmae_lightning.certification.procedures import Certify
from dmae_lightning.certification.records import CertifyRecord, of_type
from dmae_lightning.certification.smooth import Smooth
from dmae_lightning.noise import Noise


class CertificationCallback(pl.Callback):
    """Logs certified accuracy of ``pl_module.model`` smoothed with ``pl_module.noise``.

    radii: null gives the paper's for the data set (ImageNet's for imagenet, CIFAR-10's otherwise).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 50,
        n0: int = 20,
        n: int = 200,
        alpha: float = 0.001,
        batch_size: int = 200,
        split: str = "val",
        radii: list[float] | None = None,
        seed: int = 0,
        precision: str | None = None,
    ):
        try:
            check_counts(
                every_n_epochs=every_n_epochs, num_images=num_images, n0=n0, n=n, batch_size=batch_size
            )
            check_alpha(alpha)
            check_precision(precision)
        except ValueError as err:
            raise ValueError(f"CertificationCallback: {err}") from None
        if radii is not None and (not radii or any(not math.isfinite(r) or r < 0 for r in radii)):
            raise ValueError(f"CertificationCallback: radii must be null or numbers >= 0, got {radii!r}")
        if seed < 0:
            raise ValueError(f"CertificationCallback: seed must be >= 0, got {seed}")
        self.every_n_epochs, self.num_images, self.n0, self.n = every_n_epochs, num_images, n0, n
        self.alpha, self.batch_size, self.split, self.seed = alpha, batch_size, split, seed
        self.precision = precision
        self.radii = tuple(float(r) for r in radii) if radii is not None else None

    def check(self, datamodule, noise: Noise | None) -> None:
        """ValueError (one line) unless the callback can certify ``datamodule``'s split with ``noise``: the
        training job calls it before the first step (a discrete noise refuses images off the 8-bit grid, such
        as the bundled digits), ``setup`` again for a Trainer built by hand."""
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ValueError(
                "CertificationCallback needs a datamodule with dataset(split) (dmae_lightning.data)"
            )
        if not isinstance(noise, Noise):
            raise ValueError("CertificationCallback needs a module with a noise (BaseClassifierModule)")
        dataset = datamodule.dataset(self.split)
        try:
            noise.check_input(dataset[self.indices(len(dataset))[0]][0])
        except ValueError as err:
            raise ValueError(f"CertificationCallback on the {self.split} split: {err}") from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail at the start of fit, not after the first epoch, when something is missing."""
        if stage != "fit":
            return
        if "num_classes" not in getattr(pl_module, "hparams", {}):
            raise ValueError(
                "CertificationCallback needs a module with hparams num_classes (BaseClassifierModule)"
            )
        # Lightning sets Trainer.datamodule at run time; its class does not declare it
        self.check(trainer.datamodule, getattr(pl_module, "noise", None))  # type: ignore[attr-defined]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        for name, value in self.compute(trainer, pl_module).items():
            # Computed from every rank's records: every rank logs the same value, no further sync needed.
            pl_module.log(name, value, sync_dist=False, on_step=False, on_epoch=True)

    def indices(self, dataset_size: int) -> list[int]:
        return evenly_spaced(dataset_size, self.num_images)  # num_images > the split's size: ValueError

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The metrics over all ranks' images (every rank returns the same values)."""
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at run time, undeclared
        dataset = datamodule.dataset(self.split)
        radii = self.radii or default_radii(getattr(datamodule, "name", ""))
        model = getattr(pl_module, "model", pl_module)
        noise = getattr(pl_module, "noise", None)
        if not isinstance(noise, Noise):
            raise ValueError("CertificationCallback needs a module with a noise (BaseClassifierModule)")
        smooth = Smooth(model, int(pl_module.hparams["num_classes"]), noise, self.precision)
        procedure = Certify(self.n0, self.n, self.alpha)
        mine = self.indices(len(dataset))[trainer.global_rank :: trainer.world_size]
        images = [(idx, *dataset[idx]) for idx in mine]
        images = [(idx, image.to(pl_module.device), int(label)) for idx, image, label in images]
        was_training = model.training
        model.eval()
        try:
            mine_records = of_type(smooth.run(procedure, images, self.batch_size, self.seed), CertifyRecord)
        finally:
            model.train(was_training)
        records = self._gather(trainer, mine_records, pl_module.device)
        summary = procedure.summarise(records, radii, noise)  # the job's summary of these records
        metrics = summary.metrics(procedure.name)
        return {key: value for key, value in metrics.items() if value is not None}  # beyond reach: not logged

    @staticmethod
    def _gather(trainer: pl.Trainer, records: list[CertifyRecord], device) -> list[CertifyRecord]:
        """Every rank's records on every rank (padded to the longest share, the padding rows dropped)."""
        fields = ("idx", "predict", "radius", "correct")
        longest = int(trainer.strategy.all_gather(torch.tensor(len(records), device=device)).max())
        rows = torch.full((longest, len(fields)), -1.0, dtype=torch.float64, device=device)  # [L,4]
        for i, r in enumerate(records):
            rows[i] = torch.tensor([float(getattr(r, f)) for f in fields], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(rows).reshape(-1, len(fields)).cpu()  # [W*L,4]
        return [
            CertifyRecord(int(idx), -1, int(predict), float(radius), int(correct), 0, 0, 0.0)
            for idx, predict, radius, correct in gathered.tolist()
            if idx >= 0
        ]
