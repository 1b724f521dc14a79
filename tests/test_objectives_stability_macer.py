"""The stability-training and MACER objectives (issue 24 section 1): each loss against an independent float64
computation of the published formula on a tiny linear network whose noisy inputs the test redraws from the same
seeded generator, gradients only where the reference code puts them (checked by central differences of the
float64 formula), configs from conf/objective/*.yaml, and one real training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import CONF
from omegaconf import OmegaConf
from scipy.special import log_softmax, ndtri, softmax

from dmae_lightning.jobs.compose import compose
from dmae_lightning.noise import GaussianNoise, noise_from_config
from dmae_lightning.training.finetune import BaseClassifierModule
from dmae_lightning.training.objectives import Macer, Stability, macer_terms, objective_from_config

pytestmark = pytest.mark.usefixtures("single_thread")
B, SHAPE, K = 4, (2, 2, 2), 3  # images [B, C, H, W], classes
SIGMA = 0.5


class Recorder(torch.nn.Module):
    """A linear network on flattened images that keeps its last logits (with their gradient after backward)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = torch.nn.Linear(math.prod(SHAPE), K)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=g))
            self.linear.bias.copy_(0.5 * torch.randn(K, generator=g))
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.logits = self.linear(x.flatten(1))
        self.logits.retain_grad()
        return self.logits

    def numpy_logits(self, x: np.ndarray) -> np.ndarray:
        """float64 logits of float64 images [..., C, H, W]."""
        w, b = (p.detach().double().numpy() for p in (self.linear.weight, self.linear.bias))
        return x.reshape(*x.shape[: -len(SHAPE)], -1) @ w.T + b


def batch(labels) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.rand((B, *SHAPE), generator=torch.Generator().manual_seed(0))  # [B, C, H, W] in [0,1]
    return imgs, torch.nn.functional.one_hot(torch.tensor(labels), K).float()


