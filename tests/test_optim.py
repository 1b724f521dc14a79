"""Optimiser set-up: effective batch and lr rule (devices, nodes, accumulation), warm-up + half-cosine
schedule, weight-decay groups, layer-wise lr decay and LARS, against closed forms and hand-made lists."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from timm.optim import Lars
from torch import nn

from dmae_lightning.models import create_model
from dmae_lightning.training.finetune import BaseClassifierModule
from dmae_lightning.training.optim import (
    configure_optimizer,
    effective_batch_size,
    parameter_groups,
    scaled_lr,
    warmup_cosine_factor,
)
from dmae_lightning.training.pretrain import DMAEPretrainModule

pytestmark = pytest.mark.usefixtures("single_thread")
OPT = dict(name="adamw", base_lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=1, min_lr=0.0)


def micro_module() -> DMAEPretrainModule:
    return DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=dict(OPT))


# --------------------------------------------------------------------------------------------------
# Effective batch and learning-rate schedule
# --------------------------------------------------------------------------------------------------
def _closed_form_lr(peak, step, warmup, total, min_lr):
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize(
    "batch, devices, nodes, accumulate, eff",
    [(64, 1, 1, 1, 64), (64, 8, 1, 1, 512), (64, 8, 8, 1, 4096), (128, 8, 2, 2, 4096), (256, 1, 1, 4, 1024)],
)
def test_effective_batch_and_scaled_lr(batch, devices, nodes, accumulate, eff):
    assert effective_batch_size(batch, devices, nodes, accumulate) == eff
    assert scaled_lr(1.5e-4, eff) == pytest.approx(1.5e-4 * eff / 256, rel=1e-15)
    # The paper's numbers: ImageNet pre-training 1.5e-4 x 4096 / 256 = 2.4e-3, fine-tuning 5e-4 x 1024 / 256.
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3) and scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_warmup_cosine_factor_closed_form():
    warmup, total, min_ratio = 40, 1100, 0.01
    values = {
        0: 0.0,
        10: 0.25,
        20: 0.5,
        39: 39 / 40,
        40: 1.0,
        570: min_ratio + (1 - min_ratio) / 2,
        1100: min_ratio,
        2000: min_ratio,
    }
    for step, expected in values.items():
        assert warmup_cosine_factor(step, warmup, total, min_ratio) == pytest.approx(expected, abs=1e-12), (
            step
        )
    # Quarter of the cosine: 0.5 (1 + cos(pi / 4)).
    assert warmup_cosine_factor(305, warmup, total, 0.0) == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-12)
    # Monotone: up during warm-up, down after.
    f = [warmup_cosine_factor(s, warmup, total, min_ratio) for s in range(total + 1)]
    assert all(a < b for a, b in zip(f[:warmup], f[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :]))


def test_lr_rule_and_schedule_with_a_real_trainer(make_digits, make_trainer, caplog):
    """batch 16 x 1 device x 1 node x accumulation 2 = 32 per step; 128 images = 8 batches = 4 steps/epoch."""
    pl.seed_everything(0)
    opt = dict(OPT, base_lr=2e-3, warmup_epochs=1, min_lr=1e-5)
    module = DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=opt)
    seen = []

    class LrAtStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.global_step, [g["lr"] for g in optimizer.param_groups]))

    trainer = make_trainer([LrAtStep()], max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0)
    with caplog.at_level("INFO", logger="dmae_lightning.training.optim"):
        trainer.fit(module, make_digits(batch_size=16, subset_first=128))
    peak = 2e-3 * 16 * 1 * 1 * 2 / 256
    assert f"lr {peak:.3e} (base 0.002 x effective batch 32 / 256), 4 warm-up of 12 steps" in caplog.messages
    assert [step for step, _ in seen] == list(range(12))
    for step, lrs in seen:
        expected = _closed_form_lr(peak, step, warmup=4, total=12, min_lr=1e-5)
        assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12, abs=1e-15), step
    assert [g["initial_lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx(
        [peak, peak], rel=1e-15
    )


@pytest.mark.parametrize(
    "trainer_kwargs, warmup, total",
    [
        (dict(max_steps=6), 4, 6),  # max_epochs unset (-1): warm-up still counts epochs of 4 steps
        (dict(max_steps=6, max_epochs=10), 4, 6),  # max_steps shortens the run, not the epoch
        (dict(max_epochs=3), 4, 12),
        (dict(max_epochs=1), 4, 4),  # the lr never passes the warm-up: one warning line (issue 17.4.4)
        (dict(max_steps=3), 4, 3),
    ],
)
def test_warmup_epochs_count_loader_steps(make_digits, make_trainer, caplog, trainer_kwargs, warmup, total):
    module = micro_module()
    trainer = make_trainer(limit_val_batches=0, **trainer_kwargs)
    with caplog.at_level(logging.WARNING, logger="dmae_lightning"):
        trainer.fit(module, make_digits(batch_size=16, subset_first=64))
    warned = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert warned == (
        [
            f"the warm-up ({warmup} steps, warmup_epochs=1) is not shorter than the run ({total} steps): "
            "the lr never reaches its peak; raise trainer.max_epochs or lower "
            "task.module.optimizer.warmup_epochs"
        ]
        if warmup >= total
        else []
    )
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    for step in range(total + (warmup < total)):  # the closed form past the end needs a cosine part
        assert factor(step) == pytest.approx(_closed_form_lr(1.0, step, warmup, total, 0.0), abs=1e-12)


def _stub_trainer(batch, devices, nodes, accumulate, batches_per_epoch=100, epochs=10):
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=batch),
        num_devices=devices,
        num_nodes=nodes,
        accumulate_grad_batches=accumulate,
        num_training_batches=batches_per_epoch,
        train_dataloader=object(),
        max_epochs=epochs,
        estimated_stepping_batches=math.ceil(batches_per_epoch / accumulate) * epochs,
        is_global_zero=True,
        progress_bar_callback=None,
    )


@pytest.mark.parametrize(
    "devices, nodes, accumulate", [(1, 1, 1), (8, 1, 1), (4, 2, 1), (8, 4, 2), (2, 3, 4)]
)
def test_lr_scales_with_devices_nodes_and_accumulation(devices, nodes, accumulate, caplog):
    batch, base_lr = 64, 1.5e-4
    eff = batch * devices * nodes * accumulate
    assert effective_batch_size(batch, devices, nodes, accumulate) == eff
    assert scaled_lr(base_lr, eff) == pytest.approx(base_lr * eff / 256, rel=1e-15)
    module = micro_module()
    module.trainer = _stub_trainer(batch, devices, nodes, accumulate)  # what configure_optimizer reads
    opt = dict(OPT, base_lr=base_lr, warmup_epochs=2, min_lr=1e-6)
    with caplog.at_level("INFO", logger="dmae_lightning.training.optim"):
        config = configure_optimizer(module, module.model, **opt)
    peak = base_lr * eff / 256
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.95)
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([peak] * 2, rel=1e-15)
    steps_per_epoch = math.ceil(100 / accumulate)
    warmup, total = 2 * steps_per_epoch, 10 * steps_per_epoch
    assert (
        f"lr {peak:.3e} (base 0.00015 x effective batch {eff} / 256), {warmup} warm-up of {total} steps"
        in caplog.messages
    )
    for step in (0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total):
        expected = _closed_form_lr(peak, step, warmup, total, 1e-6)
        assert scheduler.lr_lambdas[0](step) * peak == pytest.approx(expected, rel=1e-12, abs=1e-18), step
    assert warmup_cosine_factor(total + 50, warmup, total, 0.25) == pytest.approx(0.25)  # stays at min


# --------------------------------------------------------------------------------------------------
# Weight-decay groups
# --------------------------------------------------------------------------------------------------
NO_DECAY_TOKENS = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}


def _expected_decay(model: nn.Module) -> tuple[set[str], set[str]]:
    """By module type, independently of timm: LayerNorm parameters, biases and tokens get no decay."""
    decay, no_decay = set(), set()
    for mod_name, mod in model.named_modules():
        for p_name, param in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if not param.requires_grad:
                continue
            if isinstance(mod, nn.LayerNorm) or p_name == "bias" or name in NO_DECAY_TOKENS:
                no_decay.add(name)
            else:
                decay.add(name)
    return decay, no_decay


@pytest.mark.parametrize("model_name", ["dmae_vit_micro_patch4", "vit_micro_patch4"])
def test_weight_decay_groups(model_name):
    model = create_model(model_name)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, 0.05, layer_decay=None)
    got = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    decay, no_decay = _expected_decay(model)
    assert got == {0.0: no_decay, 0.05: decay}
    assert all(g["lr_scale"] == 1.0 for g in groups)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if model_name.startswith("dmae_"):
        # Fixed sin-cos position embeddings are not optimised at all.
        assert frozen == {"pos_embed", "decoder_pos_embed"}
        assert {
            "cls_token",
            "mask_token",
            "norm.weight",
            "decoder_norm.bias",
            "decoder_pred.bias",
        } <= no_decay
        assert {"patch_embed.proj.weight", "decoder_embed.weight", "decoder_pred.weight"} <= decay
    else:
        assert frozen == set() and {"pos_embed", "cls_token", "fc_norm.weight", "head.bias"} <= no_decay
        assert "head.weight" in decay
    assert not frozen & (decay | no_decay)
    assert {n for n in decay if n.endswith(".bias") or "norm" in n} == set()


# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay, LARS
# --------------------------------------------------------------------------------------------------
def _expected_layer(name: str, depth: int) -> int:
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name.startswith(("fc_norm.", "norm.", "head.")), name
    return depth + 1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_scales(pool):
    decay, depth = 0.75, 2
    model = create_model("vit_micro_patch4", num_classes=10, global_pool=pool, head_batchnorm=pool == "token")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, 0.05, layer_decay=decay)
    seen = set()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            expected = decay ** (depth + 1 - _expected_layer(name, depth))
            assert group["lr_scale"] == pytest.approx(expected, rel=1e-12), name
            no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())
    head_scales = {
        g["lr_scale"] for g in groups if any(names[id(p)].startswith("head.") for p in g["params"])
    }
    assert head_scales == {1.0}
    # Through configure_optimizer: each group's lr is the peak lr times its scale.
    module = BaseClassifierModule("vit_micro_patch4", num_classes=10, model_kwargs=dict(global_pool=pool))
    module.trainer = _stub_trainer(128, 2, 1, 1)  # effective batch 256
    optimizer = configure_optimizer(
        module, module.model, base_lr=5e-4, weight_decay=0.05, warmup_epochs=1, layer_decay=decay
    )["optimizer"]
    names = {id(p): n for n, p in module.model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = _expected_layer(names[id(p)], depth)
            assert group["initial_lr"] == pytest.approx(
                5e-4 * 256 / 256 * decay ** (depth + 1 - layer), rel=1e-12
            )


def test_lars_adapts_weight_matrices_only_and_unknown_names_fail():
    """MAE's LARS: the trust ratio on every >1-d parameter (also with weight decay 0), never on 1-d ones."""
    module = BaseClassifierModule(
        "vit_micro_patch4",
        num_classes=10,
        freeze_encoder=True,
        model_kwargs=dict(global_pool="token", head_batchnorm=True),
    )
    module.trainer = _stub_trainer(64, 1, 1, 1)
    config = configure_optimizer(
        module, module.model, name="lars", base_lr=0.1, weight_decay=0.0, warmup_epochs=0, momentum=0.9
    )
    optimizer = config["optimizer"]
    assert isinstance(optimizer, Lars)
    names = {id(p): n for n, p in module.model.named_parameters()}
    adapt = {names[id(p)]: g["always_adapt"] for g in optimizer.param_groups for p in g["params"]}
    assert adapt == {"head.weight": True, "head.bias": False}
    assert all(
        g["momentum"] == 0.9 and g["weight_decay"] == 0.0 and g["trust_coeff"] == 1e-3
        for g in optimizer.param_groups
    )
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * 64 / 256] * 2)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        configure_optimizer(module, module.model, name="sgd", base_lr=0.1, weight_decay=0.0, warmup_epochs=0)


@pytest.mark.parametrize("epochs, warned", [(1, True), (2, True), (3, False)])
def test_a_warmup_as_long_as_the_run_is_one_warning(epochs, warned, caplog):
    """warmup_epochs=2 of 19 steps each: 38 warm-up steps against 19 x epochs in all (the quickstart with
    trainer.max_epochs=1 printed "38 warm-up of 19 steps" and nothing else)."""
    module = micro_module()
    module.trainer = _stub_trainer(64, 1, 1, 1, batches_per_epoch=19, epochs=epochs)
    with caplog.at_level(logging.WARNING, logger="dmae_lightning"):
        configure_optimizer(module, module.model, **dict(OPT, warmup_epochs=2))
    expected = [
        f"the warm-up (38 steps, warmup_epochs=2) is not shorter than the run ({19 * epochs} steps): the lr "
        "never reaches its peak; raise trainer.max_epochs or lower task.module.optimizer.warmup_epochs"
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == (
        expected if warned else []
    )
