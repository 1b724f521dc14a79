"""CertificationCallback: logged certified accuracy equals Smooth on the same images and seeds."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from helpers.certify import make_classifier_checkpoint
from pytorch_lightning.loggers import CSVLogger
from scipy.stats import norm

from dmae_lightning.certification import Smooth
from dmae_lightning.certification.callback import CertificationCallback
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.noise import GaussianNoise
from dmae_lightning.training.finetune import BaseClassifierModule

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)  # CIFAR-10's, the default for digits
SETTINGS = dict(num_images=12, n0=10, n=60, alpha=0.001, batch_size=60, split="val", seed=3)

pytestmark = pytest.mark.usefixtures("single_thread")


def recompute(model: torch.nn.Module, dataset, sigma: float) -> dict[str, float]:
    """The metrics from Smooth.certify on 12 evenly spaced images, written out independently."""
    smooth = Smooth(model.eval(), 10, GaussianNoise(sigma))
    outcomes = []
    spacing = len(dataset) // SETTINGS["num_images"]
    for idx in [spacing * k for k in range(SETTINGS["num_images"])]:
        image, label = dataset[idx]
        prediction, radius = smooth.certify(
            image, SETTINGS["n0"], SETTINGS["n"], SETTINGS["alpha"], 60, seed=SETTINGS["seed"], idx=idx
        )
        outcomes.append((prediction == label, radius, prediction == -1))
    count = len(outcomes)
    reach = sigma * norm.ppf(SETTINGS["alpha"] ** (1 / SETTINGS["n"]))  # 0.308: n = 60 cannot certify 0.5
    metrics = {
        f"cert/acc@{r:g}": sum(ok and rad >= r for ok, rad, _ in outcomes) / count
        for r in RADII
        if r <= reach
    }
    metrics["cert/acr"] = sum(rad for ok, rad, _ in outcomes if ok) / count
    metrics["cert/abstain_rate"] = sum(abstain for *_, abstain in outcomes) / count
    return metrics


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two more epochs (64 digits) of a micro ViT that already classifies noisy digits about half right;
    certification every 2nd validation epoch."""
    out = tmp_path_factory.mktemp("fit")
    start = make_classifier_checkpoint(out / "start.ckpt")
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=32, subset_first=64, num_classes=10)
    module = BaseClassifierModule(
        model_name="vit_micro_patch8",
        model_kwargs={"img_size": 32},
        num_classes=10,
        noise=GaussianNoise(0.25),
        mixup=None,
        label_smoothing=0.0,
        optimizer=dict(name="adamw", base_lr=1e-3, weight_decay=0.0, warmup_epochs=0, min_lr=0.0),
    )
    module.load_pretrained(str(start))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=CSVLogger(out, name="", version=""),
        callbacks=[CertificationCallback(every_n_epochs=2, **SETTINGS)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule, out


def test_logged_metrics_equal_smooth_on_the_same_images(fitted):
    trainer, module, datamodule, _ = fitted
    expected = recompute(module.model, datamodule.dataset("val"), 0.25)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("cert/")}
    assert logged == pytest.approx(expected, abs=1e-6)
    assert 0 < logged["cert/acc@0"] < 1 and logged["cert/acr"] > 0  # not a trivial classifier
    # radii beyond the reach of n = 60 draws are not logged (a 0.0 there would only say n was too small)
    assert set(logged) == {"cert/acc@0", "cert/acc@0.25", "cert/acr", "cert/abstain_rate"}


def test_logged_every_n_epochs_only(fitted):
    *_, out = fitted
    with open(out / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("cert/acc@0")]
    assert [int(row["epoch"]) for row in rows] == [1]  # epoch 0 skipped with every_n_epochs=2


class _GatheringStrategy:
    """Stands in for DDP's all_gather: rank 1 reports first; rank 0 gets [rank 0's, rank 1's] tensors."""

    def __init__(self, rank: int, store: list):
        self.rank, self.store, self.calls = rank, store, 0

    def all_gather(self, tensor):
        if self.rank == 1:
            self.store.append(tensor.clone())
            return torch.stack([tensor, tensor])
        other = self.store[self.calls]
        self.calls += 1
        return torch.stack([tensor, other])


def test_ranks_split_the_images_and_sum_the_counts(fitted):
    trainer, module, datamodule, _ = fitted
    callback = CertificationCallback(**SETTINGS)
    store: list[torch.Tensor] = []
    per_rank = {}
    module.train()
    for rank in (1, 0):
        fake = SimpleNamespace(
            datamodule=datamodule, global_rank=rank, world_size=2, strategy=_GatheringStrategy(rank, store)
        )
        per_rank[rank] = callback.compute(fake, module)
    assert module.model.training  # certified in eval mode, then put back
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("cert/")}
    assert per_rank[0] == pytest.approx(logged, abs=1e-6)  # as one process (checked against Smooth above)
    assert per_rank[1] != per_rank[0]
    sizes, rows = store  # rank 1's: its image count, then its records
    assert int(sizes) == 6 and rows.shape == (6, 4)  # 12 images, 6 per rank
    spacing = len(datamodule.dataset("val")) // 12
    assert sorted(int(i) for i in rows[:, 0]) == [
        spacing * k for k in range(1, 12, 2)
    ]  # rank 1: odd positions


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every_n_epochs=0), r"every_n_epochs must be an integer in \[1, 10\^12\]"),
        (dict(n=0), r"n must be an integer in \[1, 10\^12\]"),
        (dict(alpha=1.0), "alpha must lie strictly between 0 and 1"),
        (dict(radii=[-0.5]), "radii must be null or numbers >= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CertificationCallback(**kwargs)
