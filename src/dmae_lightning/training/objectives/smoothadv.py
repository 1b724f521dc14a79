"""SmoothAdv (Salman et al., NeurIPS 2019, Hadisalman/smoothing-adversarial ``code/train_pgd.py`` and
``code/attacks.py`` ``PGD_L2``): adversarial training of the smoothed classifier.

An L2 PGD attack of ``steps`` steps on the soft smoothed classifier G(x') = mean_j softmax(f(x' + n_j)), with
``samples`` = m noise vectors n_j per image drawn once and kept for every step, maximises -log G(x')_y over
||x' - x||_2 <= epsilon; the network then trains with cross-entropy on x' + n_j, the attack's own noise vectors
(all m of them with ``multi_noise``, only n_1 without). As the authors do, the attack runs with the network in
eval mode (no dropout, no drop path, BatchNorm on its running statistics) and touches no parameter gradient;
the network's modes are restored afterwards. Epsilon warms up over the first ``warmup`` epochs
(:meth:`SmoothAdv.at_epoch`). Imports: torch, the noise, :mod:`.base`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmae_lightning.noise import Noise
from dmae_lightning.training.objectives.base import Objective, Terms


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, every submodule's own mode (train or eval) restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def noise_vectors(
    imgs: torch.Tensor, noise: Noise, m: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``m`` noise vectors per image, [m*B, C, H, W] copy-major (vector j of image i at row j*B + i), drawn as
    ``noise.perturb`` of zero images: one draw, kept for every attack step and the training step."""
    return noise.perturb(torch.zeros_like(imgs).repeat(m, 1, 1, 1), generator)


def smoothed_log_probs(logits: torch.Tensor, m: int) -> torch.Tensor:
    """log G: the log of the mean over the ``m`` copies of softmax(logits), clamped at 1e-20 as the authors do;
    logits [m*B, K] copy-major -> [B, K], in float32."""
    probs = F.softmax(logits.float(), dim=1).unflatten(0, (m, -1)).mean(dim=0)
    return probs.clamp_min(1e-20).log()


def smoothadv_pgd(
    model: nn.Module,
    imgs: torch.Tensor,
    labels: torch.Tensor,
    vectors: torch.Tensor,
    epsilon: float,
    steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Salman et al.'s ``PGD_L2`` on the smoothed classifier: x' [B, C, H, W] within ``epsilon`` (L2, per image)
    of ``imgs`` and in [0,1], from delta = 0 (the authors' attack has no random start), ``steps`` steps of size
    2 * epsilon / steps along the per-image normalised gradient of -mean_i log G(x_i + delta_i)_{y_i}, G the
    mean softmax over the noise ``vectors`` [m*B, C, H, W] (copy-major); after each step x + delta is clipped
    to [0,1] and delta renormed to the ball (``torch.renorm``). A zero gradient row steps along -z, z standard
    normal (the authors' fallback), z drawn from ``generator`` at every step (no host sync).

    Call it in a training step as :meth:`SmoothAdv.loss` does: ``model`` in eval mode (:func:`eval_mode`);
    only delta's gradient is computed (``torch.autograd.grad``), no parameter's ``.grad`` changes."""
    m = vectors.shape[0] // imgs.shape[0]
    step_size = 2 * epsilon / steps
    delta = torch.zeros_like(imgs)
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model((imgs + delta).repeat(m, 1, 1, 1) + vectors)  # [m*B, K]
            loss = F.nll_loss(smoothed_log_probs(logits, m), labels)  # -mean_i log G(x')_y
            (grad,) = torch.autograd.grad(loss, [delta])
            norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (imgs.dim() - 1))  # [B, 1, 1, 1]
            fallback = torch.randn(imgs.shape, generator=generator, device=imgs.device, dtype=imgs.dtype)
            direction = torch.where(norms > 0, grad / norms, -fallback)
            delta = delta.detach() + step_size * direction
            delta = (imgs + delta).clamp(0, 1) - imgs
            delta = delta.renorm(p=2, dim=0, maxnorm=epsilon)
    return (imgs + delta).detach()


@dataclass(frozen=True)
class SmoothAdv(Objective):
    """Cross-entropy on x' + n_j, x' = :func:`smoothadv_pgd` of the batch (hard labels targets.argmax(1) for the
    attack; the soft targets for the cross-entropy). Defaults: the authors' README recipe for CIFAR-10
    (SmoothAdv_PGD, T = 10, epsilon = 64/256, m = 2 with multi-noise training, epsilon warmed up over 10
    epochs); their grids: m in {1, 2, 4, 8}, T in {1, 2, 4, 6, 8, 10}, epsilon in {64, 127, 255, 512}/256."""

    name: ClassVar[str] = "smoothadv"
    allows_mixup: ClassVar[bool] = False  # the authors train on hard labels, no mixup
    epsilon: float = 0.25
    steps: int = 10
    samples: int = 2
    multi_noise: bool = True
    warmup: int = 10

    def __post_init__(self) -> None:
        ints = (self.steps, self.samples, self.warmup)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) or not (
            self.epsilon >= 0 and self.steps >= 1 and self.samples >= 1 and self.warmup >= 0
        ):
            raise ValueError(
                f"smoothadv needs epsilon >= 0, integers steps >= 1, samples >= 1, warmup >= 0, got "
                f"epsilon={self.epsilon!r}, steps={self.steps!r}, samples={self.samples!r}, warmup={self.warmup!r}"
            )

    def at_epoch(self, epoch: int) -> SmoothAdv:
        """The objective of (0-based) epoch ``epoch``: epsilon min(epsilon, (epoch + 1) * epsilon / warmup) as in
        train_pgd.py, and warmup 0 (the warm-up applied); itself without warm-up."""
        if self.warmup == 0:
            return self
        epsilon = min(self.epsilon, (epoch + 1) * self.epsilon / self.warmup)
        return dataclasses.replace(self, epsilon=epsilon, warmup=0)

    def loss(
        self,
        model: nn.Module,
        imgs: torch.Tensor,
        targets: torch.Tensor,
        noise: Noise,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, Terms]:
        if self.warmup:
            raise ValueError(
                f"smoothadv warms epsilon up over {self.warmup} epochs: train with objective.at_epoch(epoch)"
            )
        m = self.samples
        vectors = noise_vectors(imgs, noise, m, generator)  # [m*B, C, H, W]
        with eval_mode(model):
            adv = smoothadv_pgd(model, imgs, targets.argmax(1), vectors, self.epsilon, self.steps, generator)
        if self.multi_noise:
            inputs, copy_targets = adv.repeat(m, 1, 1, 1) + vectors, targets.repeat(m, 1)
        else:  # the first noise vector of each image only
            inputs, copy_targets = adv + vectors[: len(imgs)], targets
        ce = F.cross_entropy(model(inputs).float(), copy_targets)
        distance = (adv - imgs).flatten(1).norm(dim=1).mean()
        return ce, {"ce": ce, "smoothadv_distance": distance}
