"""Fine-tuning the base classifier: consistency loss, mix-then-noise, layer decay, linear probing and a
short pre-train -> fine-tune run on digits. Numbers are compared with independent computations."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import CONF
from hydra.utils import instantiate
from timm.optim import Lars

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.train import train
from dmae_lightning.noise import GaussianNoise
from dmae_lightning.rng import seeded_generator
from dmae_lightning.training.finetune import (
    BaseClassifierModule,
    smoothed_one_hot,
)
from dmae_lightning.training.objectives import consistency_terms, noisy_copies

pytestmark = pytest.mark.usefixtures("single_thread")
MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch")


# --------------------------------------------------------------------------------------------------
# Consistency regularisation
# --------------------------------------------------------------------------------------------------
def _log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _consistency_by_hand(logits: np.ndarray, m: int) -> tuple[float, float]:
    """float64: mean over copies and images of KL(p_avg || p_j), and mean over images of H(p_avg)."""
    b = logits.shape[0] // m
    kl_sum, h_sum = 0.0, 0.0
    for i in range(b):
        log_p = [_log_softmax64(logits[j * b + i]) for j in range(m)]  # copy j of image i: row j*B + i
        p_avg = np.mean([np.exp(lp) for lp in log_p], axis=0)
        for j in range(m):
            kl_sum += float(np.sum(p_avg * (np.log(p_avg) - log_p[j])))
        h_sum += float(-np.sum(p_avg * np.log(p_avg)))
    return kl_sum / (m * b), h_sum / b


@pytest.mark.parametrize("m", [2, 3])
def test_consistency_terms_match_a_float64_hand_computation(m):
    rng = np.random.default_rng(m)
    logits = rng.normal(scale=3.0, size=(m * 5, 7))
    kl, entropy = consistency_terms(torch.from_numpy(logits).float(), m)
    kl_hand, h_hand = _consistency_by_hand(logits.astype(np.float32).astype(np.float64), m)
    assert kl.item() == pytest.approx(kl_hand, rel=1e-5, abs=1e-7)
    assert entropy.item() == pytest.approx(h_hand, rel=1e-5)
    assert kl_hand > 0.05 and h_hand > 0.05  # non-trivial values
    # Identical copies: no disagreement, entropy of the common prediction.
    same = np.tile(logits[:5], (m, 1))
    kl, entropy = consistency_terms(torch.from_numpy(same).float(), m)
    assert abs(kl.item()) < 1e-6
    assert entropy.item() == pytest.approx(_consistency_by_hand(same, m)[1], rel=1e-5)


def test_training_step_loss_is_ce_plus_weighted_consistency(make_digits, make_trainer):
    lbd, eta, m, smoothing = 3.0, 0.25, 2, 0.1
    pl.seed_everything(0)
    module = BaseClassifierModule(
        "vit_micro_patch4",
        num_classes=10,
        noise=GaussianNoise(0.5),
        objective=dict(name="consistency", copies=m, lbd=lbd, eta=eta),
        mixup=None,
        label_smoothing=smoothing,
        optimizer=dict(base_lr=1e-3, weight_decay=0.05, warmup_epochs=0),
    )
    torch.nn.init.normal_(module.model.head.weight, std=0.5)  # copies disagree: a non-trivial KL term
    seen = {}
    real_forward = module.model.forward  # the objective calls the network

    def recording_forward(imgs):
        logits = real_forward(imgs)
        if module.training:
            seen["logits"], seen["inputs"] = logits.detach().double().numpy(), imgs.detach().clone()
        return logits

    module.model.forward = recording_forward
    dm = make_digits(batch_size=8, subset_first=8)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, dm)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    logits = seen["logits"]  # [m*B, 10]
    assert logits.shape == (m * 8, 10)
    labels = torch.tensor([dm.dataset("train")[i][1] for i in range(8)])
    # The batch is the shuffled split: find each row's image (the nearest clean image) for its label.
    clean = torch.stack([dm.dataset("train")[i][0] for i in range(8)])  # [8, 3, 32, 32]
    residual = seen["inputs"][:8, None] - clean[None]  # [8 rows, 8 images, ...]
    order = residual.pow(2).mean(dim=(2, 3, 4)).argmin(dim=1)  # row r holds image order[r]
    assert sorted(order.tolist()) == list(range(8))
    targets = np.tile(smoothed_one_hot(labels[order], 10, smoothing).double().numpy(), (m, 1))
    ce_hand = float(np.mean(-(targets * _log_softmax64(logits)).sum(axis=1)))
    kl_hand, h_hand = _consistency_by_hand(logits, m)
    print(f"ce {ce_hand:.5f} kl {kl_hand:.5f} entropy {h_hand:.5f} loss {metrics['train/loss_step']:.5f}")
    assert kl_hand > 0.01 and h_hand > 0.1
    assert metrics["train/ce_step"] == pytest.approx(ce_hand, rel=1e-5)
    assert metrics["train/consistency_kl_step"] == pytest.approx(kl_hand, rel=1e-4, abs=1e-7)
    assert metrics["train/consistency_entropy_step"] == pytest.approx(h_hand, rel=1e-5)
    assert metrics["train/loss_step"] == pytest.approx(ce_hand + lbd * kl_hand + eta * h_hand, rel=1e-5)
    # Noise of std sigma on every copy (8 x 2 x 3072 values).
    noise = (seen["inputs"] - clean[order].repeat(m, 1, 1, 1)).double()
    assert noise.std().item() == pytest.approx(0.5, rel=0.03)


# --------------------------------------------------------------------------------------------------
# Mix first, then noise; copies share partner and lambda
# --------------------------------------------------------------------------------------------------
class RecordingMix:
    """Wraps timm's Mixup and keeps what it returned (the mixed clean images)."""

    def __init__(self, mix):
        self.mix, self.mixed = mix, None

    def __call__(self, imgs, labels):
        mixed, targets = self.mix(imgs, labels)
        self.mixed = mixed.clone()
        return mixed, targets


