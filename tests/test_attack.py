"""procedure=attack: an L2 PGD on the soft smoothed classifier, then PREDICT on the adversarial image.

The expectations come from a linear two-class classifier f(x) = 1[w.x > b], whose smoothed classifier (any sigma)
changes its decision exactly on the hyperplane: an image at L2 distance d from it can be moved across by an
attack of radius eps > d and by none of radius eps < d.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from helpers.certify import run
from helpers.noise import reference_noise
from scipy.stats import binomtest
from torch import nn

from dmae_lightning.certification import ABSTAIN, Certify, Smooth
from dmae_lightning.certification.procedures import PROCEDURES, AttackPredict, attack_stages
from dmae_lightning.certification.protocol import Attack
from dmae_lightning.certification.records import AttackRecord, ShardWriter, read_json, read_records
from dmae_lightning.certification.runs import read_summary
from dmae_lightning.certification.sampler import Sampler
from dmae_lightning.certification.summary import EmpiricalSummary
from dmae_lightning.errors import ConfigError
from dmae_lightning.noise import GaussianNoise

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA, SHAPE = 0.25, (1, 4, 4)


class Linear(nn.Module):
    """f(x) = 1[w.x > b] as two logits (0, scale (w.x - b)), w a unit vector; remembers its inputs."""

    def __init__(self, w: torch.Tensor, b: float, scale: float = 4.0):
        super().__init__()
        self.w, self.b, self.scale = w, b, scale
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        score = x.flatten(1) @ self.w.flatten() - self.b  # [B]
        return torch.stack([torch.zeros_like(score), self.scale * score], dim=1)  # [B,2]


def hyperplane() -> tuple[torch.Tensor, float]:
    """A unit w with entries of size at most 0.5 (the attacks below stay inside [0,1]) through the centre."""
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, SHAPE, generator=g) * 2 - 1
    w = signs * (0.5 + 0.5 * torch.rand(SHAPE, generator=g, dtype=torch.float64))
    w = w / w.norm()
    return w, float(w.sum() * 0.5)


def images_at(distances: list[float]) -> list[tuple[int, torch.Tensor, int]]:
    """(idx, image, label) at the given signed distances from the hyperplane (label 1 on the positive side)."""
    w, b = hyperplane()
    g = torch.Generator().manual_seed(1)
    images = []
    for idx, s in enumerate(distances):
        c = 0.5 + 0.1 * (2 * torch.rand(SHAPE, generator=g, dtype=torch.float64) - 1)
        x = c + (s - (float((w * c).sum()) - b)) * w  # w.x - b = s
        images.append((idx, x.float(), int(s > 0)))
    return images


def distance(x: torch.Tensor) -> float:
    w, b = hyperplane()
    return abs(float((w * x.double()).sum()) - b)


def linear_smooth() -> tuple[Smooth, Linear]:
    w, b = hyperplane()
    model = Linear(w.float(), b)
    return Smooth(model, 2, GaussianNoise(SIGMA), precision="32-true"), model


SIGNED = [(-1) ** i * (0.03 + 0.37 * i / 23) for i in range(24)]  # |d| from 0.03 to 0.4, both sides


def without_time(records):
    return [dataclasses.replace(r, time=0.0) for r in records]


def test_pgd_goes_straight_across_the_hyperplane():
    """The soft smoothed classifier's gradient is along w at every noise draw: the attack from x ends at
    x - eps w (toward the other side), on the ball's boundary; from a random start it keeps part of its start's
    component across w, shrunk by every projection."""
    smooth, _ = linear_smooth()
    sampler = smooth.sampler(100, 0, "cpu")
    w, _ = hyperplane()
    for idx, x, label in images_at([0.2, -0.1]):
        toward = -w.float() if label == 1 else w.float()
        for eps, random_start in ((0.05, False), (0.3, False), (0.3, True)):
            delta = sampler.attack(idx, x, Attack(3, label, eps, 20, 2.0, 16, random_start)) - x
            assert float(delta.double().norm()) <= eps * (1 + 1e-6)
            if random_start:
                assert 0.9 * eps < float((delta * toward).sum()) < eps
            else:
                assert torch.allclose(delta, eps * toward, atol=2e-6)


def test_attack_succeeds_beyond_the_distance_and_never_within_it():
    """At eps = 1.1 d the attacked PREDICT never returns the label (it predicts the other class or abstains); at
    eps = 0.9 d it never returns the other class; and every image CERTIFY certifies at a radius above eps keeps
    its label or abstains, and keeps its label outright where eps <= d - 0.1 (P(label) >= Phi(0.4) there)."""
    smooth, _ = linear_smooth()
    images = images_at(SIGNED)
    n, alpha = 500, 0.001
    for idx, x, label in images:
        d = distance(x)
        (record,) = smooth.run(AttackPredict((0.9 * d, 1.1 * d), n, alpha), [(idx, x, label)], 1000)
        within, beyond = record.predictions
        assert within in (label, ABSTAIN) and beyond != label, (idx, d, record)

    grid = (0.1, 0.2, 0.3)
    attacked = smooth.run(AttackPredict(grid, n, alpha), images, batch_size=1000)
    certified = smooth.run(Certify(100, 2000, alpha), images, batch_size=1000)
    pairs = 0
    for (idx, x, label), record, cert in zip(images, attacked, certified):
        d = distance(x)
        assert cert.predict == ABSTAIN or cert.radius <= d  # closed form: no radius beyond the hyperplane
        for eps, predict, correct in zip(record.radii, record.predictions, record.correct):
            assert correct == int(predict == label)
            if cert.predict == label and cert.radius > eps:
                pairs += 1
                assert predict in (label, ABSTAIN), (idx, eps, cert, record)
            if eps <= d - 0.1:
                assert predict == label, (idx, eps, d, record)
            if eps >= 1.1 * d:
                assert predict != label, (idx, eps, d, record)
    assert pairs >= 10  # the certified images are tested at radii below their radius


def test_predict_uses_fresh_noise_of_its_own_stage_around_the_adversarial_image():
    """The attack's m draws are the first m samples of its stage (the first forward pass: x + delta_i), PREDICT's
    counts an independent recount of its own stage's samples around x'; the two stages differ."""
    smooth, model = linear_smooth()
    (idx, x, label), n, m, eps, seed = images_at([0.15])[0], 300, 8, 0.2, 5
    (record,) = smooth.run(AttackPredict((eps,), n, 0.01, steps=6, samples=m), [(idx, x, label)], 128, seed)
    attack_stage, predict_stage = attack_stages(eps)
    assert len({attack_stage, predict_stage, 0, 1, 2}) == 5 and attack_stages(0.1) != attack_stages(eps)
    first = model.inputs[0]
    assert first.shape == (m, *SHAPE)
    assert torch.allclose(first, x + SIGMA * reference_noise(seed, idx, attack_stage, m, SHAPE), atol=1e-6)
    adv = smooth.sampler(128, seed, "cpu").attack(idx, x, Attack(attack_stage, label, eps, 6, 2.0, m, False))
    noisy = adv + SIGMA * reference_noise(seed, idx, predict_stage, n, SHAPE)
    counts = torch.bincount(model(noisy).argmax(1), minlength=2)
    n_a, n_b = int(counts.max()), int(counts.min())
    top = int(counts.argmax()) if binomtest(n_a, n_a + n_b, 0.5).pvalue <= 0.01 else ABSTAIN
    assert record.predictions == (top,)


def test_results_do_not_depend_on_batch_size_or_packing():
    torch.manual_seed(3)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    smooth = Smooth(classifier, 3, GaussianNoise(0.5), precision="32-true")
    g = torch.Generator().manual_seed(21)
    images = [(idx, torch.rand(3, 2, 2, generator=g), idx % 3) for idx in range(6)]
    procedure = AttackPredict((0.0, 0.25, 0.5), n=250, alpha=0.01, steps=5, samples=8, random_start=True)
    runs = [without_time(smooth.run(procedure, images, batch_size, seed=4)) for batch_size in (37, 100, 1000)]
    assert runs[1] == runs[0] and runs[2] == runs[0]
    alone = [without_time(smooth.run(procedure, [image], 64, seed=4))[0] for image in images]
    assert alone == runs[0]


def test_summary_is_a_hand_count_of_the_records_and_records_round_trip(tmp_path):
    smooth, _ = linear_smooth()
    images = images_at(SIGNED[:10])
    procedure = AttackPredict((0.0, 0.1, 0.25), n=200, alpha=0.01, steps=5, samples=4)
    records = smooth.run(procedure, images, batch_size=500)
    result = procedure.summarise(records, (), GaussianNoise(SIGMA))
    assert isinstance(result, EmpiricalSummary) and not AttackPredict.certifies
    for i, key in enumerate(("0", "0.1", "0.25")):
        hand = sum(r.predictions[i] == r.label for r in records) / len(records)
        assert result.empirical_robust_accuracy[key] == hand
    assert (result.num_images, result.samples, result.attack_samples) == (10, 10 * 3 * 200, 10 * 2 * 5 * 4)
    assert result.metrics("attack") == {
        f"attack/acc@{k}": v for k, v in result.empirical_robust_accuracy.items()
    }
    data = json.loads(json.dumps(result.to_json()))
    assert AttackPredict.result_from_json(data) == result

    record = dataclasses.replace(records[0], predictions=(1, ABSTAIN, 0), correct=(1, 0, 0), time=0.1 + 0.2)
    line = record.to_line()
    assert line.split("\t")[2:5] == ["0.0,0.1,0.25", "1,-1,0", "1,0,0"]
    assert AttackRecord.from_line(line) == record
    with ShardWriter(tmp_path / "attack.rank0.tsv", AttackRecord) as writer:
        for r in records:
            writer.write(r)
    assert read_records(tmp_path / "attack.rank0.tsv", AttackRecord) == records
    with pytest.raises(ValueError, match="malformed record"):
        AttackRecord.from_line(line.replace("1,-1,0", "1,-1"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be an integer"):
        AttackPredict((0.5,), 100, 0.01, steps=0)
    with pytest.raises(ValueError, match="step_size must be a number > 0"):
        AttackPredict((0.5,), 100, 0.01, step_size=math.inf)
    with pytest.raises(ValueError, match="share their noise"):
        AttackPredict((0.5, 0.5000001), 100, 0.01)
    smooth, _ = linear_smooth()
    with pytest.raises(ValueError, match="has none"):
        smooth.run(AttackPredict((0.5,), 100, 0.01), [(0, torch.full(SHAPE, 0.5), -1)], 100)


def test_sampler_serves_attacks_with_autograd_under_inference_mode():
    """Lightning's predict loop runs under inference mode; the attack turns autograd back on for itself."""
    smooth, _ = linear_smooth()
    sampler = Sampler(smooth.base_classifier, 2, GaussianNoise(SIGMA), 0, 100, "32-true")
    (idx, x, label) = images_at([0.1])[0]
    with torch.inference_mode():
        x = x.clone()  # an inference tensor, as Lightning hands it over
        done = list(sampler.submit(idx, x, label, AttackPredict((0.2,), 100, 0.01, steps=4, samples=4)))
        done += list(sampler.drain())
    assert done[0][1].predictions[0] != label


