"""The DMAE as a denoiser in front of any classifier (models/denoiser.py, issue 25 section 3): reconstruction
at mask ratio 0 without a random draw, de-normalisation of norm_pix_loss predictions with the noisy patch's
statistics, and the composite as a base classifier certified by every procedure."""

from __future__ import annotations

import math
import statistics

import pytest
import timm
import torch
import torch.nn.functional as F

from dmae_lightning.certification import AttackPredict, Certify, CertifyRadii, Predict, Smooth
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.models import DMAEViT, create_model
from dmae_lightning.models.denoiser import (
    Denoised,
    DMAEDenoiser,
    denormalise_patches,
    patch_noise_variance,
)
from dmae_lightning.models.layers import IMAGENET_STD
from dmae_lightning.noise import GaussianNoise

SIGMA = 0.25


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The conftest's one intra-op thread (tiny models on a shared CPU)."""


@pytest.fixture(scope="module")
def dmae() -> DMAEViT:
    torch.manual_seed(0)
    model = create_model("dmae_vit_micro_patch8")
    assert isinstance(model, DMAEViT)
    return model.eval()


@pytest.fixture(scope="module")
def base(dmae):
    torch.manual_seed(1)
    classifier = create_model("vit_micro_patch8", num_classes=10, head_init_std=0.5)
    return Denoised(DMAEDenoiser(dmae, SIGMA), classifier).eval()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    index = torch.from_numpy(dm.indices["test"][:8])
    return dm.images[index], dm.labels[index]  # [8, 3, 32, 32] in [0,1], [8]


def noisy(images: torch.Tensor, seed: int = 0, sigma: float = SIGMA) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return images + sigma * torch.randn(images.shape, generator=g)  # not clamped, as the sampler's


def test_mask_ratio_0_is_the_reconstruction_in_patch_order(dmae, digits):
    """denoise_patches = reconstruct(mask_ratio=0) with the identity order, bit for bit; a random shuffle
    only changes the float summation order (attention is permutation-equivariant)."""
    x = digits[0][:3]
    xn = noisy(x)
    length = dmae.grid_size**2
    with torch.no_grad():
        pred = dmae.denoise_patches(xn)
        _, in_order, mask = dmae.reconstruct(x, xn, 0.0, scores=torch.arange(float(length)).expand(3, -1))
        _, shuffled, _ = dmae.reconstruct(x, xn, 0.0, torch.Generator().manual_seed(3))
    assert pred.shape == (3, length, 8 * 8 * 3)
    assert torch.equal(pred, in_order) and not mask.any()
    torch.testing.assert_close(pred, shuffled, rtol=0, atol=1e-5)


def test_shapes_and_clamping(dmae, base, digits):
    denoiser = DMAEDenoiser(dmae, SIGMA)
    xn = noisy(digits[0][:4], sigma=1.0)  # far outside [0,1]
    with torch.no_grad():
        recon = denoiser(xn)
        small = denoiser(F.interpolate(xn, size=16))  # another native size: reconstructed at the model's
        logits = base(xn)
        resized = Denoised(denoiser, base.classifier, size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
        seen = []
        handle = resized.classifier.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        resized(xn)
        handle.remove()
    assert recon.shape == small.shape == (4, 3, 32, 32) and logits.shape == (4, 10)
    assert recon.min() >= 0 and recon.max() <= 1 and recon.dtype == torch.float32
    assert seen[0].shape == (4, 3, 24, 24)
    assert seen[0].min() >= (0 - 0.5) / 0.25 and seen[0].max() <= (1 - 0.5) / 0.25  # clamped, then normalised
    timm_model = timm.create_model(
        "resnet10t", num_classes=10
    )  # a timm classifier: its own size and normalisation
    for_timm = Denoised.for_timm(denoiser, timm_model)
    assert for_timm.size == 176 and for_timm.mean is not None and for_timm.std is not None
    assert for_timm.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    with torch.no_grad():
        assert for_timm.eval()(xn[:1]).shape == (1, 10)
    with pytest.raises(ValueError, match="sigma"):
        DMAEDenoiser(dmae, -0.1)
    with pytest.raises(TypeError, match="DMAEViT"):
        DMAEDenoiser(base.classifier, SIGMA)  # type: ignore[arg-type]


def test_deterministic_function_of_each_image(base, digits):
    """No random draw (the global RNG is untouched), bit-identical logits for the same batch, and an image's
    logits alone equal those in a batch of others up to float summation order (CPU matmul kernels may
    block a batch differently)."""
    xn = noisy(digits[0])
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = base(xn), base(xn.clone())
        alone = torch.cat([base(xn[i : i + 1]) for i in range(len(xn))])
        reversed_batch = base(xn.flip(0)).flip(0)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first, rtol=0, atol=1e-5)
    torch.testing.assert_close(reversed_batch, first, rtol=0, atol=1e-5)


def test_denormalisation_equals_a_float64_hand_computation():
    noisy_patch = [0.3, -0.2, 1.4, 0.9, 0.05, 0.7]
    pred = [-1.0, 0.5, 2.0, 0.0, -0.25, 1.5]
    noise_var = 0.1
    mean = sum(noisy_patch) / 6
    var = sum((v - mean) ** 2 for v in noisy_patch) / 5
    scale = math.sqrt(max(var - noise_var, 0.0) + 1e-6)
    expected = [p * scale + mean for p in pred]
    got = denormalise_patches(
        torch.tensor([[pred]], dtype=torch.float64),
        torch.tensor([[noisy_patch]], dtype=torch.float64),
        noise_var,
    )
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a noise variance above the patch's variance: the clean variance is clamped at 0, only the mean is left
    flat = denormalise_patches(torch.tensor([[pred]]), torch.tensor([[noisy_patch]]), torch.tensor([9.0]))
    assert flat.flatten().tolist() == pytest.approx([p * 1e-3 + mean for p in pred], abs=1e-6)
    assert statistics.variance(noisy_patch) == pytest.approx(var)