def _classify_mix(values, mixed, lam):
    """Checks ``mixed`` against the constant-per-image clean images ``values`` [B] and returns "mixup" or
    "cutmix". Batch mode: partner of image i is B-1-i, one lambda for the batch."""
    partner = values.flip(0)
    per_image = mixed.flatten(1)  # [B, P]
    is_self = (per_image - values[:, None]).abs() < 1e-6
    is_partner = (per_image - partner[:, None]).abs() < 1e-6
    if bool((is_self | is_partner).all()) and not bool(is_self.all()):
        # CutMix: one box for the whole batch, covering a (1 - lambda) share of the pixels.
        box = is_partner & ~is_self
        assert bool((box == box[0]).all()), "every image has the same cut-out box"
        assert box[0].double().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        return "cutmix"
    expected = lam * values + (1 - lam) * partner  # MixUp: every pixel the same blend
    assert torch.allclose(per_image, expected[:, None].expand_as(per_image), atol=1e-6)
    return "mixup"


def test_mix_then_noisy_copies_give_noise_of_exactly_sigma_and_shared_partners():
    b, m, sigma, classes, smoothing = 256, 2, 0.25, 10, 0.1
    module = BaseClassifierModule(
        "vit_micro_patch4",
        num_classes=classes,
        noise=GaussianNoise(sigma),
        mixup=MIXUP,
        label_smoothing=smoothing,
    )
    values = torch.linspace(0.05, 0.95, b)[torch.randperm(b, generator=torch.Generator().manual_seed(0))]
    labels = torch.arange(b) % classes  # image i and its partner b-1-i never share a label
    seen_modes = set()
    for np_seed in range(8):
        np.random.seed(np_seed)  # timm draws lambda and the mode from numpy's global RNG
        clean = values[:, None, None, None].expand(b, 3, 16, 16).clone()  # [B, 3, 16, 16], constant per image
        mix = RecordingMix(module.mix)
        inputs, targets = noisy_copies(
            *mix(clean, labels), GaussianNoise(sigma), m, seeded_generator(5, np_seed)
        )
        assert inputs.shape == (m * b, 3, 16, 16) and targets.shape == (m * b, classes)
        # Lambda from the soft targets: target[y_i] = lam (1 - s) + s / C.
        lam_per_image = (targets[:b, labels].diagonal() - smoothing / classes) / (1 - smoothing)
        lam = lam_per_image[0].item()
        assert torch.allclose(lam_per_image, torch.full((b,), lam), atol=1e-6)
        seen_modes.add(_classify_mix(values, mix.mixed, lam))
        # Noise of std sigma around the mixed clean image, on every copy.
        residual = (inputs - mix.mixed.repeat(m, 1, 1, 1)).double()  # [m*B, 3, 16, 16]
        assert residual.std().item() == pytest.approx(sigma, rel=0.02)
        assert abs(residual.mean().item()) < 0.01 * sigma
        # Copies j and j' of image i: the same clean part (partner and lambda), independent noise.
        copies = residual.unflatten(0, (m, b))  # [m, B, ...]
        assert (copies[0] - copies[1]).std().item() == pytest.approx(sigma * math.sqrt(2), rel=0.02)
        assert abs(torch.corrcoef(torch.stack([copies[0].flatten(), copies[1].flatten()]))[0, 1]) < 0.01
        assert torch.equal(targets[:b], targets[b:])
        # inputs - sigma * noise, with the generator's own noise, is one clean image for all copies.
        noise = torch.randn(inputs.shape, generator=seeded_generator(5, np_seed))
        clean_parts = (inputs - sigma * noise).unflatten(0, (m, b))
        assert torch.allclose(clean_parts[0], clean_parts[1], atol=1e-6, rtol=0)
        assert torch.allclose(clean_parts[0], mix.mixed, atol=1e-6, rtol=0)
    assert seen_modes == {"mixup", "cutmix"}


