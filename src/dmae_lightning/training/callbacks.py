"""Callbacks: exact-resume RNG state and labelled reconstruction pictures for DMAE pre-training."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from dmae_lightning.models import DMAEViT
from dmae_lightning.models.layers import IMAGENET_MEAN, IMAGENET_STD
from dmae_lightning.rng import seeded_generator
from dmae_lightning.training.pretrain import DMAEPretrainModule


class RNGState(pl.Callback):
    """Saves and restores the global torch / numpy / python RNG states with every checkpoint.

    Lightning does not checkpoint them; without them a resumed run shuffles, drops paths and draws
    mixup lambdas differently from the uninterrupted run. Everything is stored as tensors, ints and
    tuples so the checkpoint still loads with ``weights_only=True``.

    A checkpoint written at an epoch's end is restored a second time if Lightning replays that end on
    resume (it does when the run is step-based, e.g. stopped by ``max_steps`` on an epoch's last batch):
    before the replay it builds a train loader iterator, which draws from the global torch RNG.
    """

    def __init__(self) -> None:
        self._epoch_ended = False  # whether a checkpoint written now follows the current epoch's end
        self._reapply: dict | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_ended = False
        self._reapply = None  # no replayed epoch end: the state put back at loading stands

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reapply is not None:  # the replayed end of the epoch the checkpoint was written after
            self.load_state_dict(self._reapply)
            self._reapply = None
        self._epoch_ended = True

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=True)
        if not isinstance(numpy_state, tuple):  # a dict only for a bit generator other than MT19937
            raise RuntimeError("RNGState: numpy's global RandomState is expected to be MT19937")
        kind, keys, pos, has_gauss, cached = numpy_state
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
            "epoch_ended": self._epoch_ended,
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch_ended"):
            self._reapply = {**state, "epoch_ended": False}
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def reconstruction_grid(model: DMAEViT, imgs: torch.Tensor, mask_ratio: float, seed: int) -> torch.Tensor:
    """One row per image: clean | noisy | masked noisy input | reconstruction | reconstruction with the
    visible (noisy) patches pasted back. All panels at the model's input size, in [0,1].

    With ``norm_pix_loss`` the prediction is in per-patch-normalised units; it is shown with the clean
    patch's mean and variance put back, as MAE's visualisations do.
    """
    generator = seeded_generator(seed, device=imgs.device)
    noisy = model.add_noise(imgs, generator)  # [K, 3, H, W]
    _, pred, mask = model.reconstruct(imgs, noisy, mask_ratio, generator)  # [K, L, p*p*3], [K, L]
    size = (model.img_size, model.img_size)
    clean_px = F.interpolate(imgs, size=size, mode="bicubic", align_corners=False)  # [K, 3, S, S]
    noisy_px = F.interpolate(noisy, size=size, mode="bicubic", align_corners=False)  # [K, 3, S, S]
    if model.norm_pix_loss:
        target = model.patchify(model.pixel_input(imgs))  # [K, L, p*p*3]
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    recon = model.unpatchify(pred) * std + mean  # [K, 3, S, S] in pixel space
    hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # [K, 3, S, S], 1 = masked
    masked_input = noisy_px * (1 - hidden) + 0.5 * hidden  # masked patches shown grey
    pasted = recon * hidden + noisy_px * (1 - hidden)
    panels = torch.stack([clean_px, noisy_px, masked_input, recon, pasted], dim=1)  # [K, 5, 3, S, S]
    return make_grid(panels.flatten(0, 1).clamp(0, 1), nrow=5, padding=PANEL_PAD, pad_value=1.0)  # [3, h, w]


PANEL_PAD = 2  # make_grid's padding around every panel
MIN_PANEL_PX = 128  # small models' 32x32 panels are upscaled (nearest neighbour) to at least this


def labelled_picture(grid: torch.Tensor, panel: int, headers: list[str], title: str) -> Image.Image:
    """The grid of ``reconstruction_grid`` (``[3, h, w]``, panels of ``panel`` px) upscaled by a whole factor
    (nearest neighbour: pixels stay exact, just bigger) under a white band with ``title`` and one header per
    column. torchvision's make_grid has no labels, hence PIL."""
    scale = max(1, math.ceil(MIN_PANEL_PX / panel))
    body = to_pil_image(
        grid.clamp(0, 1).mul(255).add(0.5).to(torch.uint8).cpu()
    )  # rounded, as save_image does
    body = body.resize((body.width * scale, body.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=14)
    line = 20
    picture = Image.new("RGB", (body.width, body.height + 2 * line + 4), "white")
    picture.paste(body, (0, 2 * line + 4))
    draw = ImageDraw.Draw(picture)
    draw.text((PANEL_PAD * scale, 2), title, fill="black", font=font)
    column = (panel + PANEL_PAD) * scale
    for i, header in enumerate(headers):
        centre = PANEL_PAD * scale + i * column + panel * scale // 2
        draw.text((centre, line + 2), header, fill="black", font=font, anchor="ma")
    return picture


class ReconstructionPictures(pl.Callback):
    """Every ``every_n_epochs`` validation epochs and at the end of training, saves a reconstruction
    grid of a fixed set of validation images (fixed noise and masks) as PNG and logs it."""

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, dirname: str = "pictures"
    ):
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(
                f"every_n_epochs and num_images must be >= 1, got {every_n_epochs}, {num_images}"
            )
        self.every_n_epochs, self.num_images, self.seed, self.dirname = (
            every_n_epochs,
            num_images,
            seed,
            dirname,
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = (
            trainer.current_epoch + 1
        )  # the epoch this validation ends, counted from 1 (not yet counted done)
        if not trainer.sanity_checking and epoch % self.every_n_epochs == 0:
            self.save(trainer, pl_module, epoch, f"reconstruction_epoch{epoch:04d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module, trainer.current_epoch, "reconstruction_final")  # now: the epochs done

    @torch.no_grad()
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, name: str) -> Path | None:
        """``<dirname>/<name>.png`` after ``epoch`` (counted from 1), titled with it."""
        if not trainer.is_global_zero:
            return None
        if not isinstance(pl_module, DMAEPretrainModule):
            raise TypeError(
                f"ReconstructionPictures draws a DMAEPretrainModule's reconstructions, got a "
                f"{type(pl_module).__name__}"
            )
        dataset = trainer.datamodule.dataset("val")  # type: ignore[attr-defined]  # Lightning sets Trainer.datamodule at run time; its class does not declare it
        imgs = torch.stack([dataset[i][0] for i in range(min(self.num_images, len(dataset)))])
        was_training = pl_module.training
        pl_module.eval()
        model, ratio = pl_module.model, pl_module.mask_ratio
        grid = reconstruction_grid(model, imgs.to(pl_module.device), ratio, self.seed)
        pl_module.train(was_training)
        sigma = model.noise.sigma
        picture = labelled_picture(
            grid,
            model.img_size,
            headers=[
                "clean",
                f"noisy (sigma {sigma:g})",
                f"masked ({ratio:.0%})",
                "reconstruction",
                "pasted",
            ],
            title=f"epoch {epoch}, step {trainer.global_step}: sigma {sigma:g}, mask ratio {ratio:g}",
        )
        path = Path(trainer.default_root_dir) / self.dirname / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="reconstruction", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstruction", pil_to_tensor(picture), trainer.global_step)
        return path
