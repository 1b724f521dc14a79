"""``compile=true``: compiled training steps give the eager losses and weights, and checkpoints stay free of
torch.compile's ``_orig_mod.`` prefix, so they load into uncompiled models and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import CONF
from hydra.utils import instantiate

from dmae_lightning.jobs.compose import compose
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import load_weights
from dmae_lightning.training.finetune import BaseClassifierModule
from dmae_lightning.training.pretrain import DMAEPretrainModule

pytestmark = pytest.mark.usefixtures("single_thread")
OPT = dict(name="adamw", base_lr=1e-3, weight_decay=0.05, warmup_epochs=1, min_lr=0.0)


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _fit(make_trainer, make_digits, module, root: Path, steps: int = 3):
    log = LossLog()
    trainer = make_trainer([log], root=root, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, make_digits(batch_size=8, subset_first=32))
    trainer.save_checkpoint(root / "last.ckpt", weights_only=True)
    return log.losses, root / "last.ckpt"


def _compare(make_trainer, make_digits, tmp_path, build):
    """Eager vs compiled run from the same initial weights and seed; returns both checkpoints' state dicts."""
    runs = {}
    for compiled in (False, True):
        pl.seed_everything(0)
        module = build(compiled)
        assert (module.model._compiled_call_impl is not None) == compiled
        losses, path = _fit(make_trainer, make_digits, module, tmp_path / str(compiled))
        runs[compiled] = losses, torch.load(path, weights_only=True)["state_dict"]
    (eager_losses, eager_state), (compiled_losses, compiled_state) = runs[False], runs[True]
    print(f"eager losses {eager_losses}\ncompiled losses {compiled_losses}")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_state.keys() == eager_state.keys()
    assert not [k for k in compiled_state if "_orig_mod" in k]
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-3, atol=1e-5, msg=name)
    return tmp_path / "True" / "last.ckpt", tmp_path / "False" / "last.ckpt"


@pytest.mark.slow  # inductor compiles forward and backward: ~1 min on 2 shared cores
def test_compiled_pretraining_steps_match_eager_and_checkpoints_load_both_ways(
    make_trainer, make_digits, tmp_path
):
    def build(compiled):
        return DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=dict(OPT), compile=compiled)

    compiled_ckpt, eager_ckpt = _compare(make_trainer, make_digits, tmp_path, build)
    # Compiled checkpoint -> plain model, and eager checkpoint -> a compiled module's model.
    plain = create_model("dmae_vit_micro_patch4")
    assert load_weights(plain, compiled_ckpt).layout == "lightning"
    saved = torch.load(compiled_ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(
        plain.state_dict()["blocks.0.attn.qkv.weight"], saved["model.blocks.0.attn.qkv.weight"]
    )
    compiled = build(True)
    compiled.load_state_dict(torch.load(eager_ckpt, weights_only=True)["state_dict"])


def test_compiled_finetuning_steps_match_eager(make_trainer, make_digits, tmp_path):
    """Through dynamo and AOTAutograd (backend aot_eager, which skips inductor's slow C++ build): the
    mix-then-noise step with consistency regularisation traces to the eager numbers."""

    def build(compiled):
        return BaseClassifierModule(
            "vit_micro_patch4",
            num_classes=10,
            objective=dict(name="consistency", copies=2, lbd=2.0, eta=0.5),
            optimizer=dict(OPT),
            compile={"backend": "aot_eager"} if compiled else False,
        )

    _compare(make_trainer, make_digits, tmp_path, build)


def test_compile_config_key_reaches_every_training_module(tmp_path):
    for task in ("pretrain", "finetune", "linprobe"):
        cfg = compose(CONF, "train", [f"task={task}", "compile=true"], output_dir=tmp_path)
        module = instantiate(cfg.task.module, _convert_="all")
        assert module.model._compiled_call_impl is not None, task
        assert compose(CONF, "train", [f"task={task}"], output_dir=tmp_path).task.module.compile is False


def test_bad_compile_value_is_one_clear_error():
    with pytest.raises(ValueError, match="compile must be true, false or a dict of torch.compile options"):
        DMAEPretrainModule("dmae_vit_micro_patch4", compile="yes")