# ------------------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def attack_run(tmp_path_factory, ckpt):
    out = tmp_path_factory.mktemp("attack")
    args = ("procedure=attack", "radii=[0,0.5]", "attack.steps=3", "attack.samples=4", "n=50", "max=5")
    return out, run(out, ckpt, *args), args


def test_job_writes_records_summary_and_resumes(attack_run, ckpt, tmp_path):
    out, summary, args = attack_run
    records = read_records(out / "attack.tsv", AttackRecord)
    assert [r.idx for r in records] == list(range(5)) and all(r.radii == (0.0, 0.5) for r in records)
    on_disk = read_json(out / "summary.json")
    assert on_disk == json.loads(json.dumps(summary)) and on_disk["procedure"] == "attack"
    assert on_disk["attack"] == {
        "steps": 3,
        "step_size": 2.0,
        "samples": 4,
        "random_start": False,
        "precision": "32-true",
    }
    for i, key in enumerate(("0", "0.5")):
        assert on_disk["empirical_robust_accuracy"][key] == sum(r.correct[i] for r in records) / 5
    run_summary = read_summary(out / "summary.json")
    assert run_summary.procedure is PROCEDURES["attack"] and isinstance(run_summary.result, EmpiricalSummary)
    assert not (out / "certified_accuracy.png").exists()

    # resume: a shard of 2 records and a torn third, as a killed job leaves it
    marked = [dataclasses.replace(r, time=1000.0 + r.idx) for r in records]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "attack.rank0.tsv").write_text(
        "".join(f"{line}\n" for line in [AttackRecord.header(), *(r.to_line() for r in marked[:2])])
        + marked[2].to_line()[:7]
    )
    shutil.copy(out / "attack.params.json", resumed / "attack.params.json")
    shutil.copytree(out / ".hydra", resumed / ".hydra")
    run(resumed, ckpt, *args)
    final = read_records(resumed / "attack.tsv", AttackRecord)
    assert without_time(final) == without_time(records)
    assert [r.idx for r in final if r.time >= 1000.0] == [0, 1]


