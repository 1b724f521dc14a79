"""DMAE pre-training as a LightningModule (method.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dmae_lightning.models import DMAEViT, create_model
from dmae_lightning.noise import DEFAULT_NOISE, Noise, noise_from_config
from dmae_lightning.training.base import NoisyTrainingModule


class DMAEPretrainModule(NoisyTrainingModule):
    """Noisy, masked reconstruction of the clean image; all hyper-parameters are plain data."""

    def __init__(
        self,
        model_name: str = "dmae_vit_base_patch16",
        model_kwargs: dict | None = None,
        noise: Noise | Mapping = DEFAULT_NOISE,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        optimizer: dict | None = None,
        seed: int = 0,
        compile: bool | dict = False,
    ):
        super().__init__()
        noise = noise_from_config(noise)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not model_name.startswith("dmae_"):
            raise ValueError(f"pre-training needs a dmae_* model, got {model_name!r}")
        self.save_hyperparameters(ignore=["noise"])
        model = create_model(model_name, noise=noise, norm_pix_loss=norm_pix_loss, **(model_kwargs or {}))
        if not isinstance(model, DMAEViT):
            raise ValueError(f"pre-training needs a DMAE model, got {model_name!r}: a {type(model).__name__}")
        self.model: DMAEViT = model
        self.attach(model, noise, optimizer, compile)
        self.mask_ratio = mask_ratio

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None):
        """Loss, prediction and mask. The noise and the masking scores are drawn here, outside the network's
        (possibly compiled) forward, and passed in: a ``torch.Generator`` inside a compiled function breaks its
        graph. The same draws in the same order as ``self.model(imgs, mask_ratio, generator)``."""
        noisy, scores = self.model.draw_noise(imgs, generator)
        return self.model(imgs, mask_ratio=self.mask_ratio, noisy=noisy, scores=scores)

    def training_loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        imgs, _ = batch  # [B, 3, H, W] in [0,1]
        loss, _, _ = self(imgs, generator)
        return loss

    def validation_step(self, batch, batch_idx: int):
        imgs, _ = batch
        loss, _, _ = self(imgs, self.validation_generator(imgs.device, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
