"""SmoothMix (Jeong et al., NeurIPS 2021, jh-jeong/smoothmix ``code/train.py``: ``train`` and
``SmoothMix_PGD``): self-mixup along the smoothed classifier's adversarial direction.

With m = ``samples`` noise vectors n_j per image (one draw, kept for the attack and both training passes):

1. attack, network in eval mode, no parameter gradient (as the authors: ``model.eval()`` and
   ``requires_grad_(model, False)``): from x_0 = x, ``steps`` = T steps
   x_{t+1} = clip_[0,1](proj(x_t + alpha * g / (||g||_2 + 1e-8))), g the gradient of
   -log G(x_t)_y (G the mean softmax over x_t + n_j, clamped at 1e-20), alpha = ``step_size``, proj the
   L2 ball of radius ``max_norm`` around x (none when null, the authors' default). The adversary is
   x_adv = x_T; the clean side is x_s, s = ``mix_step`` (0: x itself; 1: the "one-step adversary"),
   projected to the ball of radius ``mix_max_norm`` (null: alpha * s) and clipped;
2. loss = mean_{i,j} CE(f(x_i + n_j), y_i)
          + eta * mean_{i,j} 1[argmax F(x_i) = y_i] KL(y_mix,i || softmax f(x_mix,i + n_j)), with
   F(x_i) = mean_j softmax f(x_i + n_j) (the clean copies' logits, gradient kept as in the authors' code),
   lambda_i ~ U[0, 1/2] (``generator``), x_mix = (1 - lambda) x_s + lambda x_adv and
   y_mix = (1 - lambda) F(x) + lambda / K (toward uniform).

Warm-up (:meth:`SmoothMix.at_epoch`): eta and the clean side's radius times min(1, (epoch + 1) / warmup).
Imports: torch, the noise, :mod:`.base`, :mod:`.smoothadv`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmae_lightning.noise import Noise
from dmae_lightning.training.objectives.base import Objective, Terms
from dmae_lightning.training.objectives.smoothadv import eval_mode, noise_vectors, smoothed_log_probs


def _project(x: torch.Tensor, x0: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """x moved into the L2 ball of radius ``max_norm`` around x0 (per image, ``torch.renorm``; no ball when
    None), then clipped to [0,1]: the authors' ``_project``."""
    if max_norm is not None:
        x = x0 + (x - x0).renorm(p=2, dim=0, maxnorm=max_norm)
    return x.clamp(0, 1)


def smoothmix_pgd(
    model: nn.Module,
    imgs: torch.Tensor,
    labels: torch.Tensor,
    vectors: torch.Tensor,
    steps: int,
    step_size: float,
    mix_step: int,
    max_norm: float | None,
    mix_max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean side x_s, adversary x_T), both [B, C, H, W] in [0,1], of ``SmoothMix_PGD.attack`` (module
    docstring, step 1) with the noise ``vectors`` [m*B, C, H, W] (copy-major). Only the input's gradient is
    computed (``torch.autograd.grad``); call it with ``model`` in eval mode as :meth:`SmoothMix.loss` does."""
    m = vectors.shape[0] // imgs.shape[0]
    adv = imgs.detach()
    init = adv
    with torch.enable_grad():
        for step in range(steps):
            if step == mix_step:
                init = adv
            adv = adv.detach().requires_grad_(True)
            logits = model(adv.repeat(m, 1, 1, 1) + vectors)  # [m*B, K]
            loss = F.nll_loss(smoothed_log_probs(logits, m), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [adv])
            norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (imgs.dim() - 1))  # [B, 1, 1, 1]
            adv = _project(adv.detach() + step_size * grad / (norms + 1e-8), imgs, max_norm)
    return _project(init, imgs, mix_max_norm).detach(), adv.detach()


def smoothmix_mix(
    clean: torch.Tensor, adv: torch.Tensor, probs: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_mix, y_mix) = ((1 - lam) clean + lam adv, (1 - lam) probs + lam / K): the authors' ``_mixup_data``,
    images [B, C, H, W], the smoothed clean prediction ``probs`` [B, K] and lam [B]."""
    weight = lam.view(-1, *[1] * (clean.dim() - 1))
    mixed = (1 - weight) * clean + weight * adv
    mixed_targets = (1 - lam).view(-1, 1) * probs + lam.view(-1, 1) / probs.shape[1]
    return mixed, mixed_targets


