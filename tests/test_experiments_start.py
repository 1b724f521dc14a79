"""The paper's ImageNet / CIFAR-10 experiments compose and take real steps on tiny on-disk data sets."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from helpers import CONF
from helpers.cifar import write_cifar
from helpers.imagenet import WNIDS, write_imagenet

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.train import train
from dmae_lightning.models import create_model

QUICK = [
    "debug=tiny",  # one real training and validation batch on the CPU
    "seed=1",  # not the default: module and data module must agree on it (issue 17.4.1)
]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    write_imagenet(tmp_path / "data" / "imagenet", per_class=2)
    write_cifar(tmp_path / "data" / "cifar10")
    # torchvision checks the md5 of the real CIFAR-10 files, which written test files cannot match.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    return tmp_path / "data"


@pytest.fixture
def official_micro_file(tmp_path):
    """A pre-training file in the official layout for the micro model."""
    path = tmp_path / "dmae_micro.pth"
    torch.save({"model": create_model("dmae_vit_micro_patch8").state_dict(), "epoch": 1}, path)
    return path


def run(experiment, data_dir, tmp_path, *extra):
    cfg = compose(
        CONF,
        "train",
        [f"experiment={experiment}", f"paths.data_dir={data_dir}", *QUICK, *extra],
        output_dir=tmp_path / "run",
    )
    return cfg, train(cfg)


@pytest.mark.slow
def test_pretrain_imagenet_vit_base_starts_with_the_real_model(data_dir, tmp_path):
    cfg, metrics = run("pretrain_imagenet_vit_base", data_dir, tmp_path, f"data.num_classes={len(WNIDS)}")
    assert cfg.task.module.model_name == "dmae_vit_base_patch16" and cfg.model.img_size == 224
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(
    "experiment",
    [
        "pretrain_imagenet_vit_large",
        "finetune_imagenet_vit_base",
        "finetune_imagenet_vit_large",
        "linprobe_imagenet_vit_base",
        "pretrain_cifar10_continue",
        "finetune_cifar10_vit_base",
    ],
)
def test_paper_experiment_starts_on_tiny_data(experiment, data_dir, official_micro_file, tmp_path):
    extra = ["model=vit_micro_patch8", f"pretrained={official_micro_file}"]
    if "imagenet" in experiment:
        extra.append(f"data.num_classes={len(WNIDS)}")
    cfg, metrics = run(experiment, data_dir, tmp_path, *extra)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    if experiment.startswith(("finetune", "linprobe")):
        assert 0.0 <= metrics["val/acc_clean"] <= 1.0 and 0.0 <= metrics["val/acc_noisy"] <= 1.0
