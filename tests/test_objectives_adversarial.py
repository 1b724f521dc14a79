"""The adversarial fine-tuning objectives (training/objectives/smoothadv.py, smoothmix.py) against float64
hand computations on a linear model over flattened 1x2x2 images and 3 classes, whose input gradient is written
out here: the smoothed classifier G(z) = mean_j softmax(W (z + n_j) + b) has
d(-log G_y)/dz = -(1 / G_y) mean_j p_jy (W_y - sum_k p_jk W_k). The noise and every other draw are replayed from
a second generator seeded alike, in the objectives' documented order: the m noise vectors of all images
(copy-major, one ``noise.perturb`` of zeros), then SmoothAdv's fallback direction at every step
(B standard normals) or SmoothMix's lambda (B uniforms / 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CONF
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dmae_lightning.jobs.compose import compose
from dmae_lightning.noise import GaussianNoise
from dmae_lightning.training.objectives.smoothadv import SmoothAdv, smoothadv_pgd
from dmae_lightning.training.objectives.smoothmix import SmoothMix, smoothmix_mix, smoothmix_pgd

SIGMA, SEED, K = 0.5, 11, 3


class ModeRecorder(nn.Module):
    """The identity, recording the mode of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(ModeRecorder(), nn.Flatten(), nn.Linear(4, K))
    with torch.no_grad():
        model[2].weight.mul_(4)  # a sharper classifier: gradients far from zero, logits of a few units
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 1x2x2 images (some pixels on the box's faces) and label-smoothed targets (0.1)."""
    imgs = torch.tensor(
        [[0.0, 0.3, 1.0, 0.6], [0.5, 0.5, 0.02, 0.97], [0.2, 0.9, 0.4, 0.0]], dtype=torch.float32
    ).view(3, 1, 2, 2)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), K).float() * 0.9 + 0.1 / K
    return imgs, targets


