"""Every registered model (issue 23): built by name from its one config, forward on [0,1] images at its native
size, a state-dict round trip through torch.load(weights_only=True) that reproduces the outputs, and the
classifiers through timm's own registry. Models deeper than two blocks are checked with their widths, patches
and resolution but one block (and one decoder block): the same code paths at a fraction of ViT-L's cost."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from dmae_lightning.models import (
    PRETRAIN_PREFIX,
    DMAEViT,
    VisionTransformerClassifier,
    create_model,
    list_models,
    model_config,
)


def shallow(name: str) -> dict:
    cls, config = model_config(name)
    overrides = {"depth": 1} if config["depth"] > 2 else {}
    if cls is DMAEViT and config["decoder_depth"] > 1:
        overrides["decoder_depth"] = 1
    return overrides


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name):
    torch.manual_seed(0)
    model = create_model(name, **shallow(name)).eval()
    cls, config = model_config(name)
    assert type(model) is cls and model.patch_embed.img_size == (config["img_size"],) * 2
    imgs = torch.rand(2, 3, config["img_size"], config["img_size"])  # [0,1] pixels at the model's native size
    with torch.no_grad():
        out = (
            model(imgs, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
            if cls is DMAEViT
            else model(imgs)
        )
    if cls is DMAEViT:
        loss, pred, mask = out
        patches = (config["img_size"] // config["patch_size"]) ** 2
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert pred.shape == (2, patches, config["patch_size"] ** 2 * 3) and mask.shape == (2, patches)
    else:
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = create_model(name, **shallow(name)).eval()
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        again = (
            twin(imgs, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
            if cls is DMAEViT
            else twin(imgs)
        )
    for a, b in zip(out if cls is DMAEViT else (out,), again if cls is DMAEViT else (again,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith(PRETRAIN_PREFIX)])
def test_classifiers_are_in_timm_s_registry(name):
    model = timm.create_model(name, num_classes=7, **shallow(name))
    assert isinstance(model, VisionTransformerClassifier) and model.head.out_features == 7
    assert isinstance(model, VisionTransformer)  # a subclass of timm's own ViT
    with pytest.raises(ValueError, match="no weights to download"):
        timm.create_model(name, pretrained=True)