def test_patch_noise_variance_is_exact():
    """Without resize: sigma^2 * mean_c 1/std_c^2. With the model's bicubic upsampling (8 -> 16, patch 4): the
    expected unbiased within-patch variance from the full covariance of the resized noise."""
    no_resize = patch_noise_variance(SIGMA, 32, 32, 32, 8)
    expected = SIGMA**2 * sum(1 / s**2 for s in IMAGENET_STD) / 3
    assert no_resize.shape == (16,) and torch.allclose(
        no_resize, torch.full((16,), expected, dtype=torch.float64)
    )

    h, s, p, sigma = 8, 16, 4, 0.3
    basis = torch.eye(h * h, dtype=torch.float64).view(h * h, 1, h, h)
    resize = F.interpolate(basis, size=(s, s), mode="bicubic", align_corners=False).view(h * h, s * s).T
    cov = sigma**2 * resize @ resize.T  # [s*s, s*s], one channel
    m = 3 * p * p
    exact = []
    for u in range(s // p):
        for v in range(s // p):
            idx = [(u * p + i) * s + v * p + j for i in range(p) for j in range(p)]
            block = cov[idx][:, idx]
            total = sum(block.trace() / c**2 for c in IMAGENET_STD)
            of_sum = sum(block.sum() / c**2 for c in IMAGENET_STD)
            exact.append(float((total - of_sum / m) / (m - 1)))
    torch.testing.assert_close(
        patch_noise_variance(sigma, h, h, s, p), torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_variance_estimate_is_unbiased_through_the_pixel_input():
    """Monte Carlo through the model's own resize and normalisation (16 -> 32): var(noisy) - noise variance
    averages to var(clean), the noisy mean to the clean mean."""
    model = create_model("dmae_vit_micro_patch8")
    assert isinstance(model, DMAEViT)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    draws = clean + SIGMA * torch.randn(4000, 3, 16, 16, generator=g, dtype=torch.float64)
    patches = model.patchify(model.pixel_input(draws))  # [N, L, P] float64
    target = model.patchify(model.pixel_input(clean))  # [1, L, P]
    estimate = patches.var(dim=-1) - patch_noise_variance(SIGMA, 16, 16, 32, 8)  # [N, L]
    torch.testing.assert_close(estimate.mean(0), target.var(dim=-1)[0], rtol=0, atol=0.03)
    torch.testing.assert_close(patches.mean(dim=-1).mean(0), target.mean(dim=-1)[0], rtol=0, atol=0.01)
    wrong = patches.var(dim=-1).mean(0) - target.var(dim=-1)[0]  # without the correction: off by ~1.2 sigma^2
    assert float(wrong.min()) > 0.5


def test_oracle_decoder_denoises(dmae, digits, monkeypatch):
    """With a decoder that predicts the clean image's normalised patches exactly, the only error left is the
    estimated statistics: clean input and sigma 0 give the image back; noisy digits come back much closer to
    the clean ones than the noisy input, and the noise-variance correction helps."""
    x = digits[0]
    target = dmae.target_patches(dmae.pixel_input(x))  # what a perfect DMAE predicts for these images
    monkeypatch.setattr(dmae, "denoise_patches", lambda _noisy: target)
    with torch.no_grad():
        torch.testing.assert_close(DMAEDenoiser(dmae, 0.0)(x), x, rtol=0, atol=1e-5)
        xn = noisy(x)
        corrected = float(F.mse_loss(DMAEDenoiser(dmae, SIGMA)(xn), x))
        uncorrected = float(F.mse_loss(DMAEDenoiser(dmae, 0.0)(xn), x))
    assert corrected < float(F.mse_loss(xn, x)) / 10
    assert corrected < uncorrected / 2


def test_smooth_runs_every_procedure_reproducibly(base, digits):
    """Smooth(Denoised(...)) certifies as any base classifier: every procedure on 3 images, and the same
    records (counts and radii) on a second run with another batch size."""
    images = [(i, digits[0][i], int(digits[1][i])) for i in range(3)]
    smooth = Smooth(base, 10, GaussianNoise(SIGMA))
    procedures = [
        Certify(20, 100, 0.01),
        Predict(100, 0.01),
        CertifyRadii((0.0, 0.25), 200, 0.01),
        AttackPredict((0.0, 0.25), 50, 0.01, steps=2, samples=4),
    ]
    for procedure in procedures:
        first = smooth.run(procedure, images, batch_size=100)
        again = smooth.run(procedure, images, batch_size=64)
        assert [r.idx for r in first] == [0, 1, 2]
        strip = [{k: v for k, v in vars(r).items() if k != "time"} for r in first]
        assert strip == [{k: v for k, v in vars(r).items() if k != "time"} for r in again]
    record = smooth.certify_record(images[0][1], 20, 100, 0.01, 100, idx=0, label=images[0][2])
    assert record.n == 100 and 0 <= record.n_a <= 100
