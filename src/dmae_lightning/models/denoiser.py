"""DMAE as a Gaussian denoiser in front of any classifier (denoised smoothing, Salman et al. 2020).

``Denoised(DMAEDenoiser(dmae, sigma), classifier)`` is a base classifier f for
:class:`dmae_lightning.certification.Smooth`: noisy [B, 3, H, W] images in [0,1] pixel space at native
resolution -> the DMAE with nothing masked -> reconstruction in [0,1] pixels -> ``classifier`` -> logits.

Pixel values from a ``norm_pix_loss`` DMAE. Its decoder predicts each patch normalised by the clean patch's own
mean and variance (in the model's ImageNet-normalised space, unbiased variance, eps 1e-6), which the input does
not give. They are estimated from the noisy patch: with n the noise in the model's space (after resize and
normalisation, independent of the image), ``mean(x + n)`` is an unbiased estimate of ``mean(x)``, and
``E[var(x + n)] = var(x) + E[var(n)]``, so ``max(var(x + n) - E[var(n)], 0)`` estimates ``var(x)``.
``E[var(n)]`` is computed exactly (:func:`patch_noise_variance`) for i.i.d. noise of standard deviation
``sigma`` per pixel in [0,1] space at the input's resolution, through the model's bicubic resize and ImageNet
normalisation: ``sigma`` must be that of the noise the images carry (the smoothing noise), not the DMAE's
training noise. A DMAE pre-trained without ``norm_pix_loss`` predicts the normalised pixels themselves and
needs no statistics.

Soundness: the denoiser draws nothing (no masking at ratio 0, hence no shuffle), so f is a deterministic
function of each image alone, and Cohen et al.'s certificate holds for it as for any base classifier; ``sigma``
only changes how good the reconstruction is, never whether a certificate is valid.
Imports: torch, timm's data config, and from this package :mod:`.dmae`, :mod:`.layers`, :mod:`.weights` and the
package's ``create_model`` (so the package does not re-export this module: :mod:`.weights` imports the package).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmae_lightning.models import create_model
from dmae_lightning.models.dmae import DMAEViT
from dmae_lightning.models.layers import IMAGENET_MEAN, IMAGENET_STD
from dmae_lightning.models.weights import checkpoint_state_dict, load_weights, read_checkpoint

NORM_PIX_EPS = 1.0e-6  # the eps of DMAEViT.target_patches


def denormalise_patches(
    pred: torch.Tensor, noisy_patches: torch.Tensor, noise_variance: torch.Tensor | float
) -> torch.Tensor:
    """Per-patch-normalised predictions [B, L, P] -> patches [B, L, P] in the model's normalised space, with the
    clean statistics estimated from the noisy patches [B, L, P] (same space) and the noise's expected
    within-patch (unbiased) variance ``noise_variance`` ([L] or a number):
    ``pred * sqrt(max(var(noisy) - noise_variance, 0) + eps) + mean(noisy)``."""
    mean = noisy_patches.mean(dim=-1, keepdim=True)  # [B, L, 1]
    var = noisy_patches.var(dim=-1, keepdim=True)  # [B, L, 1], unbiased as in target_patches
    if isinstance(noise_variance, torch.Tensor):
        noise_variance = noise_variance.to(var.dtype).view(1, -1, 1)  # [1, L, 1]
    clean_var = (var - noise_variance).clamp(min=0.0)  # [B, L, 1]
    return pred * (clean_var + NORM_PIX_EPS).sqrt() + mean  # [B, L, P]


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64: the 1-D bicubic resize of :class:`~.layers.PixelInput` along one axis (its 2-D
    resize is separable, and each row's weights sum to 1, so a basis image constant along the other axis
    gives one column)."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2)
    out = F.interpolate(basis, size=(n_out, 2), mode="bicubic", align_corners=False)  # [n_in, 1, n_out, 2]
    return out[:, 0, :, 0].T.contiguous()  # [n_out, n_in]


@lru_cache(maxsize=16)
def _patch_noise_variance(
    sigma: float, height: int, width: int, img_size: int, patch_size: int
) -> torch.Tensor:
    ry, rx = _resize_matrix(height, img_size), _resize_matrix(width, img_size)  # [S, H], [S, W]
    g, p = img_size // patch_size, patch_size
    ry_p, rx_p = ry.view(g, p, height), rx.view(g, p, width)  # the rows of each patch row / column
    # per patch row u: sum over its pixel rows of ||Ry[a]||^2, and ||sum of its rows||^2 (same for columns)
    sq_y, sum_y = ry_p.pow(2).sum(dim=(1, 2)), ry_p.sum(dim=1).pow(2).sum(dim=1)  # [g], [g]
    sq_x, sum_x = rx_p.pow(2).sum(dim=(1, 2)), rx_p.sum(dim=1).pow(2).sum(dim=1)  # [g], [g]
    inv_var = sum(1.0 / s**2 for s in IMAGENET_STD)  # channels: independent noise, scaled by 1/std_c
    total_var = inv_var * torch.outer(sq_y, sq_x)  # [g, g]: sum of the patch's pixel variances / sigma^2
    var_of_sum = inv_var * torch.outer(sum_y, sum_x)  # [g, g]: variance of the patch's sum / sigma^2
    m = 3 * p * p
    return (sigma**2 * (total_var - var_of_sum / m) / (m - 1)).flatten()  # [L] (row-major, as patchify)


def patch_noise_variance(
    sigma: float, height: int, width: int, img_size: int, patch_size: int
) -> torch.Tensor:
    """[L] float64: for i.i.d. noise N(0, sigma^2) per pixel of a [3, height, width] image in [0,1] space, the
    expected unbiased variance of the noise over each patch of ``pixel_input(noise)`` (bicubic resize to
    ``img_size``, then division by the ImageNet std): ``(sum_i Var n_i - Var(sum_i n_i) / m) / (m - 1)`` over
    the patch's m = 3 p^2 values. Without resize it is ``sigma^2 * mean_c 1/std_c^2`` for every patch."""
    return _patch_noise_variance(
        float(sigma), int(height), int(width), int(img_size), int(patch_size)
    ).clone()


