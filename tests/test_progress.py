"""Progress lines for batch logs (issue 14.5): one per epoch (and every N seconds) when no progress bar is shown."""

from __future__ import annotations

import logging
import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmae_lightning.training.progress import ProgressLog

LINE = re.compile(
    r"epoch (\d+)/(\d+) done \| step (\d+)/(\d+) \| loss ([\d.]+) \| ([\d.]+) images/s \| elapsed [\d:]+ \| ETA ([\d:]+)"
)


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(make_trainer, progress_bar: bool) -> Regression:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))  # 40 images / batch 8 = 5 steps per epoch
    module = Regression()
    trainer = make_trainer(
        callbacks=[ProgressLog(every_s=3600)], max_epochs=3, enable_progress_bar=progress_bar
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


def test_one_line_per_epoch_with_mean_loss_and_eta(make_trainer, caplog):
    with caplog.at_level(logging.INFO, logger="dmae_lightning.training.progress"):
        module = fit(make_trainer, progress_bar=False)
    lines = [
        LINE.fullmatch(r.getMessage()) for r in caplog.records if r.name == "dmae_lightning.training.progress"
    ]
    assert len(lines) == 3 and all(lines), [r.getMessage() for r in caplog.records]
    for epoch, match in enumerate(lines):
        assert [int(match.group(i)) for i in (1, 2, 3, 4)] == [epoch + 1, 3, 5 * (epoch + 1), 15]
        expected = sum(module.losses[5 * epoch : 5 * epoch + 5]) / 5  # the mean loss of this epoch's steps
        assert float(match.group(5)) == round(expected, 4) and float(match.group(6)) > 0
    assert lines[-1].group(7) == "0:00:00"


def test_silent_when_a_progress_bar_is_shown(make_trainer, caplog):
    with caplog.at_level(logging.INFO, logger="dmae_lightning.training.progress"):
        fit(make_trainer, progress_bar=True)
    assert not [r for r in caplog.records if r.name == "dmae_lightning.training.progress"]
