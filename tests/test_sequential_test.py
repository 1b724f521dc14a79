"""Sequential certification at fixed radii: soundness by worst-case simulation, closed-form bounds, targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom, norm

from dmae_lightning.certification import CertifyRadii
from dmae_lightning.certification.confidence import (
    SequentialTest,
    Verdict,
    clopper_pearson_lower,
    digits_like_p,
    simulate,
    simulate_fixed_n,
)
from dmae_lightning.noise import GaussianNoise

SIGMA = 0.25


def looks_hit(p: float, looks: tuple[int, ...], rule, streams: int, rng: np.random.Generator) -> float:
    """Fraction of Bernoulli(p) streams for which ``rule(successes [S], trials) -> bool [S]`` holds at some
    look: the streams are never stopped, so this bounds any procedure that only stops earlier."""
    increments = rng.binomial(np.diff((0, *looks)), p, size=(streams, len(looks)))  # [S, J]
    successes = increments.cumsum(axis=1)  # [S, J]
    hit = np.zeros(streams, dtype=bool)  # [S]
    for j, trials in enumerate(looks):
        hit |= rule(successes[:, j], trials)
    return float(hit.mean())


def limit(level: float, streams: int) -> float:
    """level plus three standard errors of a fraction estimated from ``streams`` draws."""
    return level + 3 * math.sqrt(level * (1 - level) / streams)


# ----------------------------------------------------------------------------------- soundness
WORST = SequentialTest(radii=(0.0, 0.25), noise=GaussianNoise(SIGMA), n_max=2000, alpha=0.05, block=100)
STREAMS = 40_000


@pytest.mark.parametrize("r_index", [0, 1])
def test_streams_at_the_threshold_are_wrongly_certified_at_most_alpha(r_index):
    """p exactly at t(r) (1/2 at r = 0, where certification needs strictly more): any YES is wrong."""
    t = WORST.thresholds()[r_index]

    def certifies(successes, trials):
        lower, _ = WORST.bounds(successes, trials)
        return WORST.classify(lower, np.ones_like(lower), trials)[:, r_index] == Verdict.YES

    rate = looks_hit(t, WORST.looks(), certifies, STREAMS, np.random.default_rng(r_index))
    assert rate <= limit(WORST.alpha, STREAMS)
    # the whole procedure (running bounds, futility, stopping) can only certify less often
    result = simulate(WORST, np.full(STREAMS, t), np.random.default_rng(10 + r_index))
    assert result.certified[:, r_index].mean() <= limit(WORST.alpha, STREAMS)


def test_fixed_n_bound_reused_at_every_look_fails_the_same_harness():
    """The deliberately unsound variant: Clopper-Pearson at the full alpha at each of the same looks."""
    t = WORST.thresholds()[1]

    def certifies(successes, trials):
        return clopper_pearson_lower(successes, trials, WORST.alpha) >= t

    rate = looks_hit(t, WORST.looks(), certifies, STREAMS, np.random.default_rng(2))
    assert rate > limit(WORST.alpha, STREAMS)


def test_futility_refutes_streams_at_the_threshold_at_most_its_level():
    """The upper side may only cost power: p = t(r) is refuted early with probability <= futility."""
    test = SequentialTest(
        radii=(0.25,), noise=GaussianNoise(SIGMA), n_max=2000, alpha=0.05, block=100, futility=0.05
    )
    t = test.thresholds()[0]
    early = test.looks()[:-1]  # at the cap NO is the default answer, not a futility decision

    def refutes(successes, trials):
        return test.bounds(successes, trials)[1] < t

    assert looks_hit(t, early, refutes, STREAMS, np.random.default_rng(3)) <= limit(test.futility, STREAMS)


# ----------------------------------------------------------------------------------- closed forms
def test_looks_are_block_multiples_ending_at_the_cap():
    test = SequentialTest(
        radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=10_050, alpha=0.001, block=100, growth=1.5
    )
    assert test.looks() == (100, 200, 300, 500, 800, 1200, 1800, 2700, 4100, 6200, 9300, 10_050)


def test_levels_sum_to_alpha_with_the_final_share_at_the_cap():
    test = SequentialTest(
        radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100, final_share=0.8
    )
    levels = test.lower_levels()
    assert len(levels) == len(test.looks())
    assert math.fsum(levels) == pytest.approx(0.001, rel=1e-12)
    assert levels[-1] == pytest.approx(0.0008, rel=1e-12)
    assert levels[:-1] == pytest.approx([0.0002 / (len(levels) - 1)] * (len(levels) - 1), rel=1e-12)
    assert math.fsum(test.upper_levels()) == pytest.approx(test.futility, rel=1e-12)


@pytest.mark.parametrize("successes", [0, 1, 37, 500, 799, 800])
def test_bounds_are_clopper_pearson_at_the_looks_level(successes):
    """The lower bound L solves P[Bin(n, L) >= k] = alpha_j, the upper U solves P[Bin(n, U) <= k] = beta_j."""
    test = SequentialTest(radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100)
    j = 4
    trials = test.looks()[j]
    assert trials == 800
    lower, upper = test.bounds(successes, trials)
    if successes == 0:
        assert lower == 0.0
    else:
        assert binom.sf(successes - 1, trials, lower) == pytest.approx(test.lower_levels()[j], rel=1e-6)
    if successes == trials:
        assert upper == 1.0
    else:
        assert binom.cdf(successes, trials, upper) == pytest.approx(test.upper_levels()[j], rel=1e-6)
    # arrays give the same numbers
    both = test.bounds(np.array([successes, successes]), trials)
    np.testing.assert_array_equal(both[0], [lower, lower])
    np.testing.assert_array_equal(both[1], [upper, upper])


def test_all_successes_bound_is_alpha_to_the_one_over_n():
    """n successes out of n give L = alpha^(1/n): the largest radius is sigma * Phi^-1(alpha_J^(1/n))."""
    test = SequentialTest(
        radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100, final_share=0.8
    )
    expected = SIGMA * norm.ppf(0.0008 ** (1 / 10_000))
    assert test.max_radius() == pytest.approx(expected, rel=1e-9)
    assert 0.79 < expected < 0.80  # method.md: about 0.80 for sigma 0.25, n = 10,000 (at the full alpha)
    # fixed-n CERTIFY's own limit at the full alpha, from the binomial: P[Bin(n, q) >= n] = q^n = alpha
    q = 0.001 ** (1 / 10_000)
    assert binom.sf(9_999, 10_000, q) == pytest.approx(0.001, rel=1e-9)


def test_unreachable_radii_are_no_before_sampling():
    test0 = SequentialTest(radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100)
    top = test0.max_radius()
    test = SequentialTest(
        radii=(0.5, top - 1e-6, top + 1e-6, 1.0),
        noise=GaussianNoise(SIGMA),
        n_max=10_000,
        alpha=0.001,
        block=100,
    )
    assert test.reachable() == (True, True, False, False)
    before = test.decide(0, 0)
    assert before.verdicts == (Verdict.UNDECIDED, Verdict.UNDECIDED, Verdict.NO, Verdict.NO)
    assert not before.stop
    nothing = SequentialTest(
        radii=(0.9, 1.0), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100
    ).decide(0, 0)
    assert nothing.stop and nothing.verdicts == (Verdict.NO, Verdict.NO) and nothing.certified_radius is None


def test_zero_radius_needs_a_bound_strictly_above_one_half():
    test = SequentialTest(radii=(0.0, 0.25), noise=GaussianNoise(SIGMA), n_max=1000, alpha=0.001, block=100)
    codes = test.classify(np.array([0.5, np.nextafter(0.5, 1), norm.cdf(1.0)]), np.ones(3), 100)
    assert codes.tolist() == [[Verdict.UNDECIDED] * 2, [Verdict.YES, Verdict.UNDECIDED], [Verdict.YES] * 2]


# ----------------------------------------------------------------------------------- decisions
def test_all_successes_stop_at_the_first_look_that_clears_the_top_radius():
    """p = 1: the first look n_j with alpha_j^(1/n_j) >= Phi(0.5 / sigma) decides everything YES."""
    test = SequentialTest(
        radii=(0.0, 0.25, 0.5), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100
    )
    t_top = norm.cdf(0.5 / SIGMA)
    first = next(n for n, a in zip(test.looks(), test.lower_levels()) if a ** (1 / n) >= t_top)
    decision = test.decide(0, 0)
    for trials in test.looks():
        decision = test.decide(trials, trials, decision)
        if decision.stop:
            break
    assert decision.trials == first
    assert decision.verdicts == (Verdict.YES,) * 3 and decision.certified_radius == 0.5
    result = simulate(test, [1.0, 0.0], np.random.default_rng(0))
    assert result.samples[0] == first
    assert result.certified.tolist() == [[True] * 3, [False] * 3]


def test_running_bounds_keep_an_earlier_yes_and_undecided_is_no_at_the_cap():
    test = SequentialTest(radii=(0.0, 0.5), noise=GaussianNoise(SIGMA), n_max=1000, alpha=0.001, block=100)
    first = test.decide(100, 100)  # r = 0 certified at once, r = 0.5 open
    assert first.verdicts == (Verdict.YES, Verdict.UNDECIDED)
    later = test.decide(110, 200, first)  # 55%: this look alone would not certify r = 0
    assert test.bounds(110, 200)[0] < 0.5 and later.lower == first.lower
    assert later.verdicts[0] == Verdict.YES
    # at the cap: a count whose lower bound falls just short of t(0.5) and upper bound above it
    t = norm.cdf(2.0)
    k = next(k for k in range(1000, 0, -1) if test.bounds(k, 1000)[0] < t)
    decision = test.decide(k, 1000)
    assert decision.upper >= t and decision.verdicts[1] == Verdict.NO and decision.stop


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"radii": (0.5, 0.25)}, "strictly increasing"),
        ({"radii": (-0.1,)}, ">= 0"),
        ({"n_max": 0}, "n_max"),
        ({"alpha": 1.0}, "alpha"),
        ({"noise": 0.25}, "noise must be a dmae_lightning.noise.Noise"),  # a number: the old sigma
        ({"final_share": 0.0}, "final_share"),
    ],
)
def test_bad_settings_raise_one_line(kwargs, message):
    settings = {
        "radii": (0.0,),
        "noise": GaussianNoise(SIGMA),
        "n_max": 1000,
        "alpha": 0.001,
        "block": 100,
    } | kwargs
    with pytest.raises((ValueError, TypeError), match=message) as err:
        SequentialTest(**settings)
    assert "\n" not in str(err.value)


def test_decide_refuses_counts_off_the_schedule():
    test = SequentialTest(radii=(0.0,), noise=GaussianNoise(SIGMA), n_max=1000, alpha=0.001, block=100)
    with pytest.raises(ValueError, match="not a look"):
        test.decide(10, 150)
    with pytest.raises(ValueError, match="successes"):
        test.decide(101, 100)
    with pytest.raises(ValueError, match="cannot follow"):
        test.decide(250, 300, test.decide(10, 100))  # 240 successes in 200 new draws


# ----------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    ("radii", "cap", "saving"),
    [((0.0, 0.25, 0.5), 10_000, 5.0), ((0.0, 0.25, 0.5, 0.75), 100_000, 2.5)],
)
def test_digits_like_targets(radii, cap, saving):
    """Issue 11's targets on the simulated digits distribution: the saving, and within 1 point per radius."""
    rng = np.random.default_rng(0)
    p = digits_like_p(10_000, rng)
    test = SequentialTest(radii=radii, noise=GaussianNoise(SIGMA), n_max=cap, alpha=0.001, block=100)
    sequential = simulate(test, p, rng)
    fixed = simulate_fixed_n(p, radii, GaussianNoise(SIGMA), n0=100, n=cap, alpha=0.001, rng=rng)
    assert fixed.samples.sum() / sequential.samples.sum() >= saving
    assert np.abs(sequential.certified_accuracy() - fixed.certified_accuracy()).max() <= 0.01