def test_noise_before_mixing_would_shrink_the_noise():
    """The reference's order (noise, then MixUp) leaves noise of std sigma sqrt(lam^2 + (1-lam)^2):
    its variance averages 1 - 2 a^2 / (2a (2a + 1)) = 0.692 sigma^2 for lam ~ Beta(0.8, 0.8)."""
    from timm.data import Mixup

    b, sigma, alpha, classes = 4096, 0.25, 0.8, 10
    np.random.seed(0)
    mixer = Mixup(
        mixup_alpha=alpha, cutmix_alpha=0.0, prob=1.0, mode="elem", label_smoothing=0.0, num_classes=classes
    )
    noise = sigma * torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # clean images = 0
    labels = torch.arange(b) % classes
    mixed, targets = mixer(noise.clone(), labels)
    lam = targets[:, :].gather(1, labels[:, None]).squeeze(1).double()  # per-image lambda
    shrink = lam**2 + (1 - lam) ** 2  # [B]: variance factor of each mixed image's noise
    expected_mean = 1 - 2 * alpha * alpha / ((2 * alpha) * (2 * alpha + 1))
    assert expected_mean == pytest.approx(0.6923, abs=1e-4)
    assert shrink.mean().item() == pytest.approx(expected_mean, rel=0.03)  # lambdas follow Beta(0.8, 0.8)
    variance = mixed.double().pow(2).mean().item()
    assert variance == pytest.approx(sigma**2 * shrink.mean().item(), rel=0.03)
    assert math.sqrt(variance) < 0.9 * sigma  # about 0.83 sigma: no longer the smoothing distribution
    # Ours on the same clean images (zeros): exactly sigma.
    np.random.seed(0)
    ours, _ = noisy_copies(
        *mixer(torch.zeros(b, 3, 4, 4), labels), GaussianNoise(sigma), 1, torch.Generator().manual_seed(1)
    )
    assert ours.double().std().item() == pytest.approx(sigma, rel=0.02)


# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay, linear probing
# --------------------------------------------------------------------------------------------------
def test_linear_probing_trains_only_the_head_with_lars(make_digits, make_trainer, tmp_path):
    cfg = compose(
        CONF,
        "train",
        ["task=linprobe", "model=vit_micro_patch4", "task.module.optimizer.warmup_epochs=0"],
        output_dir=tmp_path,
    )
    pl.seed_everything(0)
    module = instantiate(cfg.task.module, _convert_="all")
    assert module.hparams.freeze_encoder and module.hparams.model_kwargs["global_pool"] == "token"
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    bn_mean = module.model.head_norm.running_mean.clone()
    first = {}

    class FirstStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                first["lr"] = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
                first["grad"] = {
                    n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None
                }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                first["after"] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    trainer = make_trainer([FirstStep()], max_steps=4, limit_val_batches=0)
    trainer.fit(module, make_digits(batch_size=32, subset_first=128))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, Lars)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2
    after = dict(module.model.named_parameters())
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name  # encoder, cls token, norm: untouched
    assert not torch.equal(module.model.head_norm.running_mean, bn_mean)  # BatchNorm statistics do learn
    # First LARS step (momentum buffer = the update): the weight matrix moves by lr * trust * grad with
    # trust = 1e-3 ||w|| / ||g|| (MAE's LARS, even without weight decay); the bias by lr * grad.
    params = dict(module.model.named_parameters())
    peak = 0.1 * 32 / 256
    for name in trainable:
        assert first["lr"][id(params[name])] == pytest.approx(peak, rel=1e-12)
    w, g = before["head.weight"].double(), first["grad"]["head.weight"].double()
    trust = 1e-3 * w.norm() / (g.norm() + 1e-8)
    step_w = first["after"]["head.weight"].double() - w
    ulp = torch.finfo(torch.float32).eps * w.abs()  # the update is ~1e-5 of the weights: float32 rounding
    assert ((step_w + peak * trust * g).abs() <= 2 * ulp + 1e-3 * (peak * trust * g).abs()).all()
    assert step_w.norm().item() == pytest.approx(
        peak * 1e-3 * w.norm().item(), rel=0.01
    )  # ||dw|| = lr 1e-3 ||w||
    step_b = first["after"]["head.bias"].double() - before["head.bias"].double()
    assert torch.allclose(step_b, -peak * first["grad"]["head.bias"].double(), rtol=1e-4, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Short pre-train -> fine-tune on digits, through train(cfg)
# --------------------------------------------------------------------------------------------------
def _csv_rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "csv" / "metrics.csv")))


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, single_thread):
    """DMAE pre-training (2 epochs) then fine-tuning with consistency regularisation (6 epochs, sigma 0.25)
    of the micro patch-8 model on all 1,257 training digits, through train(cfg) and the config tree.

    MixUp/CutMix is off here: on this tiny model it needs more epochs than a test can afford (about 0.47
    noisy accuracy after 5 epochs against 0.62 without); its handling is tested exactly above."""
    pre_out, ft_out = tmp_path_factory.mktemp("pre"), tmp_path_factory.mktemp("ft")
    common = ["model=vit_micro_patch8", "noise=sigma_0.25", "logger=csv"]
    pre = compose(
        CONF,
        "train",
        [
            *common,
            "task=pretrain",
            "data.batch_size=64",
            "trainer.max_epochs=2",
            "task.module.optimizer.base_lr=1e-2",
            "task.module.optimizer.warmup_epochs=1",
            "callbacks.reconstruction_pictures.num_images=2",
        ],
        output_dir=pre_out,
    )
    train(pre)
    ft = compose(
        CONF,
        "train",
        [
            *common,
            "task=finetune",
            f"pretrained={pre_out / 'checkpoints' / 'last.ckpt'}",
            "data.batch_size=32",
            "trainer.max_epochs=6",
            "task.module.mixup=null",
            "task.module.optimizer.base_lr=2.4e-2",
            "task.module.optimizer.warmup_epochs=0.5",
        ],
        output_dir=ft_out,
    )
    metrics = train(ft)
    return SimpleNamespace(out=ft_out, metrics=metrics, rows=_csv_rows(ft_out))


