"""Smooth, CERTIFY and PREDICT: confidence bound, radii against a closed form, exact counts against an
independent recount of the block-seeded noise, batch-size independence, input checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers.noise import reference_noise
from scipy.optimize import brentq
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from dmae_lightning.certification import Certify, NonFiniteLogits, Smooth, lower_confidence_bound
from dmae_lightning.noise import GaussianNoise


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


def reference_counts(fn, x, sigma, sizes, seed, num_classes, idx=0):
    """Counts per stage recomputed outside Smooth, one sample at a time from the documented noise."""
    phases = []
    for stage, size in enumerate(sizes):
        counts = [0] * num_classes
        for noise in reference_noise(seed, idx, stage, size, x.shape):
            counts[int(fn((x + sigma * noise).unsqueeze(0)).argmax(1))] += 1
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
    assert GaussianNoise(0.25).radius(0.5) == 0.0
    assert GaussianNoise(0.5).radius(norm.cdf(2.0)) == pytest.approx(1.0, rel=1e-12)
    assert GaussianNoise(1.0).radius(0.99) == pytest.approx(2.3263478740408408, rel=1e-12)
    assert GaussianNoise(0.5).probability_for_radius(1.0) == pytest.approx(norm.cdf(2.0), rel=1e-12)


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
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, noise=GaussianNoise(sigma))
    for draw in range(5):
        prediction, radius = smooth.certify(
            x, n0=100, n=2000, alpha=0.001, batch_size=500, seed=1000 * seed + draw
        )
        assert prediction == (1 if side == 1 else 0)
        assert 0.0 < radius <= true_radius


def test_certified_radius_is_tight_at_large_n():
    sigma, true_radius, n, alpha = 0.5, 0.3, 100_000, 0.001
    x, w, b = linear_case(7, true_radius, 1)
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, noise=GaussianNoise(sigma))
    record = smooth.certify_record(x, n0=100, n=n, alpha=alpha, batch_size=25_000, seed=0)
    p_true = norm.cdf(true_radius / sigma)
    assert record.predict == 1 and record.n == n
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
    record = Smooth(classifier, num_classes=3, noise=GaussianNoise(sigma)).certify_record(
        x, n0, n, alpha, batch_size=1000, seed=seed
    )
    selection, estimation = reference_counts(fn, x, sigma, [n0, n], seed, 3)
    guess = max(range(3), key=lambda c: (selection[c], -c))
    n_a = estimation[guess]
    p_lower = beta.ppf(alpha, n_a, n - n_a + 1)
    assert (record.n_a, record.n) == (n_a, n)
    if p_lower < 0.5:
        assert (record.predict, record.radius) == (Smooth.ABSTAIN, 0.0)
    else:
        assert record.predict == guess
        assert record.radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert classifier.batch_sizes == [60, 1000, 500]


def test_remainder_batches_and_noise_in_native_pixel_space():
    classifier = Recording(lambda x: torch.zeros(x.shape[0], 4))
    x = torch.zeros(3, 8, 8)
    Smooth(classifier, num_classes=4, noise=GaussianNoise(0.5)).certify(
        x, n0=7, n=2025, alpha=0.001, batch_size=1000
    )
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
    full = Smooth(Recording(fn), 3, GaussianNoise(sigma)).certify_record(
        x, 50, 800, 0.001, 256, seed=5, label=0
    )
    assert full.predict != Smooth.ABSTAIN
    wrong = (full.predict + 1) % 3

    classifier = Recording(fn)
    skipped = Smooth(classifier, 3, GaussianNoise(sigma)).certify_record(
        x, 50, 800, 0.001, 256, seed=5, label=wrong, skip_wrong_guess=True
    )
    assert (skipped.predict, skipped.radius, skipped.correct, skipped.n_a, skipped.n) == (
        full.predict,
        0.0,
        0,
        0,
        0,
    )
    assert sum(classifier.batch_sizes) == 50  # the n estimation draws were never made

    kept = Smooth(Recording(fn), 3, GaussianNoise(sigma)).certify_record(
        x, 50, 800, 0.001, 256, seed=5, label=full.predict, skip_wrong_guess=True
    )
    assert dataclasses.replace(kept, time=0.0, label=0, correct=0) == dataclasses.replace(
        full, time=0.0, correct=0
    )


def test_same_seed_same_result_different_seed_different_counts():
    x, w, b = linear_case(1, 0.2, 1)
    smooth = Smooth(Recording(linear_binary(w, b)), num_classes=2, noise=GaussianNoise(0.5))

    def run(seed):
        return dataclasses.replace(smooth.certify_record(x, 100, 5000, 0.001, 1024, seed=seed), time=0.0)

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
    coin = Smooth(Recording(threshold_fn(0.5, sigma, [0.5, 0.5])), 2, GaussianNoise(sigma))
    assert [coin.predict(x, 1000, 0.001, 500, seed=s) for s in range(5)] == [Smooth.ABSTAIN] * 5
    confident = Smooth(
        Recording(lambda z: nn.functional.one_hot(torch.full((z.shape[0],), 3), 5).float()),
        5,
        GaussianNoise(sigma),
    )
    assert confident.predict(x, 100, 0.001, 64, seed=0) == 3


def test_predict_decision_matches_scipy_binomtest():
    x, sigma, n, alpha = torch.full((1, 2, 2), 0.5), 0.25, 200, 0.05
    fn = threshold_fn(0.5, sigma, [0.2, 0.45, 0.35])
    smooth = Smooth(Recording(fn), 3, GaussianNoise(sigma))
    outcomes = []
    for seed in range(20):
        prediction = smooth.predict(x, n, alpha, 64, seed=seed)
        (counts,) = reference_counts(fn, x, sigma, [n], seed, 3)
        top, second = sorted(range(3), key=lambda c: (-counts[c], c))[:2]
        abstain = binomtest(counts[top], counts[top] + counts[second], 0.5).pvalue > alpha
        assert prediction == (Smooth.ABSTAIN if abstain else top)
        outcomes.append(prediction)
    assert Smooth.ABSTAIN in outcomes and 1 in outcomes  # both branches exercised


# --- precision and input checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision,dtype",
    [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)],
)
def test_precision_runs_the_forward_under_autocast(precision, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(12, 3)
    classifier = Recording(lambda z: linear(z.flatten(1)))
    Smooth(classifier, 3, GaussianNoise(0.25), precision=precision).certify(
        torch.rand(3, 2, 2), 10, 20, 0.001, 16
    )
    assert set(classifier.logit_dtypes) == {dtype}
    assert all(batch.dtype == torch.float32 for batch in classifier.inputs)  # noise is added in fp32


GOOD = dict(x=torch.full((3, 4, 4), 0.5), n0=10, n=100, alpha=0.001, batch_size=32)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(n0=0), "n0 must be an integer in \\[1, 10\\^12\\]"),
        (dict(n=0), "n must be an integer in \\[1, 10\\^12\\]"),
        (dict(n=10.0), "n must be an integer in \\[1, 10\\^12\\]"),
        (dict(batch_size=0), "batch_size must be an integer in \\[1, 10\\^12\\]"),
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
    smooth = Smooth(classifier, 2, GaussianNoise(0.25))
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
        (dict(num_classes=1, noise=GaussianNoise(0.5)), "num_classes must be an integer >= 2"),
        (dict(num_classes=2, noise=GaussianNoise(0.5), precision="fp8"), "precision must be one of"),
    ],
)
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Smooth(Recording(lambda z: z), **kwargs)


@pytest.mark.parametrize("sigma", [0.0, -0.5, float("nan"), True])
def test_a_noise_needs_a_positive_sigma(sigma):
    with pytest.raises(ValueError, match="noise.sigma must be a finite number > 0"):
        GaussianNoise(sigma)


@dataclasses.dataclass(frozen=True)
class _Deducting(GaussianNoise):
    """A noise whose certificate needs p > 1/2 + 0.2 (as DiscreteGaussianNoise needs 1/2 + its tiny deduction)."""

    def radius(self, p_lower):
        return super().radius(p_lower - 0.2)

    def probability_for_radius(self, radius):
        return super().probability_for_radius(radius) + 0.2


def test_certify_abstains_below_the_noise_s_own_threshold():
    x, sigma = torch.full((1, 2, 2), 0.5), 0.25
    fn = threshold_fn(0.5, sigma, [0.62, 0.38])  # P(class 0) = 0.62: p_lower about 0.57 at n = 2000
    plain = Smooth(Recording(fn), 2, GaussianNoise(sigma)).certify_record(x, 100, 2000, 0.001, 1000, seed=3)
    assert plain.predict == 0 and 0.5 < plain.n_a / plain.n < 0.7 and plain.radius > 0
    deducting = Smooth(Recording(fn), 2, _Deducting(sigma)).certify_record(x, 100, 2000, 0.001, 1000, seed=3)
    assert deducting.predict == Smooth.ABSTAIN and deducting.n_a == plain.n_a  # same draws, its own threshold


def test_one_noise_samples_and_certifies():
    """Issue 17: Smooth(clf, sigma=0.25).run(Certify(GaussianNoise(1.0), ...)) sampled at 0.25 and certified at
    1.0 (radius 2.46 instead of 0.62). A procedure now holds no noise: both old calls are refused, and the
    radius is the sampling noise's, sigma * Phi^-1(p_lower), recomputed here from the record's counts."""
    classifier = Recording(
        lambda z: nn.functional.one_hot(torch.zeros(z.shape[0], dtype=torch.long), 2).float()
    )
    with pytest.raises(TypeError):
        Smooth(classifier, 2, sigma=0.25)
    with pytest.raises(TypeError, match="noise must be a dmae_lightning.noise.Noise"):
        Smooth(classifier, 2, 0.25)
    with pytest.raises(ValueError, match="n0 must be an integer"):
        Certify(GaussianNoise(1.0), 100, 1000, 0.001)
    smooth = Smooth(classifier, 2, GaussianNoise(0.25))
    (record,) = smooth.run(Certify(100, 1000, 0.001), [(0, torch.full((1, 2, 2), 0.5), 0)], batch_size=500)
    p_lower = 0.001 ** (1 / 1000)  # 1000 successes of 1000
    assert record.radius == pytest.approx(0.25 * norm.ppf(p_lower), rel=1e-12)
    assert 0.61 < record.radius < 0.62  # not 2.46 (sigma 1.0)
    assert Certify(100, 1000, 0.001).summarise([record], (0.0,), smooth.noise).max_certifiable_radius == (
        pytest.approx(record.radius, rel=1e-12)
    )


def test_skip_wrong_guess_needs_a_label_and_rounding_is_tolerated():
    classifier = Recording(lambda z: torch.zeros(z.shape[0], 2))
    smooth = Smooth(classifier, 2, GaussianNoise(0.25))
    with pytest.raises(ValueError, match="skip_wrong_guess needs the image's label"):
        smooth.certify_record(**GOOD, skip_wrong_guess=True)
    assert classifier.batch_sizes == []
    x = torch.full((3, 4, 4), 1 + 5e-5)  # off by rounding only
    assert smooth.certify(x, 10, 100, 0.001, 64) == (0, pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 100))))


# --- block-seeded noise: independent of batch size and packing -------------------------------------


def three_class_images(count):
    g = torch.Generator().manual_seed(21)
    return [(idx, torch.rand(3, 2, 2, generator=g), idx % 3) for idx in range(count)]


def without_time(records):
    return [dataclasses.replace(r, time=0.0) for r in records]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_results_identical_for_every_batch_size_and_packing(device):
    """Several images share forward batches; each image's record equals certifying it alone, for batch
    sizes that split blocks (37), align with them (100, 200) and hold several images (1000)."""
    weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(3)).to(device)
    smooth = Smooth(Recording(lambda z: z.flatten(1) @ weights.T), 3, GaussianNoise(0.5), precision="32-true")
    images = [(idx, x.to(device), label) for idx, x, label in three_class_images(7)]
    procedure = Certify(n0=100, n=450, alpha=0.001)
    runs = [
        without_time(smooth.run(procedure, images, batch_size, seed=4)) for batch_size in (37, 100, 200, 1000)
    ]
    assert all(run == runs[0] for run in runs[1:])
    alone = [without_time(smooth.run(procedure, [image], 64, seed=4))[0] for image in images]
    assert alone == runs[0]
    assert len({r.n_a for r in runs[0]}) > 1  # different images, different noise


def test_images_share_forward_batches():
    classifier = Recording(lambda z: torch.zeros(z.shape[0], 3))
    smooth = Smooth(classifier, 3, GaussianNoise(0.25))
    smooth.run(Certify(n0=100, n=300, alpha=0.001), three_class_images(5), batch_size=250, seed=0)
    # 5 x (100 selection + 300 estimation) = 2000 samples; until the last image has arrived every batch is
    # full (one image alone would give 100, 250, 50 per image); then the last estimations finish the run.
    assert sum(classifier.batch_sizes) == 2000
    assert classifier.batch_sizes == [250] * 6 + [200, 250, 50]


def test_counts_match_the_documented_noise_for_another_image_index():
    fn = three_class_fn()
    x = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(8))
    record = Smooth(Recording(fn), 3, GaussianNoise(0.5)).certify_record(
        x, 30, 250, 0.01, batch_size=70, seed=2, idx=17
    )
    selection, estimation = reference_counts(fn, x, 0.5, [30, 250], 2, 3, idx=17)
    guess = max(range(3), key=lambda c: (selection[c], -c))
    assert record.n_a == estimation[guess]


def test_nan_logits_are_refused_naming_the_image():
    smooth = Smooth(Recording(lambda z: torch.full((z.shape[0], 3), float("nan"))), 3, GaussianNoise(0.25))
    with pytest.raises(
        NonFiniteLogits, match="image 12: the base classifier returned NaN/Inf logits for 10 of 10"
    ):
        smooth.certify(torch.rand(3, 2, 2), 10, 100, 0.001, 64, idx=12)
    x = torch.rand(3, 2, 2)  # the same Smooth works again after the error: nothing left in flight
    assert (
        Smooth(Recording(lambda z: torch.zeros(z.shape[0], 3)), 3, GaussianNoise(0.25)).certify(
            x, 10, 100, 0.001, 64
        )[0]
        == 0
    )
    with pytest.raises(NonFiniteLogits):
        smooth.certify(x, 10, 100, 0.001, 64, idx=12)
    smooth.base_classifier.fn = lambda z: torch.zeros(z.shape[0], 3)
    assert smooth.certify(x, 10, 100, 0.001, 64, idx=12)[0] == 0
    inf_once = Recording(
        lambda z: torch.cat([torch.full((1, 3), float("inf")), torch.zeros(z.shape[0] - 1, 3)])
    )
    with pytest.raises(NonFiniteLogits, match="for 1 of 10 noisy samples"):
        Smooth(inf_once, 3, GaussianNoise(0.25)).predict(torch.rand(3, 2, 2), 10, 0.001, 64)


def test_float64_images_are_certified_as_float32():
    classifier = Recording(three_class_fn())
    x = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(9))
    smooth = Smooth(classifier, 3, GaussianNoise(0.5))
    assert smooth.certify(x.double(), 20, 200, 0.001, 64) == smooth.certify(x, 20, 200, 0.001, 64)
    assert {batch.dtype for batch in classifier.inputs} == {torch.float32}


def test_auto_precision_is_fp32_on_the_cpu():
    classifier = Recording(lambda z: torch.zeros(z.shape[0], 2))
    Smooth(classifier, 2, GaussianNoise(0.25)).certify(torch.rand(3, 2, 2), 10, 20, 0.001, 16)
    assert set(classifier.logit_dtypes) == {torch.float32}


@pytest.mark.slow
def test_compiled_classifier_gives_the_eager_results_with_one_batch_shape():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(1), nn.Linear(12, 3))
    images = three_class_images(3)
    procedure = Certify(n0=100, n=250, alpha=0.001)
    eager = without_time(Smooth(classifier, 3, GaussianNoise(0.5)).run(procedure, images, 128, seed=1))
    smooth = Smooth(classifier, 3, GaussianNoise(0.5), compile=True)
    sampler = smooth.sampler(128, seed=1, device="cpu")
    shapes, compiled_forward = [], sampler.forward
    sampler.forward = lambda batch: shapes.append(tuple(batch.shape)) or compiled_forward(batch)
    assert without_time(smooth.run(procedure, images, 128, seed=1)) == eager
    assert set(shapes) == {(128, 3, 2, 2)}  # 1050 samples: the short last batch was padded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_reproducible_and_bf16_by_default():
    linear = nn.Linear(3 * 32 * 32, 10).cuda()
    classifier = Recording(lambda z: linear(z.flatten(1)))
    smooth = Smooth(classifier, 10, GaussianNoise(0.5))
    x = torch.rand(3, 32, 32, device="cuda")

    def run(batch):
        return dataclasses.replace(smooth.certify_record(x, 100, 10_000, 0.001, batch, seed=0), time=0.0)

    assert run(4096) == run(4096) == run(1000)
    assert run(4096).n == 10_000
    assert set(classifier.logit_dtypes) == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_synchronisation_until_a_request_is_complete():
    linear = nn.Linear(3 * 8 * 8, 10).cuda()
    smooth = Smooth(nn.Sequential(nn.Flatten(1), linear), 10, GaussianNoise(0.5))
    sampler = smooth.sampler(500, seed=0, device="cuda")
    sampler.add(0, torch.rand(3, 8, 8, device="cuda"), 0, Certify(2000, 10, 0.001))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # 1,500 of the 2,000 selection draws: no request completes, nothing read back
            assert list(sampler.step()) == []
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_two_images_under_one_idx_are_refused_before_any_draw():
    """Issue 22.2: records are keyed by idx and noise is seeded by it; [(1, 8, 200), (1, 8, 200)] came back for
    two different images sharing idx 1 (the first image's record replaced by the second's)."""
    classifier = Recording(three_class_fn())
    smooth = Smooth(classifier, 3, GaussianNoise(0.5))
    x0, x1 = torch.rand(3, 2, 2), torch.rand(3, 2, 2)
    with pytest.raises(ValueError, match="two images share idx 1"):
        smooth.run(Certify(10, 200, 0.001), [(1, x0, 0), (1, x1, 0)], batch_size=64)
    assert classifier.batch_sizes == []
    sampler = smooth.sampler(64, seed=0, device="cpu")
    sampler.add(1, x0, 0, Certify(10, 200, 0.001))
    with pytest.raises(ValueError, match="image idx 1 is already being certified"):
        sampler.add(1, x1, 0, Certify(10, 200, 0.001))
    sampler.reset()