@dataclass(frozen=True)
class SmoothMix(Objective):
    """The SmoothMix loss (module docstring); hard labels targets.argmax(1) for the attack and the correctness
    indicator, the soft targets for the cross-entropy. Defaults: the authors' CIFAR-10 recipe (EXPERIMENTS.MD):
    m = 2, T = 4, eta = 5, mix_step 0 (1: "SmoothMix + one-step adversary"), step size alpha = 0.5 / 1.0 / 2.0
    at sigma 0.25 / 0.5 / 1.0 (``step_size: null``, :data:`PAPER_STEP_SIZE`), no ball on the adversary,
    warm-up 10 epochs."""

    name: ClassVar[str] = "smoothmix"
    allows_mixup: ClassVar[bool] = False  # the authors mix only along the adversarial direction
    PAPER_STEP_SIZE: ClassVar[dict[float, float]] = {0.25: 0.5, 0.5: 1.0, 1.0: 2.0}  # by training sigma
    BY_SIGMA: ClassVar[Mapping[str, tuple[str, Mapping[float, float]]]] = {
        "step_size": ("step size", PAPER_STEP_SIZE)
    }
    samples: int = 2
    steps: int = 4
    step_size: float = 0.5
    eta: float = 5.0
    mix_step: int = 0
    max_norm: float | None = None
    mix_max_norm: float | None = None
    warmup: int = 10

    def __post_init__(self) -> None:
        ints = (self.samples, self.steps, self.mix_step, self.warmup)
        norms = [v for v in (self.max_norm, self.mix_max_norm) if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) or not (
            self.samples >= 1
            and self.steps >= 1
            and 0 <= self.mix_step < self.steps
            and self.warmup >= 0
            and self.step_size > 0
            and self.eta >= 0
            and all(v >= 0 for v in norms)
        ):
            raise ValueError(
                f"smoothmix needs integers samples >= 1, steps >= 1, 0 <= mix_step < steps, warmup >= 0, "
                f"step_size > 0, eta >= 0 and max norms >= 0 or null, got samples={self.samples!r}, "
                f"steps={self.steps!r}, mix_step={self.mix_step!r}, warmup={self.warmup!r}, "
                f"step_size={self.step_size!r}, eta={self.eta!r}, max_norm={self.max_norm!r}, "
                f"mix_max_norm={self.mix_max_norm!r}"
            )

    @property
    def mix_radius(self) -> float:
        """The clean side's ball: ``mix_max_norm``, or step_size * mix_step when null (the authors' maxnorm_s)."""
        return self.step_size * self.mix_step if self.mix_max_norm is None else self.mix_max_norm

    def at_epoch(self, epoch: int) -> SmoothMix:
        """The objective of (0-based) epoch ``epoch``: eta and the clean side's radius times
        min(1, (epoch + 1) / warmup) as in train.py, and warmup 0 (the warm-up applied); itself without warm-up."""
        if self.warmup == 0:
            return self
        scale = min(1.0, (epoch + 1) / self.warmup)
        return dataclasses.replace(self, eta=self.eta * scale, mix_max_norm=self.mix_radius * scale, warmup=0)

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
                f"smoothmix warms eta up over {self.warmup} epochs: train with objective.at_epoch(epoch)"
            )
        m, labels = self.samples, targets.argmax(1)
        vectors = noise_vectors(imgs, noise, m, generator)  # [m*B, C, H, W]
        with eval_mode(model):
            clean_side, adv = smoothmix_pgd(
                model,
                imgs,
                labels,
                vectors,
                self.steps,
                self.step_size,
                self.mix_step,
                self.max_norm,
                self.mix_radius,
            )
        logits = model(imgs.repeat(m, 1, 1, 1) + vectors).float()  # [m*B, K]
        ce = F.cross_entropy(logits, targets.repeat(m, 1))
        probs = F.softmax(logits, dim=1).unflatten(0, (m, -1)).mean(dim=0)  # F(x) [B, K]
        correct = (probs.argmax(1) == labels).float()  # [B]
        lam = torch.rand(len(imgs), generator=generator, device=imgs.device, dtype=imgs.dtype) / 2
        mixed, mixed_targets = smoothmix_mix(clean_side, adv, probs, lam)
        log_q = F.log_softmax(model(mixed.repeat(m, 1, 1, 1) + vectors).float(), dim=1)  # [m*B, K]
        kl = F.kl_div(log_q, mixed_targets.repeat(m, 1), reduction="none").sum(1)  # [m*B]
        mix = (correct.repeat(m) * kl).mean()
        return ce + self.eta * mix, {"ce": ce, "smoothmix_mix": mix, "smoothmix_correct": correct.mean()}
