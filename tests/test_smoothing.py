"""Randomized smoothing: confidence bound, radii against a closed form, exact counts, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from dmae_lightning.smoothing import Smooth, certified_radius, lower_confidence_bound


class Recording(nn.Module):
    """Wraps a function of the noisy batch [B,C,H,W] -> logits [B,K]; remembers every call."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.batch_sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.logit_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        self.inputs.append(x.clone())
        logits = self.fn(x)
        self.logit_dtypes.append(logits.dtype)
        return logits


def linear_binary(w: torch.Tensor, b: float):
    """f(x) = 1 if w.x > b else 0: the smoothed radius at x is exactly |w.x - b| / ||w||."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ w.flatten() - b  # [B]
        return torch.stack([torch.zeros_like(score), score], dim=1)  # [B,2]

    return fn


def reference_counts(fn, x, sigma, sizes, generator, num_classes, batch_size):
    """Counts per phase recomputed outside Smooth: same generator stream, same batch shapes."""
    phases = []
    for size in sizes:
        counts = [0] * num_classes
        for start in range(0, size, batch_size):
            b = min(batch_size, size - start)
            noise = torch.randn((b, *x.shape), generator=generator)
            for c in fn(x + sigma * noise).argmax(1).tolist():
                counts[c] += 1
        phases.append(counts)
    return phases


# --- confidence bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_a,n", [(1, 10), (5, 10), (9, 10), (50, 100), (990, 1000), (97_000, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_confidence_bound_matches_beta_quantile_and_binomial_definition(n_a, n, alpha):
    p = lower_confidence_bound(n_a, n, alpha)
    assert p == pytest.approx(beta.ppf(alpha, n_a, n - n_a + 1), rel=1e-12)
    # Definition: the p at which seeing >= n_a successes has probability exactly alpha.
    assert binom.sf(n_a - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    root = brentq(lambda q: binom.sf(n_a - 1, n, q) - alpha, 1e-12, 1 - 1e-12, xtol=1e-14)
    assert p == pytest.approx(root, abs=1e-9)
    assert 0 < p < n_a / n


def test_lower_confidence_bound_edges():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert lower_confidence_bound(1, 1, 0.05) == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError, match="n_a <= n"):
        lower_confidence_bound(11, 10, 0.001)


def test_certified_radius():
    assert certified_radius(0.5, 0.25) == 0.0
    assert certified_radius(norm.cdf(2.0), 0.5) == pytest.approx(1.0, rel=1e-12)
    assert certified_radius(0.99, 1.0) == pytest.approx(2.3263478740408408, rel=1e-12)


# --- radius against the closed form ----------------------------------------------------------------


def linear_case(seed: int, true_radius: float, side: int):
    """A 1x2x2 image in [0,1] and a hyperplane at L2 distance true_radius on the given side."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 2, 2, generator=g)
    w = torch.randn(1, 2, 2, generator=g)
    b = float((w * x).sum()) - side * true_radius * float(w.norm())
    return x, w, b


@pytest.mark.parametrize("seed", range(6))
def test_certified_radius_never_exceeds_the_true_radius(seed):
    sigma, true_radius = 0.5, 0.3
    side = 1 if seed % 2 else -1  # both classes
    x, w, b = linear_case(seed, true_radius, side)
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, sigma=sigma)
    for draw in range(5):
        gen = torch.Generator().manual_seed(1000 * seed + draw)
        prediction, radius = smooth.certify(x, n0=100, n=2000, alpha=0.001, batch_size=500, generator=gen)
        assert prediction == (1 if side == 1 else 0)
        assert 0.0 < radius <= true_radius


def test_certified_radius_is_tight_at_large_n():
    sigma, true_radius, n, alpha = 0.5, 0.3, 100_000, 0.001
    x, w, b = linear_case(7, true_radius, 1)
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, sigma=sigma)
    record = smooth.certify_record(
        x, n0=100, n=n, alpha=alpha, batch_size=25_000, generator=torch.Generator().manual_seed(0)
    )
    p_true = norm.cdf(true_radius / sigma)
    assert record.prediction == 1 and record.n == n
    assert abs(record.n_a / n - p_true) < 4 * math.sqrt(p_true * (1 - p_true) / n)
    assert record.radius <= true_radius
    assert record.radius == pytest.approx(true_radius, rel=0.04)  # normal approx: about 2.2 % below


# --- bookkeeping -----------------------------------------------------------------------------------