def test_job_refuses_a_bad_attack_setting(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"attack.samples must be an integer >= 1, got 0"):
        run(tmp_path, ckpt, "procedure=attack", "attack.samples=0")


def test_cross_check_counts_by_hand_and_fires_on_a_certifier_that_inflates_radii():
    """certification.metrics.attacked_certificates: images certified at r that the attack of radius r turned to
    another class, against binom.isf(rho, m, 2 alpha) (each such image does so with probability <= 2 alpha when
    the certificates are sound). The sound certifier passes; the same records with every radius tripled (an
    unsound certifier) are caught: images at distance d < 3 r' are certified beyond the hyperplane."""
    from scipy.stats import binom

    from dmae_lightning.certification.metrics import attacked_certificates

    smooth, _ = linear_smooth()
    images = images_at(SIGNED)
    alpha, rho, grid = 0.001, 0.001, (0.1, 0.2)
    attacked = smooth.run(AttackPredict(grid, 300, alpha), images, batch_size=1000)
    certified = smooth.run(Certify(100, 2000, alpha), images, batch_size=1000)
    inflated = [dataclasses.replace(c, radius=3 * c.radius) for c in certified]
    for records, sound in ((certified, True), (inflated, False)):
        counts = attacked_certificates(records, attacked, alpha, rho)
        for position, eps in enumerate(grid):
            at_r = [
                (a.label, a.predictions[position])
                for c, a in zip(records, attacked)
                if c.predict == c.label and c.radius >= eps
            ]
            flipped = sum(p not in (label, ABSTAIN) for label, p in at_r)
            allowed = next(k for k in range(len(at_r) + 1) if binom.sf(k, len(at_r), 2 * alpha) <= rho)
            assert counts[f"{eps:g}"] == (len(at_r), flipped, allowed)
        fired = any(flipped > allowed for _, flipped, allowed in counts.values())
        assert fired != sound, counts


def test_analyze_puts_the_attack_beside_the_certification_of_the_same_checkpoint(
    attack_run, ckpt, tmp_path, capsys
):
    """analyze: an attack run of the same checkpoint, noise and images adds an "under attack (empirical)" row after
    the best-over-sigma envelope and the cross-check line; an attack run without its certification is skipped."""
    from dmae_lightning.jobs.analyze import main

    out, summary, _ = attack_run
    certified = tmp_path / "certify"
    run(certified, ckpt, "max=5", "n=50")
    assert main([str(certified), str(out), "--radii", "0", "0.5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    robust = summary["empirical_robust_accuracy"]
    assert (
        f"| 0.25 under attack (empirical) | {100 * robust['0']:.1f} | {100 * robust['0.5']:.1f} |" in printed
    )
    assert "- sigma=0.25 under attack: cross-check: r=0: " in printed
    assert printed.count(": consistent") == 1 and "ALARM" not in printed
    assert main([str(out), "--out", str(tmp_path)]) == 2
    assert "an attack run is shown beside a certification run" in capsys.readouterr().err