def weights(model: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
    linear = model[2]
    return linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def replayed(m: int, shape: tuple[int, ...]) -> tuple[torch.Generator, np.ndarray]:
    """A generator seeded as the test's, after drawing the noise vectors [m, B, D] it returns (float64)."""
    gen = torch.Generator().manual_seed(SEED)
    vectors = torch.randn((m * shape[0], *shape[1:]), generator=gen) * SIGMA
    return gen, vectors.double().numpy().reshape(m, shape[0], -1)


def input_grad(W, b, z, vectors, y) -> np.ndarray:
    """d(-log G(z_i)_{y_i}) / dz_i for every image: z [B, D], vectors [m, B, D] -> [B, D]."""
    p = softmax((z[None] + vectors) @ W.T + b)  # [m, B, K]
    G = p.mean(0)
    rows = np.arange(len(z))
    inner = W[y][None] - p @ W  # [m, B, D]: W_y - sum_k p_k W_k
    return -(p[:, rows, y][..., None] * inner).mean(0) / G[rows, y][:, None]


def reference_smoothadv_pgd(W, b, x, y, vectors, eps, steps, gen) -> np.ndarray:
    """Salman et al.'s PGD_L2 in float64: delta = 0; steps of 2 eps / T along the normalised gradient (-z, z
    standard normal, for a zero one); clip x + delta to [0,1]; renorm delta to eps (scale eps / (norm + 1e-7))."""
    delta = np.zeros_like(x)
    for _ in range(steps):
        z = torch.randn((len(x), 1, 2, 2), generator=gen).double().numpy().reshape(len(x), -1)
        g = input_grad(W, b, x + delta, vectors, y)
        norm = np.linalg.norm(g, axis=1, keepdims=True)
        direction = np.where(norm > 0, g / np.where(norm > 0, norm, 1), -z)
        delta = np.clip(x + delta + 2 * eps / steps * direction, 0, 1) - x
        size = np.linalg.norm(delta, axis=1, keepdims=True)
        delta = np.where(size > eps, delta * eps / (size + 1e-7), delta)
    return x + delta


def test_smoothadv_attack_and_loss_equal_a_float64_hand_computation():
    """(a) x' of 2 PGD steps with m = 2 and (b) the multi-noise and single-noise losses, in float64."""
    model, (imgs, targets) = tiny_model(), batch()
    W, b = weights(model)
    x, y, t = imgs.double().numpy().reshape(3, -1), targets.argmax(1).numpy(), targets.double().numpy()
    for multi_noise in (True, False):
        objective = SmoothAdv(epsilon=0.4, steps=2, samples=2, multi_noise=multi_noise, warmup=0)
        gen = torch.Generator().manual_seed(SEED)
        loss, terms = objective.loss(model, imgs, targets, GaussianNoise(SIGMA), gen)

        replay, vectors = replayed(2, tuple(imgs.shape))
        adv = reference_smoothadv_pgd(W, b, x, y, vectors, 0.4, 2, replay)
        assert not np.allclose(adv, x, atol=0.05)  # the attack moved every image
        copies = vectors if multi_noise else vectors[:1]
        log_p = np.log(softmax((adv[None] + copies) @ W.T + b))  # [m or 1, B, K]
        assert loss.item() == pytest.approx(-(t[None] * log_p).sum(-1).mean(), abs=1e-5)
        assert terms["ce"] is loss
        distance = np.linalg.norm(adv - x, axis=1).mean()
        assert terms["smoothadv_distance"].item() == pytest.approx(distance, abs=1e-5)

    for steps in (1, 2):  # the attack alone, its noise drawn as the loss draws it
        gen = torch.Generator().manual_seed(SEED)
        vectors_t = GaussianNoise(SIGMA).perturb(torch.zeros(6, 1, 2, 2), gen)
        ours = smoothadv_pgd(model, imgs, targets.argmax(1), vectors_t, 0.4, steps, gen)
        replay, vectors = replayed(2, tuple(imgs.shape))
        assert np.array_equal(vectors_t.double().numpy().reshape(2, 3, -1), vectors)
        expected = reference_smoothadv_pgd(W, b, x, y, vectors, 0.4, steps, replay)
        np.testing.assert_allclose(ours.double().numpy().reshape(3, -1), expected, atol=1e-5)


def test_smoothadv_attack_leaves_the_weights_alone_and_runs_in_eval_mode():
    """(c) The attack runs in eval mode (as train_pgd.py), restores every submodule's own mode, leaves every
    .grad as it was and the weights unchanged; the loss's backward then reaches the parameters."""
    model, (imgs, targets) = tiny_model(), batch()
    model.train()
    model[1].eval()  # a submodule in eval mode stays so
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = SmoothAdv(epsilon=0.5, steps=3, samples=2, warmup=0)
    loss, _ = objective.loss(model, imgs, targets, GaussianNoise(SIGMA), torch.Generator().manual_seed(0))
    assert model[0].modes == [False] * 3 + [True]  # 3 attack steps in eval mode, the training pass in train
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():  # the attack needs no grad mode of the caller
        smoothadv_pgd(model, imgs, targets.argmax(1), torch.zeros(3, 1, 2, 2), 0.5, 2, None)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())

    mix = SmoothMix(steps=2, warmup=0)
    mix.loss(model, imgs, targets, GaussianNoise(SIGMA), torch.Generator().manual_seed(0))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())  # no backward yet
    assert model.training and not model[1].training


def test_smoothadv_stays_in_the_ball_and_the_box():
    """(d) ||x' - x||_2 <= epsilon for every image (reached by most), and x' in [0,1]."""
    model = tiny_model()
    imgs = torch.rand(32, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, K, (32,), generator=torch.Generator().manual_seed(2))
    vectors = GaussianNoise(SIGMA).perturb(torch.zeros(64, 1, 2, 2), torch.Generator().manual_seed(3))
    for eps in (0.05, 0.3, 1.5):
        adv = smoothadv_pgd(model, imgs, labels, vectors, eps, 3, torch.Generator().manual_seed(4))
        norms = (adv - imgs).flatten(1).norm(dim=1)
        assert bool((norms <= eps).all()) and adv.min() >= 0 and adv.max() <= 1
        if eps < 1:  # the projection is active for most images
            assert float((norms > 0.99 * eps).float().mean()) > 0.9