def three_class_fn():
    g = torch.Generator().manual_seed(3)
    weights, bias = torch.randn(3, 12, generator=g), torch.tensor([0.0, 0.3, -0.2])
    return lambda x: x.flatten(1) @ weights.T + bias  # [B,3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certify_record_counts_match_an_independent_recount(seed):
    fn, sigma, n0, n, alpha = three_class_fn(), 0.5, 60, 1500, 0.01
    x = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(10 + seed))
    classifier = Recording(fn)
    record = Smooth(classifier, num_classes=3, sigma=sigma).certify_record(
        x, n0, n, alpha, batch_size=1000, generator=torch.Generator().manual_seed(seed)
    )
    selection, estimation = reference_counts(
        fn, x, sigma, [n0, n], torch.Generator().manual_seed(seed), 3, 1000
    )
    guess = max(range(3), key=lambda c: (selection[c], -c))
    n_a = estimation[guess]
    p_lower = beta.ppf(alpha, n_a, n - n_a + 1)
    assert (record.guess, record.n_a, record.n) == (guess, n_a, n)
    assert record.p_lower == pytest.approx(p_lower, rel=1e-12)
    if p_lower < 0.5:
        assert (record.prediction, record.radius) == (Smooth.ABSTAIN, 0.0)
    else:
        assert record.prediction == guess
        assert record.radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert classifier.batch_sizes == [60, 1000, 500]


def test_remainder_batches_and_noise_in_native_pixel_space():
    classifier = Recording(lambda x: torch.zeros(x.shape[0], 4))
    x = torch.zeros(3, 8, 8)
    Smooth(classifier, num_classes=4, sigma=0.5).certify(x, n0=7, n=2025, alpha=0.001, batch_size=1000)
    assert classifier.batch_sizes == [7, 1000, 1000, 25]
    noisy = torch.cat(classifier.inputs)  # [2032,3,8,8]
    assert noisy.shape == (2032, 3, 8, 8) and noisy.dtype == torch.float32
    assert noisy.std().item() == pytest.approx(0.5, rel=0.01)
    assert abs(noisy.mean().item()) < 0.005
    assert noisy.min() < -1.0  # no clamping to [0,1]
    assert not torch.equal(noisy[0], noisy[1])  # every copy has its own noise


def test_skip_wrong_guess():
    fn, sigma = three_class_fn(), 0.25
    x = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(4))
    full = Smooth(Recording(fn), 3, sigma).certify_record(
        x, 50, 800, 0.001, 256, torch.Generator().manual_seed(5)
    )
    wrong = (full.guess + 1) % 3

    classifier = Recording(fn)
    skipped = Smooth(classifier, 3, sigma).certify_record(
        x, 50, 800, 0.001, 256, torch.Generator().manual_seed(5), label=wrong, skip_wrong_guess=True
    )
    assert (skipped.prediction, skipped.radius, skipped.guess, skipped.n_a, skipped.n) == (
        full.guess,
        0.0,
        full.guess,
        0,
        0,
    )
    assert sum(classifier.batch_sizes) == 50  # the n estimation draws were never made

    kept = Smooth(Recording(fn), 3, sigma).certify_record(
        x, 50, 800, 0.001, 256, torch.Generator().manual_seed(5), label=full.guess, skip_wrong_guess=True
    )
    assert kept == full


def test_same_seed_same_result_different_seed_different_counts():
    x, w, b = linear_case(1, 0.2, 1)
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, sigma=0.5)

    def run(seed):
        return smooth.certify_record(x, 100, 5000, 0.001, 1024, generator=torch.Generator().manual_seed(seed))

    assert run(3) == run(3)
    assert len({run(seed).n_a for seed in (3, 4, 5)}) == 3


# --- predict ---------------------------------------------------------------------------------------


def threshold_fn(x0: float, sigma: float, probabilities):
    """Class from the noise on pixel 0 with P(class c) = probabilities[c] exactly."""
    cuts = torch.tensor(
        norm.ppf(torch.tensor(probabilities).cumsum(0)[:-1].numpy()) * sigma, dtype=torch.float32
    )

    def fn(x: torch.Tensor) -> torch.Tensor:
        cls = torch.bucketize(x[:, 0, 0, 0] - x0, cuts)  # [B]
        return nn.functional.one_hot(cls, len(probabilities)).float()  # [B,K]

    return fn


def test_predict_abstains_on_a_coin_flip_and_answers_a_confident_classifier():
    x, sigma = torch.full((1, 2, 2), 0.5), 0.25
    coin = Smooth(Recording(threshold_fn(0.5, sigma, [0.5, 0.5])), 2, sigma)
    assert [coin.predict(x, 1000, 0.001, 500, torch.Generator().manual_seed(s)) for s in range(5)] == [
        Smooth.ABSTAIN
    ] * 5
    confident = Smooth(
        Recording(lambda z: nn.functional.one_hot(torch.full((z.shape[0],), 3), 5).float()), 5, sigma
    )
    assert confident.predict(x, 100, 0.001, 64, torch.Generator().manual_seed(0)) == 3