@pytest.mark.slow  # ~10 s with finetune_run: 2 epochs of pre-training and 6 of fine-tuning, set up once for the 3 tests
def test_short_finetune_beats_chance_under_noise(finetune_run):
    accs = [
        (int(r["epoch"]), float(r["val/acc_clean"]), float(r["val/acc_noisy"]))
        for r in finetune_run.rows
        if r.get("val/acc_noisy")
    ]
    print("epoch, val/acc_clean, val/acc_noisy:", accs)
    assert [e for e, _, _ in accs] == list(range(6))
    assert finetune_run.metrics["val/acc_noisy"] == pytest.approx(accs[-1][2])
    assert finetune_run.metrics["val/acc_noisy"] > 0.5  # chance is 0.1
    assert finetune_run.metrics["val/acc_clean"] > 0.5


@pytest.mark.slow  # ~10 s with finetune_run: 2 epochs of pre-training and 6 of fine-tuning, set up once for the 3 tests
def test_finetune_logs_validation_and_consistency_metrics(finetune_run):
    keys = {k for r in finetune_run.rows for k, v in r.items() if v}
    for name in (
        "val/acc_clean",
        "val/acc_noisy",
        "train/loss_epoch",
        "train/ce_step",
        "train/ce_epoch",
        "train/consistency_kl_step",
        "train/consistency_kl_epoch",
        "train/consistency_entropy_step",
        "train/consistency_entropy_epoch",
    ):
        assert name in keys, name
    for row in finetune_run.rows:
        if row.get("train/loss_step"):
            total = (
                float(row["train/ce_step"])
                + 2.0 * float(row["train/consistency_kl_step"])
                + 0.5 * float(row["train/consistency_entropy_step"])
            )
            assert float(row["train/loss_step"]) == pytest.approx(total, rel=1e-5)


