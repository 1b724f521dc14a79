"""DiscreteGaussianNoise: the sampled pmf, integer add and clip, the TV deduction, input checks, config, and
certificates that are sound on a classifier whose smoothed probability is known in closed form."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import beta, binom, chisquare, norm

from dmae_lightning.data import DigitsDataModule
from dmae_lightning.noise import D_MAX, DiscreteGaussianNoise, _discrete_gaussian_table, noise_from_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "noise"


def exact_pmf(sigma: float, levels: np.ndarray) -> np.ndarray:
    """P(i) = Phi((2i+1)/(510 sigma)) - Phi((2i-1)/(510 sigma)) in float64 (scipy), for integer levels i."""
    return norm.cdf((2 * levels + 1) / (510 * sigma)) - norm.cdf((2 * levels - 1) / (510 * sigma))


def noise_levels(noise: DiscreteGaussianNoise, num: int, seed: int, level: int = 128) -> np.ndarray:
    """``num`` noise levels i drawn by noisy_copies around a constant image at ``level`` (far from the clip)."""
    image = torch.full((1, 100, 100), level / 255)
    out = torch.empty(num // 10_000, 1, 100, 100)
    noise.noisy_copies(image, torch.Generator().manual_seed(seed), out)
    return (torch.round(out * 255).long() - level).flatten().numpy()


def chi_square_pvalue(samples: np.ndarray, sigma: float) -> float:
    """Pearson chi-square of the sampled levels against the exact pmf at ``sigma``, tail cells merged until
    every expected count is at least 5."""
    levels = np.arange(samples.min() - 1, samples.max() + 2)
    expected = exact_pmf(sigma, levels) * len(samples)
    observed = np.bincount(samples - levels[0], minlength=len(levels)).astype(float)
    keep = np.flatnonzero(expected >= 5)
    lo, hi = keep[0], keep[-1]
    # cells: everything up to lo, lo+1 .. hi-1, everything from hi (the exact tails beyond the range added)
    obs = np.concatenate([[observed[: lo + 1].sum()], observed[lo + 1 : hi], [observed[hi:].sum()]])
    exp = np.concatenate([[norm.cdf((2 * levels[lo] + 1) / (510 * sigma)) * len(samples)], expected[lo + 1 : hi],
                          [norm.sf((2 * levels[hi] - 1) / (510 * sigma)) * len(samples)]])
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_sampled_pmf_matches_the_exact_pmf(sigma):
    samples = noise_levels(DiscreteGaussianNoise(sigma), 1_000_000, seed=1)
    assert chi_square_pvalue(samples, sigma) > 1e-3
    # Power: the same samples against a 2% larger sigma are rejected (noncentrality ~ N * 2 (0.02)^2 = 800
    # on ~6 sigma * 255 * 2 cells), so the test above would see a wrong scale.
    assert chi_square_pvalue(samples, 1.02 * sigma) < 1e-9


def test_noisy_copies_are_integer_levels_over_255_and_clipped():
    noise = DiscreteGaussianNoise(0.5)
    image = torch.randint(0, 256, (3, 16, 16)) / 255  # [3,16,16]
    out = torch.empty(100, 3, 16, 16)
    noise.noisy_copies(image, torch.Generator().manual_seed(0), out)
    levels = torch.round(out.double() * 255)
    assert torch.equal(out, levels.float() / 255)  # exactly float32(level) / 255
    assert abs(float((levels - 255 * image.double()).std()) / 255 - 0.5) < 0.01
    low, high = noise.clip
    assert (low, high) == (-255 * 3, 255 * 4)  # k = floor(6 * 0.5) = 3
    # perturb quantises off-grid training images and clips: far outside [0,1] everything lands on the clip
    x = torch.tensor([[-5.0, 5.0], [0.3, 0.7]])
    noisy = noise.perturb(x, torch.Generator().manual_seed(0))
    assert noisy[0].tolist() == [low / 255, pytest.approx(high / 255, abs=0)]
    assert torch.equal(noisy, torch.round(noisy.double() * 255).float() / 255)
    assert noisy.dtype == x.dtype


def test_noisy_copies_reproducible_from_the_generator_alone():
    noise = DiscreteGaussianNoise(0.25)
    image = torch.randint(0, 256, (3, 8, 8)) / 255
    draw = [noise.noisy_copies(image, torch.Generator().manual_seed(s), torch.empty(100, 3, 8, 8)) for s in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_noisy_copies_on_cuda():
    noise = DiscreteGaussianNoise(0.25)
    image = torch.full((1, 100, 100), 128 / 255, device="cuda")
    out = torch.empty(100, 1, 100, 100, device="cuda")
    noise.noisy_copies(image, torch.Generator(device="cuda").manual_seed(1), out)
    samples = (torch.round(out * 255).long() - 128).flatten().cpu().numpy()
    assert chi_square_pvalue(samples, 0.25) > 1e-3


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_tv_deduction_against_an_independent_exact_computation(sigma):
    noise = DiscreteGaussianNoise(sigma)
    thresholds, low, _ = _discrete_gaussian_table(sigma)
    # independent: rationals for the sampled pmf, erfc at 80 digits for the exact one
    with mpmath.workdps(80):
        def cdf(i):  # P(noise level <= i), tails merged into the end levels
            return mpmath.erfc(-(2 * i + 1) / (510 * mpmath.mpf(sigma)) / mpmath.sqrt(2)) / 2

        edges = [Fraction(0), *(Fraction(t, 2**62) for t in thresholds), Fraction(1)]
        exact = [mpmath.mpf(0), *(cdf(i) for i in range(low, -low)), mpmath.mpf(1)]
        tv = sum(abs(mpmath.mpf(b.numerator) / b.denominator - mpmath.mpf(a.numerator) / a.denominator - (y - x))
                 for a, b, x, y in zip(edges, edges[1:], exact, exact[1:])) / 2
    assert noise.tv >= tv and noise.tv == pytest.approx(float(tv), rel=1e-12)
    assert noise.tv <= len(edges) * 2.0**-63  # each threshold off by at most half a step
    assert noise.deduction >= D_MAX * tv and noise.deduction == pytest.approx(D_MAX * float(tv), rel=1e-12)
    assert 0 < noise.deduction < 1e-8


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_radius_and_probability_for_radius_are_inverse_with_the_deduction(sigma):
    noise = DiscreteGaussianNoise(sigma)
    for p in (0.6, 0.9, 0.999):
        assert noise.radius(p) == pytest.approx(sigma * norm.ppf(p - D_MAX * noise.tv), rel=1e-12)
        assert noise.radius(p) < sigma * norm.ppf(p)
        assert noise.probability_for_radius(noise.radius(p)) == pytest.approx(p, abs=1e-14)
    assert noise.probability_for_radius(0.0) == 0.5 + noise.deduction
    assert noise.radius(0.5) < 0 and noise.radius(0.5 + 2 * noise.deduction) > 0


def test_check_input_refuses_off_grid_and_oversized_images():
    noise = DiscreteGaussianNoise(0.25)
    noise.check_input(torch.randint(0, 256, (3, 32, 32)) / 255)
    noise.check_input(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8).double() / 255)
    with pytest.raises(ValueError, match=r"8-bit images \(pixels k/255, e.g. CIFAR-10/ImageNet, .*this one is 0.00196 off"):
        noise.check_input(torch.full((3, 4, 4), 0.5))
    digits = DigitsDataModule().dataset("test")[0][0]  # [3,32,32]: 1/16 steps, bilinearly upsampled
    levels = digits.double().numpy() * 255
    off = np.abs(levels - np.round(levels)).max() / 255
    with pytest.raises(ValueError, match=rf"not the bundled digits\): this one is {off:.3g} off") as err:
        noise.check_input(digits)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"more than the {D_MAX}"):
        noise.check_input(torch.zeros(1).expand(3, 2400, 2400))
    with pytest.raises(ValueError, match=f"more than the {D_MAX}"):
        noise.noisy_copies(torch.zeros(1).expand(3, 2400, 2400), torch.Generator(), torch.empty(0, 3, 2400, 2400))
    with pytest.raises(ValueError, match="noise.sigma must be a finite number > 0"):
        DiscreteGaussianNoise(0.0)


@pytest.mark.parametrize(("sigma", "eta"), [(0.25, 0.5), (0.5, 0.5), (1.0, 0.1)])
def test_config_round_trip_and_yaml(sigma, eta):
    noise = DiscreteGaussianNoise(sigma)
    assert noise_from_config(noise.config()) == noise
    assert noise.tag == f"discrete_sigma{sigma}"
    cfg = OmegaConf.load(CONF / f"discrete_gaussian_sigma_{sigma}.yaml")
    assert noise_from_config(OmegaConf.to_container(cfg.noise)) == noise
    assert cfg.consistency.eta == eta


def certify_threshold_classifier(sample_noise, cert_noise, n0=100, n=1000, alpha=0.05):
    """Cohen's CERTIFY by Monte Carlo on f(x) = 1[x_0 > (B + 1/2)/255] at many images (level B + m in
    coordinate 0); returns (number of non-abstaining certificates, number of false ones).

    For h = f o clip o round smoothed with the continuous N(0, sigma^2) (which the discrete noise samples
    exactly on the grid), p_1(x) = Phi((x_0 - (B + 1/2)/255) / sigma): the classifier is linear, so Cohen's
    radius at the exact p is the exact distance |level - B - 1/2| / 255 to the decision boundary, and a
    certificate is false iff it claims a larger radius.
    """
    base = 127
    certified = false = 0
    for point, m in enumerate(range(-95, 97)):
        for repeat in range(2):
            image = torch.tensor([base + m, 50.0]).reshape(1, 1, 2) / 255  # [1,1,2]; coordinate 1 is ignored

            def count_ones(stage, num, image=image, point=point, repeat=repeat):
                ones = 0
                for block in range(num // 100):
                    g = torch.Generator().manual_seed(((point * 2 + repeat) * 2 + stage) * 100 + block)
                    out = sample_noise.noisy_copies(image, g, torch.empty(100, 1, 1, 2))
                    ones += int((torch.round(out[:, 0, 0, 0] * 255) > base).sum())
                return ones

            guess = int(count_ones(0, n0) > n0 / 2)
            ones = count_ones(1, n)
            n_a = ones if guess == 1 else n - ones
            p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0  # one-sided Clopper-Pearson
            if p_lower < 0.5:
                continue  # abstain
            certified += 1
            radius = cert_noise.radius(p_lower)
            distance = (m - 0.5) / 255 if guess == 1 else (0.5 - m) / 255  # negative: the guess is wrong
            false += int(radius > distance)
    return certified, false


def test_certificates_sound_on_a_closed_form_classifier():
    noise = DiscreteGaussianNoise(0.25)
    certified, false = certify_threshold_classifier(noise, noise)
    assert certified > 250
    # each certificate is false with probability <= alpha: allow the 0.999 quantile of Binomial(N, alpha)
    assert false <= binom.ppf(0.999, certified, 0.05)
    # the check has power: noise 20% too small (sampling sigma 0.2, certifying with 0.25) is caught
    certified, false = certify_threshold_classifier(DiscreteGaussianNoise(0.2), noise)
    assert false > binom.ppf(0.999, certified, 0.05)


def test_grid_rounding_commutes_with_adding_on_grid_images():
    """The key fact: for x on the grid, x + round_grid(eps) = round_grid(x + eps) (float64, exact levels)."""
    rng = np.random.default_rng(0)
    levels, eps = rng.integers(0, 256, 100_000), rng.normal(0, 0.25, 100_000)
    assert np.array_equal(levels + np.round(eps * 255), np.round((levels / 255 + eps) * 255))
    assert math.isclose(exact_pmf(0.25, np.arange(-2000, 2001)).sum(), 1.0, rel_tol=1e-12)


class ThresholdClassifier(torch.nn.Module):
    """Logits [B, 2] of f(x) = 1[x_0 > (127 + 1/2)/255] for x [B, 1, 1, 2]."""

    def forward(self, x):
        ones = (x[:, 0, 0, 0] > 127.5 / 255).float()  # [B]
        return torch.stack([1 - ones, ones], dim=1)


def test_the_projects_smooth_certifies_with_it_and_refuses_off_grid_images():
    from dmae_lightning.certification import Smooth

    smooth = Smooth(ThresholdClassifier(), 2, DiscreteGaussianNoise(0.25))
    x = torch.tensor([127 + 40, 50.0]).reshape(1, 1, 2) / 255  # exact radius (40 - 1/2) / 255 = 0.1549
    guess, radius = smooth.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=1000)
    assert guess == 1 and 0.13 < radius < 39.5 / 255
    with pytest.raises(ValueError, match="off the 1/255 grid"):
        smooth.certify(x + 0.4 / 255, n0=100, n=10_000, alpha=0.001, batch_size=1000)
