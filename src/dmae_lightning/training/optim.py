"""Optimiser set-up shared by pre-training and fine-tuning: parameter groups, lr scaling, schedule."""

from __future__ import annotations

import inspect
import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay

from dmae_lightning.models import DMAEViT, VisionTransformerClassifier

log = logging.getLogger(__name__)


def effective_batch_size(batch_size: int, devices: int, num_nodes: int, accumulate_grad_batches: int) -> int:
    """Images per optimiser step, over all ranks and accumulated micro-batches."""
    return batch_size * devices * num_nodes * accumulate_grad_batches


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The MAE/DMAE rule: lr = base lr x effective batch / 256."""
    return base_lr * effective_batch / 256


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Per-step multiplier of the peak lr: linear warm-up, then half-cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(
    model: DMAEViT | VisionTransformerClassifier, weight_decay: float, layer_decay: float | None
) -> list[dict]:
    """timm's groups: no weight decay on biases, norms and tokens; optional layer-wise lr decay
    (each group carries ``lr_scale``)."""
    skip = model.no_weight_decay()
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
        for group in groups:
            group["lr_scale"] = 1.0
        return groups
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


OPTIMIZERS = ("adamw", "lars")


def adamw_implementation(device: torch.device | str, amp_clips_gradients: bool = False) -> dict[str, bool]:
    """AdamW's implementation keyword for parameters on ``device``: ``fused`` on CUDA (one kernel launch for all
    parameters per step, no host synchronisation), ``foreach`` elsewhere (a few multi-tensor kernels instead of a
    Python loop over the parameters); the same updates within float rounding. ``amp_clips_gradients``: Lightning's
    mixed precision clips gradients, which it refuses with a fused optimizer (that unscales inside its step), so
    foreach then."""
    if torch.device(device).type == "cuda" and not amp_clips_gradients:
        return {"fused": True}
    return {"foreach": True}


def trainer_adamw_implementation(trainer: pl.Trainer, device: torch.device) -> dict[str, bool]:
    """:func:`adamw_implementation` for parameters on ``device`` (Lightning moves the model to its device before
    ``configure_optimizers``) under the trainer's precision and gradient clipping."""
    amp = isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision)
    return adamw_implementation(device, amp and bool(getattr(trainer, "gradient_clip_val", None)))


def check_optimizer_config(config: dict) -> None:
    """ValueError (one line) unless ``config`` (a module's ``optimizer`` hyper-parameters) is a valid set of
    keyword arguments of :func:`configure_optimizer`: checked when the module is built, not at the first step."""
    if config.get("name", "adamw") not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config['name']!r}: use {' or '.join(map(repr, OPTIMIZERS))}")
    accepted = list(inspect.signature(configure_optimizer).parameters)[2:]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(
            f"task.module.optimizer has no key {unknown[0]!r}: the keys are {', '.join(accepted)}"
        )
    for key in ("base_lr", "weight_decay", "warmup_epochs", "min_lr", "momentum"):
        value = config.get(key, 0.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"task.module.optimizer.{key} must be a finite number >= 0, got {value!r}")


def configure_optimizer(
    module: pl.LightningModule,
    model: DMAEViT | VisionTransformerClassifier,
    *,
    name: str = "adamw",
    base_lr: float,
    weight_decay: float,
    warmup_epochs: float,
    min_lr: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    layer_decay: float | None = None,
) -> dict:
    """AdamW (fused on CUDA, foreach elsewhere: :func:`adamw_implementation`) or LARS (linear probing) with the
    scaled lr and a per-step warm-up + cosine schedule.

    Reads batch size, devices, nodes, accumulation and the number of steps from the attached Trainer.
    """
    trainer = module.trainer
    batch = trainer.datamodule.batch_size  # type: ignore[attr-defined]  # Lightning sets Trainer.datamodule at run time; its class does not declare it
    eff = effective_batch_size(batch, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches)
    peak = scaled_lr(base_lr, eff)
    groups = parameter_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = peak * group["lr_scale"]
    optimizer: torch.optim.Optimizer
    if name == "adamw":
        beta1, beta2 = betas  # a list when it comes from a config
        device = next(param.device for group in groups for param in group["params"])
        implementation = trainer_adamw_implementation(trainer, device)
        optimizer = torch.optim.AdamW(groups, lr=peak, betas=(beta1, beta2), **implementation)
    elif name == "lars":
        # As MAE's linear probing: trust coefficient 1e-3 on every weight matrix, none on 1-d params.
        # timm's Lars adapts only groups with weight_decay != 0 unless always_adapt, and with weight
        # decay 0 timm's grouping puts all parameters in one group: split by dimension here.
        lars_groups = []
        for group in groups:
            for adapt in (True, False):
                params = [p for p in group["params"] if (p.ndim > 1) == adapt]
                if params:
                    lars_groups.append({**group, "params": params, "always_adapt": adapt})
        optimizer = Lars(lars_groups, lr=peak, momentum=momentum)
    else:
        raise ValueError(f"unknown optimizer {name!r}: use {' or '.join(map(repr, OPTIMIZERS))}")
    total = max(1, int(trainer.estimated_stepping_batches))
    # Epochs -> steps from the loader length, not total / max_epochs: a max_steps limit shortens total,
    # and with max_steps alone max_epochs is -1 (estimated_stepping_batches then loads no data itself).
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    steps_per_epoch: float
    if math.isfinite(batches):
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    else:  # an iterable data set of unknown length
        if trainer.max_epochs is None:  # Lightning's fit loop sets it (-1 when max_steps alone ends the run)
            raise ValueError("configure_optimizer: the Trainer has no max_epochs to spread the steps over")
        steps_per_epoch = total / max(1, trainer.max_epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    min_ratio = min_lr / peak if peak > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup, total, min_ratio)
    )
    if trainer.is_global_zero:  # a log line like every other (module.print bypasses the log format)
        log.info(
            "lr %.3e (base %g x effective batch %d / 256), %d warm-up of %d steps",
            peak,
            base_lr,
            eff,
            warmup,
            total,
        )
    if warmup >= total and trainer.is_global_zero:
        log.warning(
            "the warm-up (%d steps, warmup_epochs=%g) is not shorter than the run (%d steps): the lr never "
            "reaches its peak; raise trainer.max_epochs or lower task.module.optimizer.warmup_epochs",
            warmup,
            warmup_epochs,
            total,
        )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
