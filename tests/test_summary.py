"""A run's summary as typed objects: each procedure's result against a hand count, summary.json written and read
back (older files' key names included), and the reader's one-line refusals."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import binom, norm

from dmae_lightning.certification.procedures import Certify, CertifyRadii, Predict
from dmae_lightning.certification.records import (
    ABSTAIN,
    CertifyRecord,
    PredictRecord,
    RadiiRecord,
    write_json,
)
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.summary import CertifiedSummary, PredictionSummary, SequentialCost
from dmae_lightning.noise import GaussianNoise

NOISE = GaussianNoise(0.25)
SETTINGS = {
    "sigma": 0.25,
    "n": 1000,
    "alpha": 0.001,
    "model_name": "vit",
    "dataset": "digits",
    "split": "test",
}


def allowed_false(m: int, alpha: float, rho: float) -> int:
    """k* by its definition, counting up: the least k with P(Bin(m, alpha) > k) <= rho."""
    k = 0
    while binom.sf(k, m, alpha) > rho:
        k += 1
    return k


# (radius, correct, predict, n) of 8 images; the reach at n = 1000 is 0.25 * Phi^-1(0.001^(1/1000)) = 0.617
CERTIFY = [
    CertifyRecord(i, 1, predict, radius, correct, 990, n, 0.0)
    for i, (radius, correct, predict, n) in enumerate(
        [
            (0.6, 1, 1, 1000),
            (0.5, 1, 1, 1000),
            (0.3, 1, 1, 1000),
            (0.4, 0, 2, 1000),  # wrong class: never counts
            (0.0, 0, ABSTAIN, 1000),
            (0.0, 0, ABSTAIN, 1000),
            (0.05, 1, 1, 1000),
            (0.0, 0, 0, 0),  # a wrong guess whose estimation was skipped
        ]
    )
]


def test_certify_summary_against_a_hand_count():
    result = Certify(100, 1000, 0.001).summarise(CERTIFY, (0.0, 0.25, 0.5, 1.0), NOISE, rho=0.005)
    reach = 0.25 * norm.ppf(0.001 ** (1 / 1000))
    assert result.max_certifiable_radius == pytest.approx(reach, rel=1e-12) and 0.61 < reach < 0.62
    # correct with radius >= r: 4, 3, 2 of 8 images; r = 1 is beyond the reach: None, not 0
    assert result.certified_accuracy == {"0": 4 / 8, "0.25": 3 / 8, "0.5": 2 / 8, "1": None}
    k = allowed_false(8, 0.001, 0.005)  # P(Bin(8, 0.001) > 0) = 0.008 > rho = 0.005
    assert k == 1 and result.false_certificates_allowed == k and result.rho == 0.005
    assert result.certified_accuracy_lower_bound == {"0": 3 / 8, "0.25": 2 / 8, "0.5": 1 / 8, "1": None}
    assert result.average_certified_radius == pytest.approx((0.6 + 0.5 + 0.3 + 0.05) / 8)
    assert result.abstain_rate == 2 / 8 and result.samples == 7 * 1100 + 100 and result.num_images == 8
    assert not result.grid_only and result.grid is None and result.sequential is None
    skipped = Certify(100, 1000, 0.001, skip_wrong_guess=True).summarise(CERTIFY, (0.0,), NOISE)
    assert skipped.abstain_rate is None and skipped.to_json()["abstain_rate"] is None  # not measured
    assert skipped.metrics("certify") == {"cert/acc@0": 0.5, "cert/acr": result.average_certified_radius}


def test_the_grid_procedure_answers_at_its_grid_only():
    procedure = CertifyRadii((0.5, 0.0, 0.25, 1.0), n=1000, alpha=0.001, n0=100)
    records = [
        RadiiRecord(0, 1, 0.5, 1000, 0.9, 1.0, 0.0),  # drew the whole cap
        RadiiRecord(1, 1, 0.0, 300, 0.6, 0.7, 0.0),
        RadiiRecord(2, 1, None, 200, 0.0, 0.1, 0.0),
        RadiiRecord(3, 1, 0.25, 1000, 0.8, 0.9, 0.0),  # the whole cap
    ]
    result = procedure.summarise(records, procedure.radii, NOISE, rho=0.001)
    assert result.grid_only and result.grid == (0.0, 0.25, 0.5, 1.0) == result.radii
    reach = procedure.test(NOISE).max_radius()
    assert 0.5 < reach < 1.0 and result.max_certifiable_radius == reach
    assert result.certified_accuracy == {"0": 3 / 4, "0.25": 2 / 4, "0.5": 1 / 4, "1": None}
    assert result.average_certified_radius is None and result.abstain_rate is None
    assert result.samples == 2500
    assert result.sequential == SequentialCost(2, 4 * 1100, 4 * 1100 / 2500)
    data = result.to_json()
    assert "abstain_rate" not in data and data["saving_vs_fixed_n"] == pytest.approx(1.76)
    assert result.metrics("certify_radii") == {
        "cert/acc@0": 0.75,
        "cert/acc@0.25": 0.5,
        "cert/acc@0.5": 0.25,
        "cert/acc@1": None,
    }


def test_the_summary_json_keeps_its_fields():
    """summary.json's result fields, as the job wrote them before they were typed."""
    certify = Certify(100, 1000, 0.001).summarise(CERTIFY, (0.0, 0.5), NOISE).to_json()
    assert list(certify) == [
        "radii", "num_images", "certified_accuracy", "abstain_rate", "max_certifiable_radius", "samples",
        "average_certified_radius", "rho", "false_certificates_allowed", "certified_accuracy_lower_bound",
    ]  # fmt: skip
    assert certify["radii"] == [0.0, 0.5] and certify["certified_accuracy"] == {"0": 0.5, "0.5": 0.25}
    grid = CertifyRadii((0.0,), 1000, 0.001).summarise(
        [RadiiRecord(0, 1, 0.0, 10, 0.6, 0.9, 0.0)], (0.0,), NOISE
    )
    assert set(grid.to_json()) == {
        "radii", "num_images", "certified_accuracy", "max_certifiable_radius", "samples", "samples_at_cap",
        "fixed_n_samples", "saving_vs_fixed_n", "average_certified_radius", "rho", "false_certificates_allowed",
        "certified_accuracy_lower_bound",
    }  # fmt: skip
    predicted = [
        PredictRecord(0, 1, 1, 1, 0.0),
        PredictRecord(1, 2, ABSTAIN, 0, 0.0),
        PredictRecord(2, 0, 1, 0, 0.0),
    ]
    prediction = Predict(100, 0.001).summarise(predicted, (), NOISE)
    assert prediction == PredictionSummary(num_images=3, accuracy=1 / 3, abstain_rate=1 / 3, samples=300)
    assert prediction.to_json() == {"num_images": 3, "accuracy": 1 / 3, "abstain_rate": 1 / 3, "samples": 300}
    assert prediction.metrics("predict") == {"predict/accuracy": 1 / 3, "predict/abstain_rate": 1 / 3}


