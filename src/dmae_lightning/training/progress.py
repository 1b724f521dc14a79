"""Training progress as log lines for batch jobs, where Lightning's progress bar is off (stderr not a terminal)."""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """H:MM:SS (hours not wrapped at a day), "?" when unknown: the one format of elapsed and remaining time in the
    progress lines of training and certification."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog(pl.Callback):
    """On rank 0, when no progress bar is shown: one line at the end of every epoch and, within long epochs, every
    ``every_s`` seconds: epoch, optimizer step, mean training loss since the previous line, images per second
    (all ranks) and the estimated time left. Lightning has no such logger for batch jobs (its bars need a tty).

    The loss is summed on its device and read back once per line (a read-back every step would stall the CPU until
    the GPU has finished the step, so that the next step's launches could not overlap it)."""

    def __init__(self, every_s: float = 60.0):
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.every_s = every_s
        self._active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = trainer.is_global_zero and trainer.progress_bar_callback is None
        self._start = self._last = time.monotonic()
        self._start_step = trainer.global_step
        self._images = 0
        self._loss_sum: torch.Tensor | None = None  # on the loss's device: no read-back per step
        self._loss_count = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active:
            return
        self._images += extract_batch_size(batch) * trainer.world_size
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(torch.float64).sum()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        if time.monotonic() - self._last >= self.every_s:
            self._log_line(trainer, "")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._log_line(trainer, " done")

    def _log_line(self, trainer: pl.Trainer, suffix: str) -> None:
        now = time.monotonic()
        elapsed, steps = now - self._start, trainer.global_step - self._start_step
        total = trainer.estimated_stepping_batches  # inf when neither max_epochs nor max_steps bounds the run
        left = (total - trainer.global_step) * elapsed / steps if steps and math.isfinite(total) else math.inf
        loss = "n/a"
        if self._loss_sum is not None and self._loss_count:
            loss = f"{float(self._loss_sum) / self._loss_count:.4f}"  # the line's one read-back
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        log.info(
            "epoch %d/%s%s | step %d/%s | loss %s | %.1f images/s | elapsed %s | ETA %s",
            trainer.current_epoch + 1,
            max_epochs,
            suffix,
            trainer.global_step,
            int(total) if math.isfinite(total) else "?",
            loss,
            self._images / max(elapsed, 1e-9),
            duration(elapsed),
            duration(left),
        )
        self._last, self._loss_sum, self._loss_count = now, None, 0