def reference_smoothmix(W, b, x, y, vectors, steps, alpha, mix_step, max_norm, mix_max_norm):
    """SmoothMix_PGD.attack in float64: x_{t+1} = clip(proj(x_t + alpha g / (||g|| + 1e-8))); (x_s, x_T)."""
    adv, init = x.copy(), x.copy()

    def project(z, radius):
        if radius is not None:
            d = z - x
            size = np.linalg.norm(d, axis=1, keepdims=True)
            z = x + np.where(size > radius, d * radius / (size + 1e-7), d)
        return np.clip(z, 0, 1)

    for step in range(steps):
        if step == mix_step:
            init = adv
        g = input_grad(W, b, adv, vectors, y)
        adv = project(adv + alpha * g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-8), max_norm)
    return project(init, mix_max_norm), adv


@pytest.mark.parametrize(("steps", "mix_step", "max_norm"), [(1, 0, None), (2, 1, None), (2, 1, 0.3)])
def test_smoothmix_points_labels_and_loss_equal_a_float64_hand_computation(steps, mix_step, max_norm):
    """(e) The clean side and the adversary, the mixed points and labels, and the loss, in float64."""
    model, (imgs, targets) = tiny_model(), batch()
    W, b = weights(model)
    x, y, t = imgs.double().numpy().reshape(3, -1), targets.argmax(1).numpy(), targets.double().numpy()
    objective = SmoothMix(
        samples=2, steps=steps, step_size=0.5, eta=2.0, mix_step=mix_step, max_norm=max_norm, warmup=0
    )
    assert objective.mix_radius == 0.5 * mix_step

    replay, vectors = replayed(2, tuple(imgs.shape))
    clean_side, adv = reference_smoothmix(W, b, x, y, vectors, steps, 0.5, mix_step, max_norm, 0.5 * mix_step)
    lam = (torch.rand(3, generator=replay) / 2).double().numpy()
    p = softmax((x[None] + vectors) @ W.T + b)  # [m, B, K]
    probs = p.mean(0)
    mixed = (1 - lam[:, None]) * clean_side + lam[:, None] * adv
    mixed_targets = (1 - lam[:, None]) * probs + lam[:, None] / K
    assert not np.allclose(adv, x, atol=0.05)  # the adversary moved every image

    vectors_t = torch.tensor(vectors, dtype=torch.float32).view(6, 1, 2, 2)
    ours_clean, ours_adv = smoothmix_pgd(
        model, imgs, targets.argmax(1), vectors_t, steps, 0.5, mix_step, max_norm, 0.5 * mix_step
    )
    np.testing.assert_allclose(ours_clean.double().numpy().reshape(3, -1), clean_side, atol=1e-5)
    np.testing.assert_allclose(ours_adv.double().numpy().reshape(3, -1), adv, atol=1e-5)
    if max_norm is not None:
        assert float((ours_adv - imgs).flatten(1).norm(dim=1).max()) <= max_norm
    ours_mixed, ours_targets = smoothmix_mix(
        ours_clean, ours_adv, torch.tensor(probs, dtype=torch.float32), torch.tensor(lam, dtype=torch.float32)
    )
    np.testing.assert_allclose(ours_mixed.double().numpy().reshape(3, -1), mixed, atol=1e-5)
    np.testing.assert_allclose(ours_targets.double().numpy(), mixed_targets, atol=1e-6)

    ce = -(t[None] * np.log(p)).sum(-1).mean()
    correct = (probs.argmax(1) == y).astype(float)
    assert 0 < correct.sum() < 3  # both sides of the indicator
    q = softmax((mixed[None] + vectors) @ W.T + b)  # [m, B, K]
    kl = (mixed_targets[None] * (np.log(mixed_targets)[None] - np.log(q))).sum(-1)  # [m, B]
    mix = (correct[None] * kl).mean()
    loss, terms = objective.loss(
        model, imgs, targets, GaussianNoise(SIGMA), torch.Generator().manual_seed(SEED)
    )
    assert loss.item() == pytest.approx(ce + 2.0 * mix, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert terms["smoothmix_mix"].item() == pytest.approx(mix, abs=1e-5)
    assert terms["smoothmix_correct"].item() == pytest.approx(correct.mean())


def test_warm_up_and_validation():
    """at_epoch applies the authors' linear warm-ups (0-based epochs); loss refuses a pending warm-up; bad
    settings are refused in one line; step_size null takes the authors' value at the noise's sigma."""
    adv = SmoothAdv(epsilon=0.5, warmup=10)
    assert adv.at_epoch(0) == SmoothAdv(epsilon=0.05, warmup=0)
    assert adv.at_epoch(4).epsilon == pytest.approx(0.25) and adv.at_epoch(9).epsilon == 0.5
    assert adv.at_epoch(50) == SmoothAdv(epsilon=0.5, warmup=0)
    assert SmoothAdv(warmup=0).at_epoch(0) == SmoothAdv(warmup=0)
    mix = SmoothMix(step_size=1.0, eta=5.0, mix_step=1, warmup=4)
    assert mix.at_epoch(0) == SmoothMix(step_size=1.0, eta=1.25, mix_step=1, mix_max_norm=0.25, warmup=0)
    assert mix.at_epoch(3) == SmoothMix(step_size=1.0, eta=5.0, mix_step=1, mix_max_norm=1.0, warmup=0)
    imgs, targets = batch()
    for objective in (adv, mix):
        with pytest.raises(ValueError, match=r"at_epoch\(epoch\)"):
            objective.loss(tiny_model(), imgs, targets, GaussianNoise(SIGMA), None)
    for bad in (dict(epsilon=-1.0), dict(steps=0), dict(samples=1.5), dict(warmup=True)):
        with pytest.raises(ValueError, match="^smoothadv needs .*got [^\n]*$"):
            SmoothAdv(**bad)
    for bad in (dict(mix_step=4), dict(step_size=0.0), dict(max_norm=-1.0), dict(samples=0)):
        with pytest.raises(ValueError, match="^smoothmix needs .*got [^\n]*$"):
            SmoothMix(**bad)
    assert SmoothMix.for_noise({}, GaussianNoise(1.0)) == SmoothMix(step_size=2.0)
    assert SmoothMix.for_noise({"step_size": 0.7}, GaussianNoise(1.0)) == SmoothMix(step_size=0.7)
    with pytest.raises(ValueError, match="no step size for sigma 0.12"):
        SmoothMix.for_noise({"step_size": None}, GaussianNoise(0.12))


@pytest.mark.parametrize("name", ["smoothadv", "smoothmix"])
def test_config_group_builds_the_objective_and_trains_the_vit(name, tmp_path):
    """objective=<name> composes with the digits fine-tuning (mixup off): the yaml is the objective's settings
    (defaults filled in), one loss on the micro ViT leaves no parameter gradient before backward and one after;
    with mixup on the module refuses in one line."""
    from dmae_lightning.training.objectives import OBJECTIVES

    if name not in OBJECTIVES:
        pytest.skip(f"{name} is not registered in training/objectives/__init__.py OBJECTIVES yet")
    overrides = ["experiment=finetune_digits", "task.module.mixup=null", f"objective={name}"]
    cfg = compose(CONF, "train", overrides, output_dir=tmp_path)
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "objective" / f"{name}.yaml"))
    assert OmegaConf.to_container(cfg.task.module.objective) == yaml
    module = instantiate(cfg.task.module, _convert_="all")
    settings = module.hparams["objective"]
    assert settings["name"] == name and set(settings) == set(yaml)
    if name == "smoothmix":
        assert settings["step_size"] == 0.5  # the authors' at sigma 0.25
    objective = module.objective.at_epoch(0)
    imgs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    module.train()
    loss, terms = objective.loss(module.model, imgs, targets, module.noise, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and module.model.training and terms["ce"] > 0
    assert all(p.grad is None for p in module.model.parameters())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())

    cfg = compose(CONF, "train", ["experiment=finetune_digits", f"objective={name}"], output_dir=tmp_path)
    cfg.task.module.mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 0.0}
    with pytest.raises(InstantiationException, match=f"objective {name} needs hard labels"):
        instantiate(cfg.task.module, _convert_="all")
