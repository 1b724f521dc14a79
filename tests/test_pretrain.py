"""DMAE pre-training end to end: loss, exact resume, checkpoints, reconstruction pictures, the non-finite
loss guard and per-rank seeding. Numbers are compared with independent computations (the lr rule and the
parameter groups are in test_optim.py)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar
from helpers import CONF
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.train import train
from dmae_lightning.rng import TRAIN_STREAM, seeded_generator
from dmae_lightning.training import base as base_mod
from dmae_lightning.training.callbacks import RNGState
from dmae_lightning.training.pretrain import DMAEPretrainModule

pytestmark = pytest.mark.usefixtures("single_thread")
OPT = dict(name="adamw", base_lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=1, min_lr=0.0)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def micro_module(seed: int = 0, **kwargs) -> DMAEPretrainModule:
    return DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=dict(OPT), seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------------
# One short end-to-end run through train(cfg) with the real config tree, shared by three tests.
# --------------------------------------------------------------------------------------------------
PICTURE_IMAGES, PICTURE_SIZE = 4, 48  # native 32x32 digits resized to 48 inside the model


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("pretrain_run")
    overrides = [
        "task=pretrain",
        "model=vit_micro_patch8",
        f"model.img_size={PICTURE_SIZE}",
        "data.batch_size=32",
        "data.subset_first=256",  # 8 steps per epoch
        "trainer.max_epochs=4",
        "trainer.log_every_n_steps=1",
        "task.module.optimizer.base_lr=1e-2",
        "task.module.optimizer.warmup_epochs=1",
        f"callbacks.reconstruction_pictures.num_images={PICTURE_IMAGES}",
        "logger=csv",
    ]
    cfg = compose(CONF, "train", overrides, output_dir=out)
    metrics = train(cfg)
    return SimpleNamespace(out=out, cfg=cfg, metrics=metrics)


def test_pretraining_lowers_the_loss(pretrain_run):
    rows = list(csv.DictReader(open(pretrain_run.out / "csv" / "metrics.csv")))
    steps = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r.get("train/loss_step")]
    losses = [loss for _, loss in sorted(steps)]
    assert len(losses) == 32
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(
        f"train/loss first 5 {np.round(losses[:5], 3)} mean {first:.4f}; last 5 {np.round(losses[-5:], 3)} "
        f"mean {last:.4f}; ratio {last / first:.3f}"
    )
    assert np.isfinite(losses).all()
    assert last < 0.8 * first
    assert pretrain_run.metrics["val/loss"] < 0.8 * first


def _assert_plain(value, where="hyper_parameters"):
    """Only dicts with str keys, lists, tuples, str, int, float, bool and None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r} is {type(key)}"
            _assert_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _assert_plain(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{where} is {type(value)}: {value!r}"


def test_checkpoint_is_plain_data_and_loads_weights_only(pretrain_run):
    ckpt = torch.load(pretrain_run.out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    _assert_plain(hparams)
    assert hparams["model_name"] == "dmae_vit_micro_patch8"
    assert hparams["model_kwargs"] == {"img_size": PICTURE_SIZE}
    assert hparams["optimizer"]["base_lr"] == 1e-2 and hparams["optimizer"]["betas"] == [0.9, 0.95]
    assert (hparams["noise"]["sigma"], hparams["mask_ratio"], hparams["norm_pix_loss"]) == (0.25, 0.75, True)
    assert ckpt["global_step"] == 32
    # The module rebuilds from the checkpoint alone (hyper-parameters + weights).
    module = DMAEPretrainModule(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    # The RNG states travel too, as tensors and plain tuples.
    rng = [v for k, v in ckpt["callbacks"].items() if k.startswith("RNGState")]
    assert len(rng) == 1 and isinstance(rng[0]["torch"], torch.Tensor)


def test_reconstruction_picture_size_and_clean_panel(pretrain_run):
    pictures = pretrain_run.out / "pictures"
    names = sorted(p.name for p in pictures.iterdir())
    assert names == [f"reconstruction_epoch{e:04d}.png" for e in range(1, 5)] + ["reconstruction_final.png"]
    picture = (
        np.asarray(Image.open(pictures / "reconstruction_final.png").convert("RGB")).astype(np.float64) / 255
    )
    s, k = PICTURE_SIZE, PICTURE_IMAGES
    # make_grid(nrow=5, padding=2), upscaled 3x (48 px panels -> 144 px >= 128) under a band of labels.
    scale, grid_h, grid_w = 3, k * (s + 2) + 2, 5 * (s + 2) + 2
    band = picture.shape[0] - scale * grid_h
    assert picture.shape[1:] == (scale * grid_w, 3) and 30 <= band <= 60, picture.shape
    img = picture[band:][::scale, ::scale]  # the grid itself: nearest-neighbour upscaling repeats each pixel
    assert (picture[band:] == img.repeat(scale, axis=0).repeat(scale, axis=1)).all()
    # Labels: the title and a header over each of the 5 columns (dark text pixels on white).
    for col in range(5):
        x = scale * (2 + col * (s + 2))
        assert picture[band // 2 : band, x : x + scale * s].min() < 0.5, f"no header over column {col}"
    assert picture[: band // 2].min() < 0.5, "no title"
    # Independent recomputation of the first two panels of each row: the clean image, bicubic-resized
    # to the model size, and the noisy one (noise from the callback's seed, added at native size).
    from dmae_lightning.data import DigitsDataModule

    val = DigitsDataModule(batch_size=1, subset_first=256).dataset("val")
    clean = torch.stack([val[i][0] for i in range(k)]).double()  # [K, 3, 32, 32]
    noise = torch.randn(clean.shape, generator=seeded_generator(pretrain_run.cfg.seed)).double()
    expected = {
        0: F.interpolate(clean, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1),
        1: F.interpolate(clean + 0.25 * noise, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1),
    }
    for row in range(k):
        for col, panels in expected.items():
            y, x = 2 + row * (s + 2), 2 + col * (s + 2)
            got = img[y : y + s, x : x + s].transpose(2, 0, 1)  # [3, S, S]
            err = np.abs(got - panels[row].numpy()).max()
            assert err <= 0.5 / 255 + 1e-4, f"row {row} panel {col}: max error {err * 255:.2f}/255"
    # The padding between panels is white (pad_value=1).
    assert (img[:2] == 1).all() and (img[:, :2] == 1).all()


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------
class Preempt(pl.Callback):
    """Kills the run (an exception, like a preemption) when global_step reaches ``at``, before that step."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError(f"preempted at step {self.at}")


class BatchLog(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.global_step, batch_idx, batch[0].double().sum().item()))


def _snapshot(trainer, module):
    optimizer = trainer.optimizers[0]
    return SimpleNamespace(
        step=trainer.global_step,
        lr=[g["lr"] for g in optimizer.param_groups],
        scheduler=trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        opt_state=optimizer.state_dict()["state"],
        weights={k: v.clone() for k, v in module.state_dict().items()},
    )


def _equal_states(a, b) -> list[str]:
    """Names of everything that differs (exact comparison)."""
    diffs = []
    if a.step != b.step:
        diffs.append(f"global_step {a.step} != {b.step}")
    if a.lr != b.lr:
        diffs.append(f"lr {a.lr} != {b.lr}")
    if a.scheduler["last_epoch"] != b.scheduler["last_epoch"]:
        diffs.append("scheduler last_epoch")
    assert a.opt_state.keys() == b.opt_state.keys()
    for i in a.opt_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if not torch.equal(a.opt_state[i][key], b.opt_state[i][key]):
                diffs.append(f"optimizer state {i}.{key}")
    for name in a.weights:
        if not torch.equal(a.weights[name], b.weights[name]):
            diffs.append(f"weight {name}")
    return diffs


def _resume_experiment(make_digits, make_trainer, tmp_path, k: int, how: str, rng_callback: bool = True):
    """Uninterrupted 2k-step run vs. a run stopped at step k and resumed from last.ckpt to 2k by a fresh
    set-up (another global seed before building the module and data, so only the checkpoint carries state).

    64 images / batch 16 = 4 steps per epoch; the warm-up is 1 epoch (4 steps), then the half-cosine.
    ``how``: "max_steps" stops the first run with max_steps=k (last.ckpt at its end) and runs the others
    with max_steps=2k; "preempt" gives every run max_epochs=2k/4 and kills the first one with an
    exception before step k, resuming from the last.ckpt of the step before (saved every step).
    """
    limits = dict(max_steps=2 * k) if how == "max_steps" else dict(max_epochs=2 * k // 4)

    def setup(global_seed):
        pl.seed_everything(global_seed)
        # augment="shift": random crops draw from the global torch RNG, as shuffling does.
        return micro_module(seed=0), make_digits(batch_size=16, subset_first=64, augment="shift")

    module, dm = setup(0)
    full_log = BatchLog()
    trainer = make_trainer([RNGState(), full_log], root=tmp_path / "full", **limits)
    trainer.fit(module, dm)
    full = _snapshot(trainer, module)

    module, dm = setup(0)
    if how == "max_steps":
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        make_trainer([RNGState(), ckpt], root=tmp_path / "first", max_steps=k).fit(module, dm)
    else:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
        trainer = make_trainer([RNGState(), ckpt, Preempt(k)], root=tmp_path / "first", **limits)
        with pytest.raises(RuntimeError, match=f"preempted at step {k}"):
            trainer.fit(module, dm)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == k

    module, dm = setup(1)
    resumed_log = BatchLog()
    callbacks = [RNGState(), resumed_log] if rng_callback else [resumed_log]
    trainer = make_trainer(callbacks, root=tmp_path / "resumed", **limits)
    trainer.fit(module, dm, ckpt_path=str(last), weights_only=True)
    resumed = _snapshot(trainer, module)
    return full, resumed, full_log.batches, resumed_log.batches


@pytest.mark.parametrize("how", ["max_steps", "preempt"])
def test_exact_resume_at_epoch_boundary(make_digits, make_trainer, tmp_path, how):
    """k = 4 = one epoch. With max_steps the lr schedule's length follows max_steps (k for the first run,
    2k after): the first k steps are all warm-up, which does not depend on the length, so the runs agree."""
    full, resumed, full_batches, resumed_batches = _resume_experiment(
        make_digits, make_trainer, tmp_path, 4, how
    )
    assert full.step == resumed.step == 8
    assert resumed_batches == full_batches[4:]  # same images (shuffle and random crops) in the same order
    assert _equal_states(full, resumed) == []
    assert all(lr == 0.0 for lr in full.lr)  # min_lr 0 reached at the end of the half-cosine


def test_resume_without_rng_state_is_not_exact(make_digits, make_trainer, tmp_path):
    """Control: the same resume without the RNGState callback shuffles and crops differently."""
    full, resumed, full_batches, resumed_batches = _resume_experiment(
        make_digits, make_trainer, tmp_path, 4, "max_steps", rng_callback=False
    )
    assert full.step == resumed.step and full.lr == resumed.lr  # the schedule itself is restored
    assert resumed_batches != full_batches[4:]
    assert any(d.startswith("weight") for d in _equal_states(full, resumed))


def test_resume_with_the_default_callbacks_through_train_cfg(tmp_path):
    """The job as a user runs it: 1 epoch, then max_epochs=2 resumed from that run's last.ckpt (written at the
    epoch's end by the default callbacks) in a run directory of its own (another configuration), against 2
    epochs in one go. Epoch 1 is all warm-up, so its lr does not depend on the run's length."""
    common = [
        "task=pretrain",
        "model=vit_micro_patch4",
        "data.batch_size=16",
        "data.subset_first=64",
        "data.augment=shift",
        "logger=csv",
        "task.module.optimizer.warmup_epochs=1",
        "callbacks.reconstruction_pictures.num_images=1",
    ]
    train(compose(CONF, "train", [*common, "trainer.max_epochs=2"], output_dir=tmp_path / "full"))
    train(compose(CONF, "train", [*common, "trainer.max_epochs=1"], output_dir=tmp_path / "first"))
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 4
    train(
        compose(
            CONF,
            "train",
            [*common, "trainer.max_epochs=2", f"ckpt_path={first}"],
            output_dir=tmp_path / "split",
        )
    )
    full, split = (
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True) for d in ("full", "split")
    )
    assert full["global_step"] == split["global_step"] == 8
    assert full["state_dict"].keys() == split["state_dict"].keys()
    for name, value in full["state_dict"].items():
        assert torch.equal(value, split["state_dict"][name]), name
    for a, b in zip(
        full["optimizer_states"][0]["state"].values(), split["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert full["lr_schedulers"][0]["_last_lr"] == split["lr_schedulers"][0]["_last_lr"]


@pytest.fixture
def make_streaming(tmp_path, monkeypatch):
    """Like ``make_digits``: a CIFAR-10 data module whose training split streams litdata shards prepared
    from 65 written images (4 batches of 16; random flips stand in for the digits' random shifts)."""
    from helpers.cifar import write_cifar

    from dmae_lightning.data import CIFAR10DataModule
    from dmae_lightning.data.prepare import prepare_cifar10

    write_cifar(tmp_path / "cifar", per_batch=13)
    monkeypatch.setattr(  # the written files cannot match torchvision's md5 of the real ones
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file()
    )
    assert prepare_cifar10(tmp_path / "cifar", tmp_path / "shards") == 65

    def make(batch_size: int = 16, subset_first: int | None = 64, augment: str = "shift"):
        return CIFAR10DataModule(
            str(tmp_path / "cifar"), batch_size=batch_size, streaming=str(tmp_path / "shards")
        )

    return make


# streaming: ~12 s, make_streaming prepares shards in a worker process (torch imported again), then two fits
@pytest.mark.parametrize("source", ["folder", pytest.param("streaming", marks=pytest.mark.slow)])
def test_resume_mid_epoch(source, make_digits, make_trainer, tmp_path, request):
    """Preempted mid-epoch (k=6 of 12, checkpoint every step): step, schedule and optimizer step counts are
    restored; the weights are only exact if the data order is, which a plain DataLoader cannot give and the
    streaming loader (its position saved in the checkpoint, augmentation seeded per sample) does."""
    # make_streaming prepares shards (~10 s, worker processes): only the streaming case asks for it
    make_data = request.getfixturevalue("make_streaming") if source == "streaming" else make_digits
    full, resumed, full_batches, resumed_batches = _resume_experiment(
        make_data, make_trainer, tmp_path, 6, "preempt"
    )
    assert full.step == resumed.step == 12
    assert full.lr == resumed.lr and full.scheduler["last_epoch"] == resumed.scheduler["last_epoch"]
    for i in full.opt_state:
        assert torch.equal(full.opt_state[i]["step"], resumed.opt_state[i]["step"])
    assert [b[:2] for b in resumed_batches] == [b[:2] for b in full_batches[6:]]  # steps and batch indices
    if source == "streaming":
        assert resumed_batches == full_batches[6:]  # the same images, flips included, in the same order
        assert _equal_states(full, resumed) == []
        return
    assert [b[2] for b in resumed_batches[2:]] != [b[2] for b in full_batches[8:]]
    diffs = _equal_states(full, resumed)
    if diffs:
        assert resumed_batches != full_batches[6:]  # the cause: other images in the rest of the epoch
        pytest.xfail(
            "mid-epoch resume is not exact: Lightning restarts a non-resumable DataLoader mid-epoch with a "
            "fresh shuffle (drawn from the RNG state of the mid-epoch checkpoint), so the rest of the epoch "
            "sees other images; exactness needs a resumable sampler/loader (state_dict) in the data module"
        )


# --------------------------------------------------------------------------------------------------
# Non-finite loss
# --------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_last_checkpoint(make_digits, make_trainer, tmp_path, monkeypatch):
    k = 3
    pl.seed_everything(0)
    module = micro_module()
    real_loss = module.model.forward_loss

    def loss_nan_from_step_k(clean, pred):
        loss = real_loss(clean, pred)
        return loss * float("nan") if module.training and module.global_step >= k else loss

    monkeypatch.setattr(module.model, "forward_loss", loss_nan_from_step_k)
    last = tmp_path / "ckpt" / "last.ckpt"
    seen = {}

    class HashBefore(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == k:
                seen["sha"], seen["files"] = sha256(last), sorted(p.name for p in last.parent.iterdir())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer([RNGState(), ckpt, HashBefore()], max_epochs=2)
    with pytest.raises(
        FloatingPointError, match=rf"non-finite training loss at global step {k} \(epoch 0, batch {k}\)"
    ):
        trainer.fit(module, make_digits(batch_size=16, subset_first=128))
    assert sha256(last) == seen["sha"]
    assert sorted(p.name for p in last.parent.iterdir()) == seen["files"]
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == k
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_check_finite_stops_every_rank_together():
    module = micro_module()
    decisions = []

    def reduce_boolean_decision(local, all=True):  # noqa: A002 (Lightning's argument name)
        decisions.append((local, all))
        return local and other_rank_finite

    strategy = SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
    module.trainer = SimpleNamespace(world_size=2, strategy=strategy, global_step=11, current_epoch=2)
    other_rank_finite = True
    base_mod.check_finite(module, torch.tensor(1.5), 0)
    # This rank's loss is finite but another rank's is not: this rank stops too (no DDP hang).
    other_rank_finite = False
    with pytest.raises(FloatingPointError, match=r"global step 11 \(epoch 2, batch 7\)"):
        base_mod.check_finite(module, torch.tensor(1.5), 7)
    assert decisions == [(True, True), (True, True)]
    module.trainer = SimpleNamespace(world_size=1, global_step=0, current_epoch=0)
    with pytest.raises(FloatingPointError):
        base_mod.check_finite(module, torch.tensor([1.0, float("inf")]), 0)


# --------------------------------------------------------------------------------------------------
# Seeding across ranks
# --------------------------------------------------------------------------------------------------
def test_noise_streams_differ_across_ranks_and_repeat_for_the_same_keys():
    def draw(*keys):
        return torch.randn(1000, generator=seeded_generator(*keys))

    for step, batch_idx in [(0, 0), (5, 3), (123, 7)]:
        rank0, rank1 = draw(0, TRAIN_STREAM, 0, step, batch_idx), draw(0, TRAIN_STREAM, 1, step, batch_idx)
        assert torch.equal(rank0, draw(0, TRAIN_STREAM, 0, step, batch_idx))
        assert abs(torch.corrcoef(torch.stack([rank0, rank1]))[0, 1]) < 0.15  # independent, not shifted
        assert not torch.equal(rank0, rank1)
    assert not torch.equal(draw(0, 0, 0, 1, 0), draw(0, 0, 0, 0, 1))  # step and micro-batch are not swappable
    assert not torch.equal(draw(0, 0, 0, 0, 0), draw(1, 0, 0, 0, 0))


def test_training_step_seeds_noise_and_masks_by_rank_step_and_batch(make_digits, make_trainer, monkeypatch):
    keys = []
    real = base_mod.seeded_generator

    def recording(*k, **kw):
        keys.append(k)
        return real(*k, **kw)

    monkeypatch.setattr(base_mod, "seeded_generator", recording)
    pl.seed_everything(0)
    module = micro_module(seed=7)
    make_trainer(max_epochs=1, limit_val_batches=0).fit(module, make_digits(batch_size=16, subset_first=48))
    assert keys == [(7, TRAIN_STREAM, 0, step, step) for step in range(3)]
    # With the same data, rank 1's generator gives another loss (other noise and masks) than rank 0's.
    imgs = torch.rand(4, 3, 32, 32)
    module.eval()
    losses = [module(imgs, real(7, TRAIN_STREAM, rank, 0, 0))[0].item() for rank in (0, 1, 0)]
    assert losses[0] == losses[2] != losses[1]


def test_initialisation_is_identical_after_the_same_global_seed():
    pl.seed_everything(0)
    a = micro_module()
    pl.seed_everything(0)
    b = micro_module()
    pl.seed_everything(1)
    c = micro_module()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)


def test_reconstruction_picture_title_and_file_name_name_the_epoch_just_finished(
    make_digits, make_trainer, monkeypatch
):
    """2 epochs of 2 steps (64 images, batch 32): after epoch e (step 2e) the file reconstruction_epoch000e.png
    is titled "epoch e, step 2e", and the final picture "epoch 2, step 4" (not epoch 3)."""
    from dmae_lightning.training import callbacks

    titles = []
    drawn = callbacks.labelled_picture
    monkeypatch.setattr(
        callbacks,
        "labelled_picture",
        lambda *args, title, **kw: titles.append(title) or drawn(*args, title=title, **kw),
    )
    saved = []
    monkeypatch.setattr(callbacks.Image.Image, "save", lambda picture, path: saved.append(Path(path).name))
    trainer = make_trainer(
        [callbacks.ReconstructionPictures(num_images=1)], max_epochs=2, limit_val_batches=1
    )
    trainer.fit(micro_module(), make_digits(batch_size=32, subset_first=64))
    assert saved == [
        "reconstruction_epoch0001.png",
        "reconstruction_epoch0002.png",
        "reconstruction_final.png",
    ]
    assert [t.split(":")[0] for t in titles] == ["epoch 1, step 2", "epoch 2, step 4", "epoch 2, step 4"]
