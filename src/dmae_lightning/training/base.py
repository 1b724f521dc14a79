"""The skeleton both training modules share: one network ``self.model`` (compiled in place on request), the
job's one noise (stored in the hyper-parameters as plain data, so checkpoints load with weights_only=True), the
optimiser settings checked when the module is built, and a training step that draws the batch's noise generator
from (seed, rank, step, batch), asks the subclass for the loss, stops on a non-finite loss and logs it.

A new noisy training module subclasses :class:`NoisyTrainingModule` and implements ``training_loss``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import pytorch_lightning as pl
import torch

from dmae_lightning.models import DMAEViT, VisionTransformerClassifier
from dmae_lightning.models.weights import LoadReport, load_weights
from dmae_lightning.noise import Noise, noise_from_config
from dmae_lightning.rng import TRAIN_STREAM, VAL_STREAM, seeded_generator
from dmae_lightning.training.optim import check_optimizer_config, configure_optimizer


def compile_in_place(model: torch.nn.Module, compile: bool | dict) -> None:
    """``torch.compile`` the model's forward in place (``compile``: False, True, or torch.compile's kwargs).

    ``nn.Module.compile`` keeps the module itself, so state dicts (and our checkpoints) carry the plain
    parameter names, with no ``_orig_mod.`` prefix, and load into uncompiled models and back. Compiling
    the inner model rather than the LightningModule leaves Lightning's hooks and DDP wrapping untouched.
    """
    if compile is False:
        return
    if not isinstance(compile, (bool, dict)):
        raise ValueError(f"compile must be true, false or a dict of torch.compile options, got {compile!r}")
    model.compile(**(compile if isinstance(compile, dict) else {}))


def check_finite(module: pl.LightningModule, loss: torch.Tensor, batch_idx: int) -> None:
    """Stop with a message naming the step; every rank stops together so DDP cannot hang.

    Raising (rather than ``trainer.should_stop``) ends ``fit`` without writing a checkpoint, so
    ``last.ckpt`` keeps the last good weights.
    """
    finite = bool(torch.isfinite(loss.detach()).all())
    if module.trainer is not None and module.trainer.world_size > 1:
        finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
    if not finite:
        raise FloatingPointError(
            f"non-finite training loss at global step {module.global_step} (epoch {module.current_epoch}, "
            f"batch {batch_idx}); stopping. The last good checkpoint is kept: resume with ckpt_path=last "
            "after lowering the learning rate or changing the precision."
        )


class NoisyTrainingModule(pl.LightningModule):
    """Subclasses call ``save_hyperparameters`` (Lightning reads their own arguments), then :meth:`attach`."""

    model: DMAEViT | VisionTransformerClassifier
    noise: Noise

    def attach(
        self,
        model: DMAEViT | VisionTransformerClassifier,
        noise: Noise | Mapping,
        optimizer: dict | None,
        compile: bool | dict,
    ) -> None:
        """The shared tail of the constructors: noise as plain data, network compiled in place, optimiser checked."""
        self.noise = noise_from_config(noise)
        self.hparams["noise"] = self.noise.config()  # plain data: checkpoints load with weights_only=True
        self.model = model
        compile_in_place(self.model, compile)
        self.optimizer_cfg = dict(optimizer or {})
        check_optimizer_config(self.optimizer_cfg)

    def load_pretrained(self, path: str) -> LoadReport:
        """Initialise the network from a DMAE/MAE file (official or ours) or a fine-tuned classifier."""
        return load_weights(self.model, path)

    def training_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """The batch's noise: a pure function of (seed, rank, step, batch), so a resumed run draws the same."""
        return seeded_generator(
            self.hparams["seed"], TRAIN_STREAM, self.global_rank, self.global_step, batch_idx, device=device
        )

    def validation_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """The same noise (and masks) every epoch and on every rank count, so curves are comparable."""
        return seeded_generator(self.hparams["seed"], VAL_STREAM, batch_idx, device=device)

    @abstractmethod
    def training_loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        """The loss of one training batch of clean [0,1] images and labels, with the noise from ``generator``."""

    def training_step(self, batch, batch_idx: int):
        loss = self.training_loss(batch, self.training_generator(batch[0].device, batch_idx))
        check_finite(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return configure_optimizer(self, self.model, **self.optimizer_cfg)