# ----------------------------------------------------------------------------------- stochastic curtailment
def test_curtailment_answers_no_early_where_the_cap_could_not_certify():
    """97.5% label draws after 6,200 of 10,000: r = 0.5 (t = Phi(2) = 0.9772) is still open for the upper
    side, but the remaining 3,800 draws cannot plausibly bring the count the cap needs: NO now."""
    test = SequentialTest(radii=(0.0, 0.5), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100)
    n, k, t = 6200, 6045, norm.cdf(0.5 / SIGMA)
    assert n in test.looks()
    # independently: the fewest successes at the cap whose Clopper-Pearson bound at the final level clears t
    final = test.lower_levels()[-1]
    needed = next(c for c in range(9700, 10_001) if beta.ppf(final, c, 10_001 - c) >= t)
    assert beta.ppf(final, needed - 1, 10_002 - needed) < t and test.needed_at_cap()[1] == needed
    p_up = beta.isf(0.001, k + 1, n - k)  # 99.9% Clopper-Pearson upper bound from (k, n)
    assert binom.sf(needed - k - 1, 10_000 - n, p_up) < 0.001  # P(Bin(3800, p_up) >= needed - k)
    assert test.bounds(k, n)[1] >= t  # the upper (futility) side alone would keep sampling
    no_curtailment = SequentialTest(
        radii=(0.0, 0.5), noise=GaussianNoise(SIGMA), n_max=10_000, alpha=0.001, block=100, curtailment=0.0
    )
    assert no_curtailment.decide(k, n).verdicts == (Verdict.YES, Verdict.UNDECIDED)
    decision = test.decide(k, n)
    assert decision.verdicts == (Verdict.YES, Verdict.NO) and decision.stop and decision.trials == n
    # one success more than the count at which it would still be hopeful: not curtailed
    hopeful = next(
        c for c in range(k, n) if binom.sf(needed - c - 1, 10_000 - n, beta.isf(0.001, c + 1, n - c)) >= 0.001
    )
    assert test.decide(hopeful, n).verdicts[1] == Verdict.UNDECIDED


