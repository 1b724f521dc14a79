"""DMAE pre-training as a LightningModule (method.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch

from dmae_lightning.models import DMAEViT, create_model
from dmae_lightning.models.weights import LoadReport, load_weights
from dmae_lightning.noise import DEFAULT_NOISE, Noise, noise_from_config
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


class DMAEPretrainModule(pl.LightningModule):
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
        self.noise = noise = noise_from_config(noise)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not model_name.startswith("dmae_"):
            raise ValueError(f"pre-training needs a dmae_* model, got {model_name!r}")
        self.save_hyperparameters(ignore=["noise"])
        self.hparams["noise"] = noise.config()  # plain data: checkpoints load with weights_only=True
        model = create_model(model_name, noise=noise, norm_pix_loss=norm_pix_loss, **(model_kwargs or {}))
        if not isinstance(model, DMAEViT):
            raise ValueError(f"pre-training needs a DMAE model, got {model_name!r}: a {type(model).__name__}")
        self.model: DMAEViT = model
        compile_in_place(self.model, compile)
        self.mask_ratio = mask_ratio
        self.optimizer_cfg = dict(optimizer or {})
        check_optimizer_config(self.optimizer_cfg)

    def load_pretrained(self, path: str) -> LoadReport:
        """Continue from a DMAE/MAE pre-training file (official or ours), e.g. CIFAR-10 continued pre-training."""
        return load_weights(self.model, path)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None):
        return self.model(imgs, mask_ratio=self.mask_ratio, generator=generator)

    def training_step(self, batch, batch_idx: int):
        imgs, _ = batch  # [B, 3, H, W] in [0,1]
        generator = seeded_generator(
            self.hparams["seed"], TRAIN_STREAM, self.global_rank, self.global_step, batch_idx, device=imgs.device
        )
        loss, _, _ = self(imgs, generator)
        check_finite(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int):
        imgs, _ = batch
        # Same noise and masks every epoch (and on every rank count), so curves are comparable.
        generator = seeded_generator(self.hparams["seed"], VAL_STREAM, batch_idx, device=imgs.device)
        loss, _, _ = self(imgs, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizer(self, self.model, **self.optimizer_cfg)