class DMAEDenoiser(nn.Module):
    """``recon = DMAEDenoiser(dmae, sigma)(noisy)``: [B, 3, H, W] noisy images in [0,1] pixel space (native size,
    not clamped) -> [B, 3, S, S] reconstructions in [0,1] at the DMAE's input size S.

    ``sigma``: the standard deviation per pixel of the noise the inputs carry ([0,1] units, native resolution;
    for the smoothing noise, its ``sigma``). Only used to de-normalise a ``norm_pix_loss`` DMAE's prediction.
    The statistics and the de-normalisation run in float32 also under autocast (a variance difference in bf16
    would lose most of its digits)."""

    mean: torch.Tensor  # [1, 3, 1, 1] buffers
    std: torch.Tensor

    def __init__(self, dmae: DMAEViT, sigma: float):
        super().__init__()
        if not isinstance(dmae, DMAEViT):
            raise TypeError(f"the denoiser needs a DMAEViT (a dmae_* model), got {type(dmae).__name__}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
            raise ValueError(
                f"sigma must be a number >= 0 (the input noise's std in [0,1] units), got {sigma!r}"
            )
        self.dmae, self.sigma = dmae, float(sigma)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._noise_variance: dict[tuple, torch.Tensor] = {}

    def noise_variance(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[L] float32 on ``device``: :func:`patch_noise_variance` for inputs of this size (cached)."""
        key = (height, width, str(device))
        if key not in self._noise_variance:
            value = patch_noise_variance(self.sigma, height, width, self.dmae.img_size, self.dmae.patch_size)
            self._noise_variance[key] = value.to(device=device, dtype=torch.float32)
        return self._noise_variance[key]

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        pred = self.dmae.denoise_patches(noisy)  # [B, L, p*p*3], maybe bf16 under autocast
        with torch.autocast(noisy.device.type, enabled=False):
            pred = pred.float()
            if self.dmae.norm_pix_loss:
                patches = self.dmae.patchify(self.dmae.pixel_input(noisy.float()))  # [B, L, p*p*3]
                variance = self.noise_variance(noisy.shape[-2], noisy.shape[-1], noisy.device)  # [L]
                pred = denormalise_patches(pred, patches, variance)
            pixels = self.dmae.unpatchify(pred) * self.std + self.mean  # [B, 3, S, S] in [0,1] units
            return pixels.clamp(0.0, 1.0)


class Denoised(nn.Module):
    """The base classifier ``classifier(prepare(denoiser(x)))`` for :class:`~dmae_lightning.certification.Smooth`.

    ``denoiser``: [B, 3, H, W] -> [B, 3, S, S] in [0,1] (a :class:`DMAEDenoiser`). ``size``: resize the
    reconstruction (bicubic, antialiased when shrinking, clamped to [0,1] again) to ``size`` x ``size`` before
    the classifier (None: as it comes). ``mean``/``std``: normalise for a classifier that expects normalised
    inputs (a timm model: :meth:`for_timm` reads them from its pretrained config); our classifiers take [0,1]
    pixels (leave them None). Put it in eval mode (``.eval()``), as every base classifier."""

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(
        self,
        denoiser: nn.Module,
        classifier: nn.Module,
        size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("pass both mean= and std= (the classifier's input normalisation) or neither")
        self.denoiser, self.classifier, self.size = denoiser, classifier, size
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), False)

    @classmethod
    def for_timm(cls, denoiser: nn.Module, classifier: nn.Module) -> Denoised:
        """A timm classifier behind the denoiser, with its own input size and normalisation."""
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(classifier)
        size = int(config["input_size"][-1])
        return cls(denoiser, classifier, size, tuple(config["mean"]), tuple(config["std"]))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.denoiser(imgs)  # [B, 3, S, S] in [0,1]
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            shrink = self.size < min(x.shape[-2:])
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=shrink).clamp(0, 1)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return self.classifier(x)  # [B, K]


def load_denoiser(path: str | Path, sigma: float, model_name: str | None = None) -> DMAEDenoiser:
    """A :class:`DMAEDenoiser` (eval mode) from a pre-training checkpoint: ours (its architecture and
    ``norm_pix_loss`` come from its hyper-parameters) or an official DMAE release (``model_name``, e.g.
    ``dmae_vit_base_patch16``; the releases use ``norm_pix_loss``). ``sigma``: the noise the inputs will carry."""
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    kwargs: dict = {}
    if isinstance(hparams, dict) and "model_name" in hparams:
        model_name = model_name or str(hparams["model_name"])
        kwargs = dict(hparams.get("model_kwargs") or {})
        kwargs["norm_pix_loss"] = bool(hparams.get("norm_pix_loss", True))
    if model_name is None:
        raise ValueError(
            f"{path} does not name its architecture: pass model_name (e.g. dmae_vit_base_patch16)"
        )
    if not model_name.startswith("dmae_"):
        raise ValueError(f"a denoiser needs a pre-training (dmae_*) model, got {model_name!r}")
    state, _ = checkpoint_state_dict(ckpt, path)
    if "decoder_pred.weight" not in state:
        raise ValueError(
            f"{path} has no decoder (a fine-tuned classifier?): a denoiser needs a pre-training file"
        )
    model = create_model(model_name, **kwargs)
    assert isinstance(model, DMAEViT)
    load_weights(model, path, ckpt)
    return DMAEDenoiser(model, sigma).eval()