@pytest.mark.parametrize(
    ("radii", "cap", "saving"), [((0.0, 0.25, 0.5), 10_000, 1.03), ((0.0, 0.25, 0.5, 0.75), 100_000, 1.15)]
)
def test_curtailment_saves_samples_and_loses_a_negligible_certified_fraction(radii, cap, saving):
    """Paired: the same Bernoulli streams with and without curtailment (simulate draws every stream)."""
    p = digits_like_p(10_000, np.random.default_rng(0))
    plain = simulate(
        SequentialTest(radii, GaussianNoise(SIGMA), cap, 0.001, 100, curtailment=0.0),
        p,
        np.random.default_rng(1),
    )
    curtailed = simulate(
        SequentialTest(radii, GaussianNoise(SIGMA), cap, 0.001, 100), p, np.random.default_rng(1)
    )
    assert plain.samples.mean() / curtailed.samples.mean() >= saving  # measured 1.05x and 1.19x
    assert not (curtailed.certified & ~plain.certified).any()  # it can only turn a YES into a NO
    lost = (plain.certified & ~curtailed.certified).mean(axis=0)  # [R]
    assert lost.max() <= 0.0005  # at most 5 of 10,000 images at any radius (measured: 0 to 1 of 20,000)


def test_the_counts_needed_at_the_cap_of_any_size_against_scipy():
    """Issue 22: CertifyRadii at n = 10^12 built a [n + 1] table (7.28 TiB) and died in numpy after work had
    started. The bisection gives, for every radius, the fewest successes whose final-level Clopper-Pearson bound
    (scipy's Beta quantile) clears the threshold, at caps from 1,000 to 10^12, in milliseconds."""
    radii = (0.0, 0.25, 0.5, 0.75, 2.0)
    for n_max in (1_000, 12_345, 10**12):
        test = SequentialTest(radii=radii, noise=GaussianNoise(SIGMA), n_max=n_max, alpha=0.001, block=100)
        final = test.lower_levels()[-1]
        for r, needed in zip(radii, test.needed_at_cap()):
            t = norm.cdf(r / SIGMA)

            def clears(k, t=t, r=r, final=final, n_max=n_max):
                bound = beta.ppf(final, k, n_max - k + 1) if k else 0.0
                return bound > t if r == 0 else bound >= t

            if needed == n_max + 1:
                assert not clears(n_max)
            else:
                assert clears(needed) and (needed == 0 or not clears(needed - 1)), (n_max, r, needed)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 10\^12\], got 1000000000001"):
        CertifyRadii((0.0,), 10**12 + 1, 0.001)