@pytest.mark.parametrize("procedure", ["certify", "certify_radii", "predict"])
def test_a_summary_reads_back_as_it_was_written(procedure, tmp_path):
    made = {
        "certify": lambda: (Certify, Certify(100, 1000, 0.001).summarise(CERTIFY, (0.0, 0.25), NOISE)),
        "certify_radii": lambda: (
            CertifyRadii,
            CertifyRadii((0.0, 0.25), 1000, 0.001).summarise(
                [RadiiRecord(0, 1, 0.25, 400, 0.8, 0.9, 0.0), RadiiRecord(1, 1, None, 1000, 0.3, 0.6, 0.0)],
                (0.0, 0.25),
                NOISE,
            ),
        ),
        "predict": lambda: (
            Predict,
            PredictionSummary(num_images=2, accuracy=0.5, abstain_rate=0.5, samples=200),
        ),
    }
    kind, result = made[procedure]()
    summary = RunSummary(kind, {**SETTINGS, "subset": {"skip": 1, "max": None, "num_images": None}}, result)
    write_json(tmp_path / "summary.json", summary.to_json())
    assert json.loads((tmp_path / "summary.json").read_text())["procedure"] == procedure
    again = read_summary(tmp_path / "summary.json")
    assert again == summary and again.procedure is kind
    assert (again.sigma, again.n, again.alpha) == (0.25, 1000, 0.001)


def test_older_summaries_are_read_with_todays_names(tmp_path):
    """ "mode" (now "procedure"), "batch" (now "batch_size") and the subset's "images" (now "num_images"); the
    first summaries named no procedure (CERTIFY was the only one) and no rho, bound or reach."""
    old = {
        "mode": "certify_radii",
        **SETTINGS,
        "batch": 400,
        "subset": {"skip": 1, "max": None, "images": 500, "indices": "range(0, 10000, 20)[:500]"},
        "radii": [0.0, 0.5],
        "num_images": 500,
        "certified_accuracy": {"0": 0.5, "0.5": 0.25},
    }
    write_json(tmp_path / "summary.json", old)
    summary = read_summary(tmp_path / "summary.json")
    assert summary.procedure is CertifyRadii and summary.result.grid_only
    assert summary.settings["batch_size"] == 400 and summary.settings["subset"]["num_images"] == 500
    assert not {"mode", "batch", "radii", "certified_accuracy"} & set(summary.settings)
    assert summary.to_json()["procedure"] == "certify_radii" and "mode" not in summary.to_json()
    first = {k: v for k, v in old.items() if k != "mode"}
    result = RunSummary.from_json(first).result
    assert isinstance(result, CertifiedSummary) and not result.grid_only
    assert (result.max_certifiable_radius, result.certified_accuracy_lower_bound) == (math.inf, None)
    assert (result.rho, result.false_certificates_allowed, result.samples) == (0.001, None, None)


def test_what_is_no_run_summary_is_refused_in_one_line(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(FileNotFoundError):
        read_summary(path)
    for text, message in [
        ("[1, 2]", "a JSON list, not a run summary"),
        ('{"sigma": 0.2', "damaged ("),
        (
            json.dumps({**SETTINGS, "procedure": "certfy"}),
            "unknown procedure 'certfy' (one of certify | predict",
        ),
        (json.dumps({**SETTINGS, "sigma": "half"}), "sigma must be a number > 0, got 'half'"),
        (
            json.dumps({**SETTINGS, "num_images": 2, "certified_accuracy": [0.5]}),
            "certified_accuracy is not a table of radii",
        ),
        (
            json.dumps({**SETTINGS, "procedure": "predict", "num_images": 3}),
            "accuracy must be a number, got None",
        ),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            read_summary(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), err.value
        assert "\n" not in str(err.value)