@pytest.mark.slow  # ~10 s with finetune_run: 2 epochs of pre-training and 6 of fine-tuning, set up once for the 3 tests
def test_finetune_checkpoint_is_plain_data(finetune_run):
    ckpt = torch.load(finetune_run.out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]

    def plain(value):
        if isinstance(value, dict):
            return all(type(k) is str and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or type(value) in (str, int, float, bool)

    assert plain(hparams), hparams
    assert hparams["objective"] == {
        "name": "consistency",
        "copies": 2,
        "lbd": 2.0,
        "eta": 0.5,
    }  # eta as trained
    assert (
        hparams["model_name"] == "vit_micro_patch8"
        and hparams["noise"] == GaussianNoise(0.25).config()
        and hparams["mixup"] is None
    )
    assert hparams["optimizer"]["layer_decay"] == 0.75 and hparams["optimizer"]["betas"] == [0.9, 0.999]
    module = BaseClassifierModule(**hparams)
    module.load_state_dict(ckpt["state_dict"])


def test_plain_rs_finetuning_logs_no_consistency_terms(make_digits, make_trainer):
    module = BaseClassifierModule(
        "vit_micro_patch4",
        num_classes=10,
        objective=dict(name="gaussian"),
        optimizer=dict(base_lr=1e-3, weight_decay=0.05, warmup_epochs=0),
    )
    trainer = make_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(module, make_digits(batch_size=8, subset_first=8))
    keys = set(trainer.callback_metrics)
    assert {"train/ce", "train/loss", "val/acc_clean", "val/acc_noisy"} <= keys
    assert not any("consistency" in k for k in keys)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(
        trainer.callback_metrics["train/ce"].item()
    )


@pytest.mark.parametrize("limit_val_batches", [None, 0])
def test_a_run_that_ends_at_chance_level_says_so(make_digits, make_trainer, caplog, limit_val_batches):
    """A zero head and lr 0: every image gets class 0, so both accuracies are the share of 0 among the
    validation labels (about 1/10 < 1.5/10): one warning line with those numbers; without validation none."""
    module = BaseClassifierModule(
        "vit_micro_patch4", num_classes=10, optimizer=dict(base_lr=0.0, weight_decay=0.0, warmup_epochs=0)
    )
    torch.nn.init.zeros_(module.model.head.weight)
    torch.nn.init.zeros_(module.model.head.bias)
    data = make_digits(batch_size=16, subset_first=64)
    trainer = make_trainer(max_epochs=1, **({} if limit_val_batches is None else dict(limit_val_batches=0)))
    with caplog.at_level(logging.WARNING, logger="dmae_lightning"):
        trainer.fit(module, data)
    warnings = [r.getMessage() for r in caplog.records if "chance level" in r.getMessage()]
    if limit_val_batches == 0:
        assert warnings == []
        return
    labels = torch.cat([y for _, y in data.val_dataloader()])
    share = (labels == 0).double().mean().item()
    assert share < 0.15
    assert warnings == [
        f"fine-tuning ended at chance level: noisy validation accuracy {share:.4f}, clean "
        f"{share:.4f} (chance 0.1000 for 10 classes); train longer (trainer.max_epochs) or check "
        "the learning rate"
    ]


@pytest.mark.parametrize(("acc", "warns"), [(0.1722, True), (0.1999, True), (0.2001, False), (0.9, False)])
def test_chance_level_margin_is_twice_chance(acc, warns, caplog):
    """0.1722: the noisy accuracy that the README's plain-RS digits command ended at (issue 17.4.4)."""
    from types import SimpleNamespace

    module = BaseClassifierModule("vit_micro_patch4", num_classes=10)
    metrics = {"val/acc_noisy": torch.tensor(acc), "val/acc_clean": torch.tensor(acc)}
    module._trainer = SimpleNamespace(callback_metrics=metrics, is_global_zero=True)
    with caplog.at_level(logging.WARNING, logger="dmae_lightning"):
        module.on_train_end()
    assert any("chance level" in r.getMessage() for r in caplog.records) == warns


def test_objectives_equal_a_float64_hand_computation():
    """The fine-tuning objectives (training/objectives.py) on a fixed batch of logits and soft targets: plain
    Gaussian augmentation is the soft-target cross-entropy; Consistency adds lbd * KL(p_avg || p_i) + eta * H(p_avg),
    all recomputed here in float64 with numpy."""
    from dmae_lightning.training.objectives import Consistency, GaussianAugmentation

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 4))  # m = 2 copies of 3 images, copy-major
    targets = rng.dirichlet(np.ones(4), size=3)[
        np.tile(np.arange(3), 2)
    ]  # each copy shares its image's target
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -(targets * log_p).sum(1).mean()
    p = np.exp(log_p).reshape(2, 3, 4)
    p_avg = p.mean(0)
    kl = (p_avg[None] * (np.log(p_avg)[None] - np.log(p))).sum(2).mean()
    entropy = -(p_avg * np.log(p_avg)).sum(1).mean()
    t_logits, t_targets = (
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(targets, dtype=torch.float32),
    )
    plain, terms = GaussianAugmentation().loss_of_logits(t_logits, t_targets)
    assert float(plain) == pytest.approx(ce, rel=1e-5) and set(terms) == {"ce"}
    loss, terms = Consistency(copies=2, lbd=2.0, eta=0.1).loss_of_logits(t_logits, t_targets)
    assert float(loss) == pytest.approx(ce + 2.0 * kl + 0.1 * entropy, rel=1e-5)
    assert set(terms) == {"ce", "consistency_kl", "consistency_entropy"}
    with pytest.raises(ValueError, match="consistency needs m >= 2"):
        Consistency(copies=1)