def redrawn_noise(seed: int, shape) -> np.ndarray:
    """GaussianNoise.perturb's draw: torch.randn of the input's shape from the batch's generator (unit std)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double().numpy()


def central_differences(f, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


# --------------------------------------------------------------------------------------------------
# Stability training
# --------------------------------------------------------------------------------------------------
def stability_by_hand(clean: np.ndarray, noisy: np.ndarray, t: np.ndarray, lbd: float) -> tuple[float, ...]:
    """train_stab.py in float64: CE(clean logits, t) + lbd * mean_i -sum_c p_ic log q_ic (p clean, q noisy)."""
    ce = float(np.mean(-(t * log_softmax(clean, axis=1)).sum(axis=1)))
    p, log_q = softmax(clean, axis=1), log_softmax(noisy, axis=1)
    xent = float(np.mean(-(p * log_q).sum(axis=1)))
    kl = float(np.mean((p * (np.log(p) - log_q)).sum(axis=1)))
    return ce + lbd * xent, ce, xent, kl


def test_stability_loss_and_gradients_match_the_reference_formula():
    lbd, seed = 2.5, 7
    model = Recorder()
    imgs, targets = batch([0, 1, 2, 1])
    targets = 0.9 * targets + 0.1 / K  # soft targets: the CE takes them as they are
    loss, terms = Stability(lbd=lbd).loss(
        model, imgs, targets, GaussianNoise(SIGMA), torch.Generator().manual_seed(seed)
    )
    x = imgs.double().numpy()
    noisy = x + SIGMA * redrawn_noise(seed, imgs.shape)  # one draw of the images' shape
    t = targets.double().numpy()
    clean_z, noisy_z = model.numpy_logits(x), model.numpy_logits(noisy)
    total, ce, xent, kl = stability_by_hand(clean_z, noisy_z, t, lbd)
    print(f"ce {ce:.5f} xent {xent:.5f} kl {kl:.5f} loss {total:.5f}")
    assert kl > 0.05 and xent > kl  # a non-trivial disagreement; H(p, q) = KL(p || q) + H(p)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["stability_xent"].item() == pytest.approx(xent, rel=1e-5)
    assert terms["stability_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    # One network call on [clean; noisy]; both halves carry gradient: the clean one from the CE and from p
    # (not detached), the noisy one from q only. Central differences of the float64 formula in each logit.
    loss.backward()
    assert model.logits is not None and model.logits.shape == (2 * B, K)
    logits = model.logits.detach().double().numpy()
    np.testing.assert_allclose(logits, np.concatenate([clean_z, noisy_z]), rtol=1e-5, atol=1e-5)
    expected = central_differences(
        lambda z: stability_by_hand(z[:B], z[B:], t, lbd)[0], np.concatenate([clean_z, noisy_z])
    )
    grad = model.logits.grad.double().numpy()
    np.testing.assert_allclose(grad, expected, atol=1e-5)
    clean_only_ce = central_differences(lambda z: stability_by_hand(z, noisy_z, t, 0.0)[0], clean_z)
    assert np.abs(grad[:B] - clean_only_ce).max() > 1e-2  # the regulariser moves the clean prediction too


def test_stability_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="lbd >= 0"):
        Stability(lbd=-1.0)


# --------------------------------------------------------------------------------------------------
# MACER
# --------------------------------------------------------------------------------------------------
def macer_by_hand(
    z: np.ndarray, t: np.ndarray, sigma: float, lbd: float, beta: float, gamma: float
) -> tuple[float, float, list[bool]]:
    """RuntianZ/macer macer.py in float64, image by image: (loss, robustness term, kept) of logits [k, B, K]."""
    k, b, _ = z.shape
    ce_sum, hinge_sum, kept = 0.0, 0.0, []
    for i in range(b):
        g = np.mean([softmax(z[j, i]) for j in range(k)], axis=0)  # no beta in the classification loss
        ce_sum += -float(np.sum(t[i] * np.log(g + 1e-10)))
        g_beta = np.mean([softmax(beta * z[j, i]) for j in range(k)], axis=0)
        y = int(np.argmax(t[i]))
        order = np.argsort(g_beta)[::-1]
        margin = ndtri(g_beta[order[0]]) - ndtri(g_beta[order[1]])
        keep = bool(order[0] == y and np.isfinite(margin) and abs(margin) <= gamma)
        kept.append(keep)
        if keep:
            hinge_sum += gamma - margin
    robustness = hinge_sum * sigma / 2 / b
    return ce_sum / b + lbd * robustness, robustness, kept


def test_macer_loss_and_gradients_match_the_reference_formula():
    """Image 0 is misclassified by the beta-smoothed classifier, image 2 right with a margin above gamma, images
    1 and 3 right with margins below it: only 1 and 3 enter the radius term, and only their copies' logits get
    gradient from it."""
    k, beta, gamma, lbd, seed = 8, 4.0, 3.0, 12.0, 1
    model = Recorder()
    imgs, targets = batch([0, 2, 1, 1])
    x = np.tile(imgs.double().numpy(), (k, 1, 1, 1))  # copy j of image i at row j*B + i
    noisy = x + SIGMA * redrawn_noise(seed, x.shape)  # one draw of [k*B, C, H, W]
    z = model.numpy_logits(noisy).reshape(k, B, K)
    t = targets.double().numpy()
    g_beta = softmax(beta * z, axis=2).mean(axis=0)
    top2 = np.sort(g_beta, axis=1)[:, ::-1]
    margins = ndtri(top2[:, 0]) - ndtri(top2[:, 1])
    print("G^b", g_beta.round(4).tolist(), "margins", margins.round(4).tolist())
    assert g_beta[0].argmax() != 0 and [g_beta[i].argmax() for i in (1, 2, 3)] == [2, 1, 1]
    assert margins[2] > gamma + 0.5 and max(margins[1], margins[3]) < gamma - 0.5

    def run(lbd_: float, beta_: float = beta):
        objective = Macer(copies=k, beta=beta_, gamma=gamma, lbd=lbd_)
        out = objective.loss(model, imgs, targets, GaussianNoise(SIGMA), torch.Generator().manual_seed(seed))
        out[0].backward()
        assert model.logits is not None and model.logits.grad is not None
        return out, model.logits.detach().double().numpy(), model.logits.grad.double().numpy()

    (loss, terms), logits, grad = run(lbd)
    total, robustness, kept = macer_by_hand(z, t, SIGMA, lbd, beta, gamma)
    assert kept == [False, True, False, True]
    np.testing.assert_allclose(logits, z.reshape(k * B, K), rtol=1e-5, atol=1e-5)
    assert terms["macer_radius_loss"].item() == pytest.approx(robustness, rel=1e-4)
    assert terms["macer_kept"].item() == 0.5
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(macer_by_hand(z, t, SIGMA, 0.0, beta, gamma)[0], rel=1e-5)
    # The gradient in every logit, against central differences of the float64 formula.
    expected = central_differences(
        lambda v: macer_by_hand(v.reshape(k, B, K), t, SIGMA, lbd, beta, gamma)[0], z.reshape(k * B, K)
    )
    np.testing.assert_allclose(grad, expected, atol=1e-5)
    # The radius term's share: exactly zero on every copy of images 0 (misclassified) and 2 (margin > gamma).
    (_, ce_terms), _, grad_ce = run(0.0)
    radius_share = (grad - grad_ce).reshape(k, B, K)
    assert np.all(radius_share[:, [0, 2]] == 0.0)
    assert all(np.abs(radius_share[:, i]).max() > 1e-3 for i in (1, 3))
    # beta only enters the radius term.
    (_, other_beta), _, _ = run(lbd, beta_=1.5)
    assert other_beta["ce"].item() == ce_terms["ce"].item() == terms["ce"].item()


def test_macer_drops_saturated_margins_without_nan_gradients():
    """A top probability of exactly 1 in float32 (infinite margin) drops the image (the reference's isinf check)
    and leaves finite gradients."""
    logits = torch.tensor([[[40.0, 0.0, 0.0], [1.0, 0.5, 0.0]]] * 2, requires_grad=True)  # [k=2, B=2, K=3]
    targets = torch.eye(K)[[0, 0]]
    ce, hinge, kept = macer_terms(logits, targets, beta=16.0, gamma=8.0)
    assert kept.tolist() == [False, True] and hinge[0].item() == 0.0 and hinge[1].item() > 0
    (ce.sum() + hinge.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(copies=0), "copies must be an integer >= 1"),
        (dict(beta=0.0), "beta > 0"),
        (dict(gamma=-1.0), "gamma > 0"),
        (dict(lbd=-1.0), "lbd >= 0"),
        (dict(lbd=math.inf), "finite number for lbd"),
    ],
)
def test_macer_refuses_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        Macer(**settings)


# --------------------------------------------------------------------------------------------------
# Configs and a real training step
# --------------------------------------------------------------------------------------------------
def composed(name: str, tmp_path) -> tuple[dict, GaussianNoise]:
    cfg = compose(CONF, "train", ["experiment=finetune_digits", f"objective={name}"], output_dir=tmp_path)
    settings = OmegaConf.to_container(cfg.objective, resolve=True)
    assert isinstance(settings, dict)
    assert OmegaConf.to_container(cfg.task.module.objective, resolve=True) == settings
    noise = noise_from_config(OmegaConf.to_container(cfg.noise, resolve=True))
    assert isinstance(noise, GaussianNoise) and noise.sigma == 0.25
    return settings, noise


def test_the_yamls_build_the_reference_defaults(tmp_path):
    settings, noise = composed("stability", tmp_path)
    assert settings == {"name": "stability", "lbd": 2.0}
    assert objective_from_config(settings, noise) == Stability(lbd=2.0)
    settings, noise = composed("macer", tmp_path)
    assert settings == {"name": "macer", "copies": 16, "beta": 16.0, "gamma": 8.0, "lbd": None}
    macer = objective_from_config(settings, noise)
    assert macer == Macer(copies=16, beta=16.0, gamma=8.0, lbd=12.0)
    assert macer.settings() == {**settings, "lbd": 12.0}
    assert objective_from_config(settings, GaussianNoise(1.0)) == Macer(lbd=4.0)
    with pytest.raises(ValueError, match="no lambda for sigma 0.3 .*set objective.lbd"):
        objective_from_config(settings, GaussianNoise(0.3))
    assert objective_from_config({**settings, "lbd": 6.0}, GaussianNoise(0.3)) == Macer(lbd=6.0)


@pytest.mark.parametrize("name", ["stability", "macer"])
def test_one_training_step_with_the_yaml_settings(name, tmp_path, make_digits, make_trainer):
    settings, noise = composed(name, tmp_path)
    pl.seed_everything(0)
    module = BaseClassifierModule(
        "vit_micro_patch4",
        num_classes=10,
        noise=noise,
        objective=settings,
        mixup=None,
        label_smoothing=0.1,
        optimizer=dict(base_lr=1e-3, weight_decay=0.05, warmup_epochs=0),
    )
    before = module.model.head.weight.detach().clone()
    trainer = make_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, make_digits(batch_size=8, subset_first=8))
    metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    expected = {"stability": ["ce", "stability_xent", "stability_kl"], "macer": ["ce", "macer_radius_loss"]}
    assert all(math.isfinite(metrics[f"train/{term}_step"]) for term in expected[name])
    assert (
        math.isfinite(metrics["train/loss_step"]) and metrics["train/loss_step"] >= metrics["train/ce_step"]
    )
    assert not torch.equal(module.model.head.weight, before)  # the step changed the network
    assert module.hparams["objective"]["name"] == name


def test_macer_refuses_mixup():
    with pytest.raises(ValueError, match="objective macer needs hard labels"):
        BaseClassifierModule(
            "vit_micro_patch4", num_classes=10, objective={"name": "macer"}, mixup=dict(mixup_alpha=0.8)
        )