def test_predict_decision_matches_scipy_binomtest():
    x, sigma, n, alpha = torch.full((1, 2, 2), 0.5), 0.25, 200, 0.05
    fn = threshold_fn(0.5, sigma, [0.2, 0.45, 0.35])
    smooth = Smooth(Recording(fn), 3, sigma)
    outcomes = []
    for seed in range(20):
        prediction = smooth.predict(x, n, alpha, 64, torch.Generator().manual_seed(seed))
        (counts,) = reference_counts(fn, x, sigma, [n], torch.Generator().manual_seed(seed), 3, 64)
        top, second = sorted(range(3), key=lambda c: (-counts[c], c))[:2]
        abstain = binomtest(counts[top], counts[top] + counts[second], 0.5).pvalue > alpha
        assert prediction == (Smooth.ABSTAIN if abstain else top)
        outcomes.append(prediction)
    assert Smooth.ABSTAIN in outcomes and 1 in outcomes  # both branches exercised


# --- precision and input checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_precision_runs_the_forward_under_autocast(precision, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(12, 3)
    classifier = Recording(lambda z: linear(z.flatten(1)))
    Smooth(classifier, 3, 0.25, precision=precision).certify(torch.rand(3, 2, 2), 10, 20, 0.001, 16)
    assert set(classifier.logit_dtypes) == {dtype}
    assert all(batch.dtype == torch.float32 for batch in classifier.inputs)  # noise is added in fp32


GOOD = dict(x=torch.full((3, 4, 4), 0.5), n0=10, n=100, alpha=0.001, batch_size=32)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(n0=0), "n0 must be an integer >= 1"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(n=10.0), "n must be an integer >= 1"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(alpha=0.0), "alpha must lie strictly between 0 and 1"),
        (dict(alpha=1.0), "alpha must lie strictly between 0 and 1"),
        (dict(alpha=float("nan")), "alpha must lie strictly between 0 and 1"),
        (dict(x=torch.full((1, 3, 4, 4), 0.5)), r"x must be one \[C,H,W\] image tensor, got \(1, 3, 4, 4\)"),
        (dict(x=torch.full((4, 4), 0.5)), r"x must be one \[C,H,W\] image tensor"),
        (dict(x=torch.full((3, 4, 4), 255, dtype=torch.uint8)), "x must be a floating-point image"),
        (dict(x=torch.full((3, 4, 4), 1.001)), r"x must hold \[0,1\] pixels"),
        (dict(x=torch.full((3, 4, 4), -0.001)), r"x must hold \[0,1\] pixels"),
        (dict(x=torch.full((3, 4, 4), float("nan"))), r"x must hold \[0,1\] pixels"),
    ],
)
def test_bad_inputs_raise_before_sampling(changes, message):
    classifier = Recording(lambda z: torch.zeros(z.shape[0], 2))
    smooth = Smooth(classifier, 2, 0.25)
    args = {**GOOD, **changes}
    with pytest.raises(ValueError, match=message):
        smooth.certify(**args)
    if "n0" not in changes:
        with pytest.raises(ValueError, match=message):
            smooth.predict(args["x"], args["n"], args["alpha"], args["batch_size"])
    assert classifier.batch_sizes == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_classes=2, sigma=0.0), "sigma must be a finite number > 0"),
        (dict(num_classes=2, sigma=-0.5), "sigma must be a finite number > 0"),
        (dict(num_classes=1, sigma=0.5), "num_classes must be an integer >= 2"),
        (dict(num_classes=2, sigma=0.5, precision="fp8"), "precision must be one of"),
    ],
)
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Smooth(Recording(lambda z: z), **kwargs)


def test_skip_wrong_guess_needs_a_label_and_rounding_is_tolerated():
    classifier = Recording(lambda z: torch.zeros(z.shape[0], 2))
    smooth = Smooth(classifier, 2, 0.25)
    with pytest.raises(ValueError, match="skip_wrong_guess needs the image's label"):
        smooth.certify_record(**GOOD, skip_wrong_guess=True)
    assert classifier.batch_sizes == []
    x = torch.full((3, 4, 4), 1 + 5e-5)  # off by rounding only
    assert smooth.certify(x, 10, 100, 0.001, 64) == (0, pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 100))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_generator_reproducible_and_bf16():
    linear = nn.Linear(3 * 32 * 32, 10).cuda()
    smooth = Smooth(Recording(lambda z: linear(z.flatten(1))), 10, 0.5, precision="bf16")
    x = torch.rand(3, 32, 32, device="cuda")

    def run(seed):
        return smooth.certify_record(
            x, 100, 10_000, 0.001, 4096, torch.Generator(device="cuda").manual_seed(seed)
        )

    assert run(0) == run(0)
    assert run(0).n == 10_000
    with pytest.raises(ValueError, match="generator is on cpu"):
        smooth.certify(x, 10, 10, 0.001, 4, torch.Generator())
