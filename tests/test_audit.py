"""The certificate audit (issue 25.2): the ladder of radii CERTIFY can give against an independent scipy
computation, a file certified at alpha = 0.01 but declared at 0.001, 3-significant-digit rounding without false
alarms, clean files of ours (written by the procedures themselves), and each row-level finding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from dmae_lightning.certification import Certify, CertifyRadii, Smooth
from dmae_lightning.certification.audit import (
    Ladder,
    RadiusFormula,
    check_indices,
    check_rows,
    printed_tolerance,
    read_result_file,
)
from dmae_lightning.certification.confidence import clopper_pearson_lower
from dmae_lightning.certification.records import (
    ABSTAIN,
    RadiiRecord,
    ShardWriter,
    write_json,
)
from dmae_lightning.certification.runs import RunSummary
from dmae_lightning.jobs.audit import main, radius_formula
from dmae_lightning.noise import DiscreteGaussianNoise, GaussianNoise

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def reference_radius(k, n: int, alpha: float, sigma: float) -> np.ndarray:
    """sigma * Phi^-1 of the one-sided Clopper-Pearson bound, written here from scipy alone (0 successes: 0)."""
    k = np.asarray(k)
    p = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    return sigma * norm.ppf(p)


def cohen_log(rows, path: Path, protocol: dict | None = None) -> Path:
    """A log as locuslab/smoothing's certify.py writes it: radius with '{:.3}', time in seconds."""
    lines = [HEADER, *(f"{i}\t{y}\t{c}\t{r:.3}\t{ok}\t15.4" for i, y, c, r, ok in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if protocol is not None:
        path.with_name(path.name + ".yaml").write_text("".join(f"{k}: {v}\n" for k, v in protocol.items()))
    return path


def certify_rows(n: int, alpha: float, sigma: float, count: int = 400, seed: int = 0):
    """(idx, label, predict, radius, correct) of CERTIFY at (n, alpha): counts from a spread of p, many at the
    cap (the ladder's top), some at the fewest successes that certify (tiny radii printed as 1.23e-05)."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0.3, 1.0, count - 60), np.ones(50)])
    k = rng.binomial(n, p)
    first = Ladder(RadiusFormula(sigma), n, alpha, clopper_pearson_lower).first
    k = np.concatenate([k, np.arange(first, first + 10)])
    radius = reference_radius(k, n, alpha, sigma)
    rows = []
    for i, (kk, r) in enumerate(zip(k, radius)):
        label = int(rng.integers(10))
        certified = kk >= first
        predict = (label if rng.random() < 0.9 else (label + 1) % 10) if certified else ABSTAIN
        rows.append((20 * i, label, predict, float(r) if certified else 0.0, int(predict == label)))
    return rows


PROTOCOL = dict(
    label="'Cohen et al. 2019, ResNet-110'", noise="gaussian", sigma=0.25, n0=100, n=100_000, alpha=0.001,
    dataset="cifar10", split="test", skip=20, max=400,
)  # fmt: skip


# --- the ladder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,n,alpha", [(0.25, 1_000, 0.001), (0.5, 10_000, 0.01), (1.0, 100, 0.05)])
def test_ladder_is_sigma_phi_inverse_of_the_clopper_pearson_bound(sigma, n, alpha):
    ladder = Ladder(RadiusFormula(sigma), n, alpha, clopper_pearson_lower)
    k = np.arange(n + 1)
    p = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    first = int(np.argmax(p >= 0.5))  # fewer successes abstain
    assert ladder.first == first
    np.testing.assert_array_equal(ladder.radius(k[first:]), reference_radius(k[first:], n, alpha, sigma))
    assert ladder.top == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)


def test_largest_radii_of_the_method_page():
    """0.953 at sigma 0.25, n = 100,000, alpha = 0.001; 0.978 at alpha = 0.01; about 0.80 at n = 10,000."""
    top = {a: Ladder(RadiusFormula(0.25), 100_000, a, clopper_pearson_lower).top for a in (0.001, 0.01)}
    assert (f"{top[0.001]:.3}", f"{top[0.01]:.3}") == ("0.953", "0.978")
    assert Ladder(RadiusFormula(0.25), 10_000, 0.001, clopper_pearson_lower).top == pytest.approx(
        0.80, abs=0.001
    )


@pytest.mark.parametrize("noise", [GaussianNoise(0.25), DiscreteGaussianNoise(0.5)])
def test_radius_formula_is_the_noise_s_own_bit_for_bit(noise):
    formula = radius_formula(noise)
    p = np.concatenate([np.linspace(0.5, 1.0, 41), clopper_pearson_lower(np.arange(990, 1001), 1000, 0.001)])
    assert list(formula.radius(p)) == [noise.radius(float(q)) for q in p]
    r = np.linspace(0.0, 2.0, 21)
    assert list(formula.probability_for_radius(r)) == [noise.probability_for_radius(float(x)) for x in r]
    assert formula.threshold == noise.probability_for_radius(0.0)


def test_printed_tolerance_is_half_a_unit_of_the_last_digit():
    assert printed_tolerance("0.953") == pytest.approx(5e-4)
    assert printed_tolerance("0.0831") == pytest.approx(5e-5)
    assert printed_tolerance("1.5e-06") == pytest.approx(5e-8)
    assert printed_tolerance("0.0") == pytest.approx(0.05)
    assert printed_tolerance("2") == pytest.approx(0.5)
    assert printed_tolerance("nan") == 0.0


def test_every_rung_printed_to_3_digits_is_on_the_ladder_and_between_rungs_is_not():
    ladder = Ladder(RadiusFormula(0.25), 1_000, 0.001, clopper_pearson_lower)
    rungs = ladder.radius(np.arange(ladder.first, 1_001))
    texts = [f"{r:.3}" for r in rungs]
    beyond, on, counts = ladder.locate([float(t) for t in texts], [printed_tolerance(t) for t in texts])
    assert on.all() and not beyond.any()
    # half way between the three top rungs, printed in full: off the ladder; a hair above the top: beyond it
    middle = (rungs[-3:-1] + rungs[-2:]) / 2
    beyond, on, _ = ladder.locate(middle, np.zeros(2))
    assert not on.any() and not beyond.any()
    beyond, on, _ = ladder.locate([ladder.top * (1 + 1e-12)], [0.0])
    assert beyond.all() and not on.any()


# --- published logs ------------------------------------------------------------------------------------------


def test_a_log_certified_at_alpha_001_but_declared_at_0001_is_flagged(tmp_path, capsys):
    rows = certify_rows(100_000, 0.01, 0.25)
    log = cohen_log(rows, tmp_path / "sigma_0.25", {**PROTOCOL, "max": len(rows)})
    assert main([str(log)]) == 1
    out = capsys.readouterr().out
    top = sum(r[3] >= 0.9775 for r in rows if r[2] != ABSTAIN)
    assert (
        f"  beyond-max: {top} rows with a radius above 0.9529, the largest n=100000, alpha=0.001 can give"
        in out
    )
    assert "note: sigma=0.25: the radii fit (n=100000, alpha=0.01), the largest radius at its maximum" in out


def test_three_significant_digits_give_no_false_alarm(tmp_path, capsys):
    """The same log declared at its own alpha: every one of its rounded radii (0.978 down to 1.2e-05) passes."""
    rows = certify_rows(100_000, 0.01, 0.25)
    assert any("e-" in f"{r[3]:.3}" for r in rows)  # tiny radii in scientific notation are among them
    log = cohen_log(rows, tmp_path / "log", {**PROTOCOL, "alpha": 0.01, "max": len(rows)})
    assert main([str(log)]) == 0
    assert capsys.readouterr().out.endswith("rows; protocol: certify, gaussian sigma=0.25, n=100000, n0=100, "
                                            f"alpha=0.01, cifar10 test, skip 20, max {len(rows)} ({log}.yaml)\n  clean\n")  # fmt: skip


def test_an_undeclared_protocol_is_a_finding_with_the_fitting_candidates(tmp_path, capsys):
    rows = certify_rows(100_000, 0.01, 0.25)
    log = cohen_log(rows, tmp_path / "noise_0.25" / "test" / "sigma_0.25")
    assert main([str(log)]) == 1
    out = capsys.readouterr().out
    assert "  protocol: 1 file without a declared protocol: write sigma_0.25.yaml next to it" in out
    assert "note: sigma 0.25 read from the path; Gaussian noise assumed" in out
    assert "the radii fit (n=100000, alpha=0.01), the largest radius at its maximum" in out


def test_row_findings_each_flagged(tmp_path, capsys):
    """Duplicates, missing and unexpected indices against skip 20 / max 6, correct != (predict == label), and
    an abstention with a radius."""
    good = reference_radius(99_990, 100_000, 0.001, 0.25)
    rows = [
        (0, 3, 3, good, 1),
        (20, 3, 3, good, 1),
        (20, 3, 3, good, 1),  # duplicate
        (60, 3, 3, good, 0),  # correct should be 1
        (80, 3, ABSTAIN, 0.5, 0),  # abstains with a radius
        (100, 3, 4, good, 1),  # correct should be 0
        (7, 3, 3, good, 1),  # not an image of the subset; idx 40 is missing
    ]
    log = cohen_log(rows, tmp_path / "log", {**PROTOCOL, "max": 6})
    assert main([str(log)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "  duplicate-idx: 1 image indices appear more than once; first: idx 20 (2x)" in lines
    assert "  missing-idx: 1 declared images have no row (of 6); first: idx 40" in lines
    assert "  unexpected-idx: 1 rows are not among the declared images; first: idx 7" in lines
    assert (
        "  correct-mismatch: 2 rows whose correct is not predict == label; first: "
        "idx 60 (label 3, predict 3, correct 0), idx 100 (label 3, predict 4, correct 1)"
    ) in lines
    assert (
        "  abstain-radius: 1 abstentions (predict -1) with a radius other than 0; first: idx 80 (radius 0.5)"
        in lines
    )
    assert "  5 kind(s) of finding" in lines and not any("ladder" in line for line in lines)


def test_row_checks_are_silent_on_a_consistent_file(tmp_path):
    rows = certify_rows(1_000, 0.001, 0.5, count=80)
    records = read_result_file(cohen_log(rows, tmp_path / "log")).records
    assert check_rows(records) == [] and check_indices(records, [20 * i for i in range(len(rows))]) == []


def test_unreadable_paths_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main([str(tmp_path / "notes.txt"), str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "not a result file" in err and "none of the paths holds a result file" in err


# --- runs of ours, written by the procedures themselves ------------------------------------------------------


class LinearBinary(nn.Module):
    """f(x) = 1 if x_0 > b else 0 (x_0 the first pixel): class 1 far above b, class 0 below, ties near b."""

    def __init__(self, b: float):
        super().__init__()
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1)[:, 0] - self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


LEVELS = (255, 255, 128, 80, 60, 40, 25, 0)  # 8-bit pixel levels (the discrete noise needs them)


def run_dir(tmp_path: Path, procedure, noise, levels=LEVELS, last_label: int = 0) -> Path:
    """A run directory of ``procedure`` on 8 images of 1x4x4 pixels (every pixel levels[i] / 255; label 1 but
    for the last, ``last_label``), as the certify job writes it: <procedure>.tsv and summary.json. Images far above
    LinearBinary(0.1)'s threshold are certified at the ladder's top, those near it abstain."""
    values = [level / 255 for level in levels]
    images = [
        (i, torch.full((1, 4, 4), v), 1 if i < len(values) - 1 else last_label) for i, v in enumerate(values)
    ]
    records = Smooth(LinearBinary(0.1), 2, noise).run(procedure, images, batch_size=1000)
    out = tmp_path / procedure.name
    with ShardWriter(out / f"{procedure.name}.tsv", procedure.record_type) as writer:
        for record in records:
            writer.write(record)
    result = procedure.summarise(records, (0.0, 0.25, 0.5), noise)
    settings = {
        **procedure.settings(), "noise": noise.config(), "sigma": noise.sigma, "dataset": "toy", "split": "test",
        "subset": {"skip": 1, "max": None, "num_images": None, "indices": f"range(0, {len(values)}, 1)[:None]"},
    }  # fmt: skip
    write_json(out / "summary.json", RunSummary(type(procedure), settings, result).to_json())
    return out


def tamper(path: Path, line: int, column: int, value: str) -> None:
    lines = path.read_text().split("\n")
    cells = lines[line].split("\t")
    cells[column] = value
    lines[line] = "\t".join(cells)
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("noise", [GaussianNoise(0.25), DiscreteGaussianNoise(0.25)])
def test_a_certify_run_of_ours_is_clean_and_a_changed_radius_is_flagged(tmp_path, capsys, noise):
    run = run_dir(tmp_path, Certify(100, 1_000, 0.001), noise)
    records = read_result_file(run / "certify.tsv").records
    assert {r.predict for r in records} >= {ABSTAIN, 1} and any(r.n_a == 1000 for r in records)  # type: ignore[attr-defined]
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.endswith("  clean\n")
    certified = next(i for i, r in enumerate(records, start=1) if r.predict == 1 and r.n_a < 1000)  # type: ignore[attr-defined]
    radius = records[certified - 1].radius  # type: ignore[attr-defined]
    tamper(run / "certify.tsv", certified, 3, repr(radius + 1e-9))
    assert main([str(run / "certify.tsv")]) == 1
    out = capsys.readouterr().out
    assert "  radius-vs-counts: 1 rows whose radius or abstention is not what their own n_a gives" in out
    assert "  off-ladder: 1 rows with a radius no count k <= n gives at n=1000, alpha=0.001 (exactly)" in out


def test_a_certify_radii_run_of_ours_is_clean_and_a_changed_bound_is_flagged(tmp_path, capsys):
    run = run_dir(tmp_path, CertifyRadii((0.0, 0.25, 0.5), 1_000, 0.001), GaussianNoise(0.25))
    records = read_result_file(run / "certify_radii.tsv").records
    assert {r.radius for r in records} >= {None, 0.25}  # type: ignore[attr-defined]
    assert main([str(run)]) == 0
    capsys.readouterr()
    # certified rows, not at a look's top bound (all successes): there a larger lower bound is beyond the max
    lines = [
        i
        for i, r in enumerate(records, start=1)
        if isinstance(r, RadiiRecord) and r.radius is not None and r.lower < 0.9
    ]
    lower = records[lines[0] - 1].lower  # type: ignore[attr-defined]
    tamper(run / "certify_radii.tsv", lines[0], 4, repr(lower * (1 + 1e-9)))  # no bound of any look
    tamper(run / "certify_radii.tsv", lines[1], 4, repr(0.9999))  # above every look's, and clears r = 0.5
    tamper(run / "certify_radii.tsv", lines[2], 2, "0.3")  # a radius off the grid
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "  off-grid: 1 rows with a radius not in the grid [0.0, 0.25, 0.5]" in out
    assert (
        f"  off-ladder: 1 rows with a lower bound no count gives at a look they reached; first: idx {lines[0] - 1}"
        in out
    )
    assert (
        f"  beyond-max: 1 rows with a lower bound above the largest any look they reached gives; first: idx {lines[1] - 1} (lower 0.9999 > 0.95"
        in out
    )
    assert "  radius-vs-lower: " in out and f"idx {lines[2] - 1} (radius 0.3, lower clears" in out


def test_skipped_wrong_guesses_are_not_radii(tmp_path, capsys):
    run = run_dir(
        tmp_path, Certify(100, 1_000, 0.001, skip_wrong_guess=True), GaussianNoise(0.25), last_label=1
    )
    assert any(r.n == 0 for r in read_result_file(run / "certify.tsv").records)  # type: ignore[attr-defined]
    assert main([str(run)]) == 0


@pytest.mark.slow  # a fresh python -m dmae_lightning.jobs.audit (~20 s of imports here)
def test_runs_as_a_module(tmp_path):
    rows = certify_rows(100_000, 0.01, 0.25, count=100)
    log = cohen_log(rows, tmp_path / "log", {**PROTOCOL, "max": len(rows)})
    result = subprocess.run(
        [sys.executable, "-m", "dmae_lightning.jobs.audit", str(log)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "beyond-max" in result.stdout
