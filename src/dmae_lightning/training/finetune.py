"""Fine-tuning the base classifier of the smoothed classifier (method.md section 2).

Two rules that the reference code breaks and we keep:
1. mixup/cutmix mixes the *clean* images and the noise is added afterwards, so every
   training input carries exactly the smoothing noise (mixing two noisy images would shrink it);
2. the ``m`` noisy copies of an image used by consistency regularisation share one mixing
   partner and one lambda (mix first, repeat second).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torchmetrics.classification import MulticlassAccuracy

from dmae_lightning.models import VisionTransformerClassifier, create_model
from dmae_lightning.noise import DEFAULT_NOISE, Noise, noise_from_config
from dmae_lightning.training.base import NoisyTrainingModule
from dmae_lightning.training.objectives import objective_from_config

log = logging.getLogger(__name__)
# A validation accuracy below 2 / num_classes at the end of fine-tuning: (near) chance level. The README's plain-RS
# digits command with the ImageNet recipe ended at 0.172 noisy accuracy (train loss 2.295 = about ln 10).
CHANCE_MARGIN = 2.0


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes  # [B, C]


class BaseClassifierModule(NoisyTrainingModule):
    """Noisy fine-tuning and linear probing; the loss is the ``objective``'s (:mod:`.objectives`: plain "RS"
    cross-entropy, or with consistency regularisation)."""

    def __init__(
        self,
        model_name: str = "vit_base_patch16",
        model_kwargs: dict | None = None,
        num_classes: int = 1000,
        noise: Noise | Mapping = DEFAULT_NOISE,
        objective: Mapping[str, Any] | None = None,
        mixup: dict | None = None,
        label_smoothing: float = 0.1,
        freeze_encoder: bool = False,
        optimizer: dict | None = None,
        seed: int = 0,
        compile: bool | dict = False,
    ):
        super().__init__()
        noise = noise_from_config(noise)
        if model_name.startswith("dmae_"):
            raise ValueError(
                f"fine-tuning needs a classifier model name, got the pre-training model {model_name!r}"
            )
        self.objective = objective_from_config(
            objective or {"name": "gaussian"}, noise
        )  # checks its settings
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["noise"])
        # as trained, the defaults filled in (e.g. the paper's eta at this sigma)
        self.hparams["objective"] = self.objective.settings()
        model = create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        if not isinstance(model, VisionTransformerClassifier):
            raise ValueError(
                f"fine-tuning needs a classifier model, got {model_name!r}: a {type(model).__name__}"
            )
        self.model: VisionTransformerClassifier = model
        if freeze_encoder:  # linear probing: only the head (and its BatchNorm statistics) learn
            for name, param in self.model.named_parameters():
                param.requires_grad = name.startswith("head.")
        self.attach(model, noise, optimizer, compile)
        mixup = dict(mixup or {})
        self.mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        if mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0:
            if not self.objective.allows_mixup:
                raise ValueError(
                    f"objective {self.objective.name} needs hard labels: switch mixup off (task.module.mixup=null)"
                )
            self.mix = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes)
        else:
            self.mix = lambda imgs, labels: (imgs, smoothed_one_hot(labels, num_classes, label_smoothing))
        self.val_acc_clean = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_noisy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.model(imgs)

    def training_loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        imgs, labels = batch  # [B, 3, H, W] in [0,1], [B]
        imgs, targets = self.mix(
            imgs, labels
        )  # mixed clean images, soft targets [B, C]: the noise comes after
        objective = self.objective.at_epoch(self.current_epoch)  # warm-ups (smoothadv, smoothmix)
        loss, terms = objective.loss(self.model, imgs, targets, self.noise, generator)
        for name, value in terms.items():
            self.log_train(name, value, labels.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int):
        imgs, labels = batch
        generator = self.validation_generator(imgs.device, batch_idx)
        self.val_acc_clean(self(imgs), labels)
        self.val_acc_noisy(self(self.noise.perturb(imgs, generator)), labels)
        self.log("val/acc_clean", self.val_acc_clean, prog_bar=True)
        self.log("val/acc_noisy", self.val_acc_noisy, prog_bar=True)

    def on_train_end(self) -> None:
        """One warning line when the last validation found the classifier at chance level (a run too short, a
        learning rate too small): certification of it would certify nothing."""
        acc = self.trainer.callback_metrics.get("val/acc_noisy")
        chance = 1.0 / self.hparams["num_classes"]
        if acc is not None and float(acc) < CHANCE_MARGIN * chance and self.trainer.is_global_zero:
            log.warning(
                "fine-tuning ended at chance level: noisy validation accuracy %.4f, clean %.4f (chance %.4f "
                "for %d classes); train longer (trainer.max_epochs) or check the learning rate",
                float(acc),
                float(self.trainer.callback_metrics["val/acc_clean"]),
                chance,
                self.hparams["num_classes"],
            )
