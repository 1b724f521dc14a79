"""DiscreteGaussianNoise: the sampled pmf, integer add and clip, the TV deduction, input checks, config, and
certificates that are sound on a classifier whose smoothed probability is known in closed form."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from helpers import CONF
from omegaconf import OmegaConf
from scipy.stats import binom, chisquare, norm

from dmae_lightning.certification import Certify, Smooth, lower_confidence_bound
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.noise import (
    D_MAX,
    DiscreteGaussianNoise,
    GaussianNoise,
    _discrete_gaussian_table,
    noise_from_config,
)


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
    exp = np.concatenate(
        [
            [norm.cdf((2 * levels[lo] + 1) / (510 * sigma)) * len(samples)],
            expected[lo + 1 : hi],
            [norm.sf((2 * levels[hi] - 1) / (510 * sigma)) * len(samples)],
        ]
    )
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
    draw = [
        noise.noisy_copies(image, torch.Generator().manual_seed(s), torch.empty(100, 3, 8, 8))
        for s in (7, 7, 8)
    ]
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
        tv = (
            sum(
                abs(
                    mpmath.mpf(b.numerator) / b.denominator
                    - mpmath.mpf(a.numerator) / a.denominator
                    - (y - x)
                )
                for a, b, x, y in zip(edges, edges[1:], exact, exact[1:])
            )
            / 2
        )
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
    assert (
        noise.radius(0.0)
        == noise.radius(noise.deduction / 2)
        == GaussianNoise(sigma).radius(0.0)
        == -math.inf
    )


def test_check_input_refuses_off_grid_and_oversized_images():
    noise = DiscreteGaussianNoise(0.25)
    noise.check_input(torch.randint(0, 256, (3, 32, 32)) / 255)
    noise.check_input(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8).double() / 255)
    with pytest.raises(
        ValueError, match=r"8-bit images \(pixels k/255, e.g. CIFAR-10/ImageNet, .*this one is 0.00196 off"
    ):
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
        noise.noisy_copies(
            torch.zeros(1).expand(3, 2400, 2400), torch.Generator(), torch.empty(0, 3, 2400, 2400)
        )
    with pytest.raises(ValueError, match="noise.sigma must be a finite number > 0"):
        DiscreteGaussianNoise(0.0)


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_config_round_trip_and_yaml(sigma):
    noise = DiscreteGaussianNoise(sigma)
    assert noise_from_config(noise.config()) == noise
    assert noise.tag == f"discrete_sigma{sigma}"
    cfg = OmegaConf.load(CONF / "noise" / f"discrete_gaussian_sigma_{sigma}.yaml")
    assert noise_from_config(OmegaConf.to_container(cfg.noise)) == noise


class LevelSumClassifier(torch.nn.Module):
    """Logits [B, 2] of f(x) = 1[sum of the 8-bit levels of x's 3 pixels > THRESHOLD] for x [B, 1, 1, 3]."""

    THRESHOLD = 382

    def forward(self, x):
        ones = (torch.round(x * 255).sum(dim=(1, 2, 3)) > self.THRESHOLD).float()  # [B]
        return torch.stack([1 - ones, ones], dim=1)


def exact_level_sum_probability(sigma: float, levels: tuple[int, ...]) -> float:
    """P(f(x + eps) = 1) for LevelSumClassifier under the discrete noise, by convolution (float64, scipy): each
    noisy level is clip(L + i), i ~ the exact pmf, its tails lumped at the clip ends [-255k, 255(k+1)]."""
    k = max(1, math.floor(6 * sigma))
    low, high = -255 * k, 255 * (k + 1)
    total = np.ones(1)  # pmf of the sum of the noisy levels, from sum = len(levels) * low
    for level in levels:
        upper = norm.cdf((2 * (np.arange(low, high + 1) - level) + 1) / (510 * sigma))  # P(noisy <= v)
        upper[-1] = 1.0
        total = np.convolve(total, np.diff(upper, prepend=0.0))
    sums = len(levels) * low + np.arange(len(total))
    return float(total[sums > LevelSumClassifier.THRESHOLD].sum())


def certify_level_sums(alpha: float):
    """The project's Smooth.run(Certify) with DiscreteGaussianNoise(0.25) on 7 images x 30 seeds (idx) around
    LevelSumClassifier's boundary; returns (records, exact P(f = 1) per record)."""
    configs = [
        (80, 100, 120),
        (100, 120, 140),
        (118, 128, 138),
        (115, 135, 155),
        (130, 150, 170),
        (150, 170, 190),
        (180, 200, 220),
    ]  # level sums 300 .. 600 around the threshold 382
    images = [
        (idx, torch.tensor(configs[idx % 7], dtype=torch.float32).reshape(1, 1, 3) / 255, 1)
        for idx in range(7 * 30)
    ]  # [1,1,3] each
    smooth = Smooth(LevelSumClassifier(), 2, DiscreteGaussianNoise(0.25))
    records = smooth.run(Certify(n0=100, n=1000, alpha=alpha), images, batch_size=1000, seed=3)
    p_one = {c: exact_level_sum_probability(0.25, c) for c in configs}
    return records, [p_one[configs[r.idx % 7]] for r in records]


def test_smooth_certificates_never_exceed_the_exact_radius_beyond_alpha():
    """CERTIFY through the project's sampler and procedure: a certified radius larger than sigma Phi^-1(p_exact)
    of its class (the radius Cohen's theorem gives with the exact probability; negative for a wrong class) is
    false, which must happen with probability <= alpha per certificate."""
    alpha = 0.1
    records, p_one = certify_level_sums(alpha)
    certified = [
        (r, p if r.predict == 1 else 1 - p) for r, p in zip(records, p_one) if r.predict != Smooth.ABSTAIN
    ]
    assert len(certified) > 150 and {r.predict for r, _ in certified} == {0, 1}
    exact_radius = [0.25 * norm.ppf(p) for _, p in certified]
    false = sum(r.radius > exact for (r, _), exact in zip(certified, exact_radius))
    assert false <= binom.ppf(0.999, len(certified), alpha)
    # the check has power: the same counts turned into radii with a 20% larger sigma are caught
    wrong = DiscreteGaussianNoise(0.3)
    false_wrong = sum(
        wrong.radius(lower_confidence_bound(r.n_a, r.n, alpha)) > exact
        for (r, _), exact in zip(certified, exact_radius)
    )
    assert false_wrong > binom.ppf(0.999, len(certified), alpha)


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
    smooth = Smooth(ThresholdClassifier(), 2, DiscreteGaussianNoise(0.25))
    x = torch.tensor([127 + 40, 50.0]).reshape(1, 1, 2) / 255  # exact radius (40 - 1/2) / 255 = 0.1549
    guess, radius = smooth.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=1000)
    assert guess == 1 and 0.13 < radius < 39.5 / 255
    with pytest.raises(ValueError, match="off the 1/255 grid"):
        smooth.certify(x + 0.4 / 255, n0=100, n=10_000, alpha=0.001, batch_size=1000)
