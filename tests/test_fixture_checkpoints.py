"""Issue 23.4: checkpoints written before the layout moved (tests/fixtures/main_2026_12_07, made by that
commit's code) load unchanged and give the same outputs: the DMAE loss and reconstruction, the classifier's
logits, and the certification records (the same block-seeded noise, counts and radii)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import TESTS

from dmae_lightning.certification import Certify, CertifyRadii, Smooth
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import load_weights
from dmae_lightning.noise import GaussianNoise

FIXTURES = TESTS / "fixtures" / "main_2026_12_07"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


def rows(records) -> torch.Tensor:
    values = [
        [math.nan if v is None else float(v) for k, v in dataclasses.asdict(r).items() if k != "time"]
        for r in records
    ]
    return torch.tensor(values, dtype=torch.float64)


def test_pretraining_checkpoint_of_the_old_layout(expected):
    dmae = create_model("dmae_vit_micro_patch8")
    load_weights(dmae, FIXTURES / "pretrain.ckpt")
    with torch.no_grad():
        loss, pred, mask = dmae.eval()(
            expected["images"], mask_ratio=0.75, generator=torch.Generator().manual_seed(1)
        )
    assert torch.equal(mask, expected["mask"])
    torch.testing.assert_close(pred, expected["pred"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=1e-7)


def test_fine_tuned_checkpoint_of_the_old_layout_certifies_the_same(expected):
    classifier = create_model("vit_micro_patch8", num_classes=10)
    load_weights(classifier, FIXTURES / "finetune.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(
            classifier.eval()(expected["images"]), expected["logits"], rtol=1e-5, atol=1e-6
        )
    smooth = Smooth(classifier, 10, GaussianNoise(0.25))
    images = [(i, expected["images"][i], i % 10) for i in range(4)]
    certify = rows(smooth.run(Certify(20, 200, 0.001), images, batch_size=110, seed=0))
    radii = rows(smooth.run(CertifyRadii((0.0, 0.25), 300, 0.001), images, batch_size=110, seed=0))
    assert torch.equal(certify.nan_to_num(-9), expected["certify"].nan_to_num(-9))
    assert torch.equal(radii.nan_to_num(-9), expected["certify_radii"].nan_to_num(-9))
