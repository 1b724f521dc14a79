"""The skeleton both training modules share: one network ``self.model`` (compiled in place on request), the
job's one noise (stored in the hyper-parameters as plain data, so checkpoints load with weights_only=True), the
optimiser settings checked when the module is built, and a training step that draws the batch's noise generator
from (seed, rank, step, batch), asks the subclass for the loss, stops on a non-finite loss and logs it.

No host synchronisation per step (each one stalls the CPU until the GPU has finished the step, so the next step's
launches and data transfer cannot overlap it): the non-finite guard (:class:`FiniteLossGuard`) accumulates on the
device and reads back once every ``trainer.log_every_n_steps`` optimizer steps, at an epoch's last batch and before
any checkpoint is written; the logged values (:meth:`NoisyTrainingModule.log_train`) are read back by Lightning
only when it writes its logs.

A new noisy training module subclasses :class:`NoisyTrainingModule` and implements ``training_loss``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from dmae_lightning.models import DMAEViT, VisionTransformerClassifier
from dmae_lightning.models.weights import LoadReport, load_weights
from dmae_lightning.noise import Noise, noise_from_config
from dmae_lightning.rng import TRAIN_STREAM, VAL_STREAM, seeded_generator
from dmae_lightning.training.optim import (
    check_optimizer_config,
    configure_optimizer,
    trainer_adamw_implementation,
)


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


NON_FINITE_ADVICE = (
    "stopping. The last good checkpoint is kept: resume with ckpt_path=last after lowering the learning rate or "
    "changing the precision."
)
DEFAULT_CHECK_EVERY = 50  # optimizer steps between two checks of the loss when trainer.log_every_n_steps is 0


def check_finite(module: pl.LightningModule, loss: torch.Tensor, batch_idx: int) -> None:
    """Check one loss now (one host synchronisation): stop with a message naming the step; every rank stops
    together so DDP cannot hang. The training step uses :class:`FiniteLossGuard` instead (no synchronisation
    per step).

    Raising (rather than ``trainer.should_stop``) ends ``fit`` without writing a checkpoint, so
    ``last.ckpt`` keeps the last good weights.
    """
    finite = bool(torch.isfinite(loss.detach()).all())
    if module.trainer is not None and module.trainer.world_size > 1:
        finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
    if not finite:
        raise FloatingPointError(
            f"non-finite training loss at global step {module.global_step} (epoch {module.current_epoch}, "
            f"batch {batch_idx}); {NON_FINITE_ADVICE}"
        )


class FiniteLossGuard:
    """The non-finite loss stop of :func:`check_finite` without a host synchronisation per step.

    :meth:`update` (every batch) keeps, on the loss's device, the global step and batch index of the window's
    first non-finite loss and the sum of its losses: a few tiny kernels, no read-back. :meth:`check` reads
    them back (one synchronisation; with DDP one ``min`` all-reduce first, so every rank stops together, naming
    the earliest step on any rank) and raises ``FloatingPointError`` naming that step, epoch and batch. The
    module checks every ``trainer.log_every_n_steps`` optimizer steps (when Lightning reads its logged values
    back anyway; :data:`DEFAULT_CHECK_EVERY` when that is 0), at an epoch's last batch and end, and before any
    checkpoint is written, so a checkpoint never holds weights updated by a non-finite loss. A check with no
    batch since the last one reads nothing back."""

    def __init__(self) -> None:
        self.pending = 0  # batches since the last check (the same on every rank: DDP steps together)
        self.checked_at_step = -1  # the global step of the last check
        self._epoch = 0  # the epoch of the window's batches (an epoch's end always checks)
        self._state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update(self, loss: torch.Tensor, global_step: int, batch_idx: int, epoch: int) -> None:
        loss = loss.detach()
        if self._state is None or self._state[0].device != loss.device:
            self._state = self._fresh(loss.device)
        bad_step, bad_batch, loss_sum = self._state
        first = ~torch.isfinite(loss).all() & torch.isinf(bad_step)  # the window's first non-finite loss
        self._state = (
            torch.where(first, float(global_step), bad_step),
            torch.where(first, float(batch_idx), bad_batch),
            loss_sum + loss.to(torch.float64).sum(),
        )
        if not self.pending:
            self._epoch = epoch
        self.pending += 1

    @staticmethod
    def _fresh(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float64: steps and batch indices exact below 2**53; inf = no non-finite loss (min over ranks keeps it)
        def full(value: float) -> torch.Tensor:
            return torch.full((), value, dtype=torch.float64, device=device)  # a fill: no host-to-device copy

        return full(float("inf")), full(float("inf")), full(0.0)

    def check(self, module: pl.LightningModule, every_rank: bool = False) -> float | None:
        """Raise if a loss since the last check was non-finite on any rank; else this rank's mean loss of the
        window (None when there was no batch since the last check: then nothing is read back, unless
        ``every_rank`` asks for the all-reduce anyway, for a call that every rank makes at once but maybe at
        different points of their steps, as Lightning's checkpoint save from a signal handler)."""
        trainer = module._trainer
        distributed = trainer is not None and trainer.world_size > 1
        if not self.pending and not (every_rank and distributed):
            return None
        if self._state is None:
            self._state = self._fresh(module.device)
        bad_step, bad_batch, loss_sum = self._state
        first_bad = torch.stack([bad_step, bad_batch])
        if trainer is not None and distributed:
            first_bad = trainer.strategy.reduce(first_bad, reduce_op="min")
        step, batch, total = torch.cat([first_bad, loss_sum.reshape(1)]).tolist()  # the one read-back
        count, epoch = self.pending, self._epoch
        self.pending, self._state = 0, self._fresh(bad_step.device)
        self.checked_at_step = module.global_step
        if step != float("inf"):  # also when this rank had no batch since its last check: another rank had
            raise FloatingPointError(
                f"non-finite training loss at global step {int(step)} (epoch {epoch}, batch {int(batch)}); "
                f"{NON_FINITE_ADVICE} (found at the check after global step {module.global_step}: the loss is "
                "checked every trainer.log_every_n_steps steps)"
            )
        return total / count if count else None


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
        self.finite_guard = FiniteLossGuard()
        self.train_means = torch.nn.ModuleDict()  # log_train's metrics (no state in the checkpoint)
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
        self.finite_guard.update(loss, self.global_step, batch_idx, self.current_epoch)
        self.log_train("loss", loss, batch[0].shape[0])
        return loss

    def log_train(self, name: str, value: torch.Tensor, batch_size: int) -> None:
        """Log ``train/<name>`` as ``train/<name>_step`` (this rank's value) and ``train/<name>_epoch`` (the mean
        over the epoch's batches, weighted by batch size, on all ranks), without a host synchronisation per step.

        Through a torchmetrics ``MeanMetric`` (synchronised across ranks once, at the epoch's end): Lightning's
        ``self.log(tensor, on_step=True, sync_dist=True)`` would run a barrier and an all-reduce every step
        (a host synchronisation with NCCL), and ``prog_bar=True`` an ``.item()`` every step. Lightning reads the
        step value back only when it writes its logs (every ``trainer.log_every_n_steps`` steps)."""
        key = name.replace("/", "_").replace(".", "_")
        if key not in self.train_means:  # no NaN check (nan_strategy): it would read back every step
            self.train_means[key] = MeanMetric(nan_strategy="disable").to(value.device)
        metric = self.train_means[key]
        assert isinstance(metric, MeanMetric)
        value = value.detach()
        metric(value, torch.full_like(value, batch_size, dtype=torch.float32))  # the weight: a fill, no copy
        self.log(f"train/{name}", metric, on_step=True, on_epoch=True, metric_attribute=f"train_means.{key}")

    def finite_check_interval(self) -> int:
        """Optimizer steps between two checks of the loss: Lightning's logging interval, when it reads the logged
        values back anyway (:data:`DEFAULT_CHECK_EVERY` when logging is off)."""
        every = int(
            getattr(self.trainer, "log_every_n_steps", 0)
        )  # set by Lightning at run time, not declared
        return every if every > 0 else DEFAULT_CHECK_EVERY

    def check_finite_loss(self, every_rank: bool = False) -> float | None:
        """:meth:`FiniteLossGuard.check`; the window's mean loss goes to the progress bar when one is shown."""
        mean = self.finite_guard.check(self, every_rank)
        trainer = self._trainer
        if mean is not None and trainer is not None and trainer.progress_bar_callback is not None:
            # straight into the bar's dict: a value logged with prog_bar=True would be read back every step
            trainer.progress_bar_metrics["loss"] = mean
        return mean

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        due = step % self.finite_check_interval() == 0 and step != self.finite_guard.checked_at_step
        if due or self.trainer.is_last_batch:
            self.check_finite_loss()

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """torch restores an optimizer's param groups with their implementation flags, so a run resumed on
        another kind of device would keep the saved one (fused where it cannot be, a loop where fused can):
        AdamW's groups get this run's (:func:`~.optim.adamw_implementation`) before Lightning loads them."""
        trainer = self._trainer
        if trainer is None:  # load_from_checkpoint: no optimizer is restored
            return
        implementation = trainer_adamw_implementation(trainer, trainer.strategy.root_device)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if "fused" in group and "foreach" in group:  # AdamW's (LARS has neither)
                    group["fused"], group["foreach"] = (
                        implementation.get("fused"),
                        implementation.get("foreach"),
                    )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """No checkpoint holds weights updated by a non-finite loss. Every rank saves (Lightning's contract), so
        with DDP every rank joins the check's all-reduce, whether or not it had a batch since its last check
        (a save from Lightning's SLURM signal handler may find the ranks at different points of a step)."""
        self.check_finite_loss(every_rank=True)

    def configure_optimizers(self):
        return configure_optimizer(self, self.model, **self.optimizer_cfg)
