"""Issue 26 items 5 and 7: two forward batches in flight, and the tie rule of the vote under bf16.

5. With ``pipeline`` the sampler launches batch t+1 before it reads back batch t's counts (from the requests
   already known, whenever they fill a batch). On the CPU there is nothing to overlap; what is tested here is
   that every record is identical with pipelining on and off and for several batch sizes, and that the
   read-backs that block with no later batch launched (the device would idle while the host decides) fall
   from one per read-back to the few of the final drain.
7. A row's vote is the lowest class index among its exactly equal maximal logits, in every batch size, under
   bf16 autocast too (a classifier whose bf16 logits tie).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from dmae_lightning.certification import AttackPredict, Certify, CertifyRadii, Predict, Smooth
from dmae_lightning.certification.protocol import Draw, Procedure, Run
from dmae_lightning.certification.sampler import Sampler, top_class
from dmae_lightning.noise import GaussianNoise

SIGMA = 0.5


class Forward(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(x)


def three_class_classifier() -> Forward:
    g = torch.Generator().manual_seed(3)
    weights, bias = torch.randn(3, 12, generator=g), torch.tensor([0.0, 0.3, -0.2])
    return Forward(lambda x: x.flatten(1) @ weights.T + bias)  # [B,3]


def images(count: int) -> list[tuple[int, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(21)
    return [(idx, torch.rand(3, 2, 2, generator=g), idx % 3) for idx in range(count)]


def without_time(records):
    return [dataclasses.replace(r, time=0.0) for r in records]


def count_stalls(sampler: Sampler, classifier: Forward) -> list[bool]:
    """Wrap the sampler's read-back: one entry per read-back of counts, True where it blocks the host while no
    later batch has been launched (the batch read back is the last one the classifier was called for)."""
    stalls: list[bool] = []
    collect = sampler._collect

    def wrapped(launched):
        stalls.append(classifier.calls == launched.number)
        return collect(launched)

    sampler._collect = wrapped
    return stalls


PROCEDURES = [
    Certify(n0=100, n=450, alpha=0.001),
    Predict(n=300, alpha=0.01),
    CertifyRadii((0.0, 0.1, 0.25), n=2000, alpha=0.001),
    AttackPredict((0.0, 0.2), n=200, alpha=0.01, steps=3, samples=4),
]


@pytest.mark.parametrize("procedure", PROCEDURES, ids=lambda p: p.name)
def test_records_identical_with_pipelining_on_and_off_for_every_batch_size(procedure):
    batch = images(7)
    runs = {}
    for pipeline in (False, True):
        for batch_size in (37, 100, 1000):
            smooth = Smooth(three_class_classifier(), 3, GaussianNoise(SIGMA), pipeline=pipeline)
            runs[pipeline, batch_size] = without_time(smooth.run(procedure, batch, batch_size, seed=4))
    reference = runs[False, 100]
    assert all(records == reference for records in runs.values())
    assert len({str(r) for r in reference}) > 1  # different images, different records


def run_streaming(procedure, pipeline: bool, batch_size: int, count: int = 30):
    """Images submitted one by one and drained at the end, as the certify job does."""
    classifier = three_class_classifier()
    sampler = Sampler(classifier, 3, GaussianNoise(SIGMA), 7, batch_size, "32-true", pipeline=pipeline)
    stalls = count_stalls(sampler, classifier)
    records: dict[int, Any] = {}
    for idx, x, label in images(count):
        records.update(sampler.submit(idx, x, label, procedure))
    submitting, stalls_while_submitting = list(stalls), sum(stalls)
    records.update(sampler.drain())
    assert sampler.images == [] and sampler._in_flight is None
    ordered = without_time([records[idx] for idx in range(count)])
    return ordered, stalls, len(submitting), stalls_while_submitting, classifier.calls


@pytest.mark.parametrize(
    "procedure",
    [CertifyRadii((0.0, 0.1, 0.25), n=5000, alpha=0.001), Certify(n0=100, n=600, alpha=0.001)],
    ids=lambda p: p.name,
)
def test_pipelining_removes_the_read_backs_that_block_before_the_next_launch(procedure):
    off, stalls_off, _, _, launches_off = run_streaming(procedure, False, 250)
    on, stalls_on, read_while_submitting, stalls_while_submitting, launches_on = run_streaming(
        procedure, True, 250
    )
    assert on == off
    # Without pipelining every read-back waits for the batch just launched, with nothing behind it.
    assert all(stalls_off) and len(stalls_off) > 20
    # With it, not one while images keep arriving: the next batch is always launched first ...
    assert read_while_submitting > 10 and stalls_while_submitting == 0
    # ... and only in the final drain, when the known requests no longer fill a batch, does one wait.
    assert sum(stalls_on) <= len(stalls_off) // 4
    print(
        f"{procedure.name}: read-backs blocking before the next launch {sum(stalls_off)}/{len(stalls_off)} "
        f"without pipelining, {sum(stalls_on)}/{len(stalls_on)} with it; launches {launches_off} / {launches_on}"
    )


def test_pipelining_is_on_by_default_on_cuda_only():
    classifier = three_class_classifier()
    assert Sampler(classifier, 3, GaussianNoise(SIGMA), 0, 64).pipeline is False
    assert Sampler(classifier, 3, GaussianNoise(SIGMA), 0, 64, pipeline=True).pipeline is True
    assert Sampler(classifier, 3, GaussianNoise(SIGMA), 0, 64, device="meta").pipeline is False


def test_an_error_in_a_pipelined_run_leaves_nothing_in_flight():
    broken = Forward(lambda z: torch.full((z.shape[0], 3), float("nan")))
    smooth = Smooth(broken, 3, GaussianNoise(SIGMA), pipeline=True)
    with pytest.raises(ValueError, match="NaN/Inf logits"):
        smooth.run(Certify(10, 100, 0.001), images(20), batch_size=64)
    sampler = smooth.sampler(64, 0, "cpu")
    assert sampler.images == [] and sampler._in_flight is None
    smooth.base_classifier.fn = lambda z: torch.zeros(z.shape[0], 3)
    assert {r.predict for r in smooth.run(Certify(10, 100, 0.001), images(20), batch_size=64)} == {0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_the_next_batch_is_launched_without_a_host_synchronisation():
    linear = nn.Linear(3 * 8 * 8, 10).cuda()
    classifier = Forward(lambda z: linear(z.flatten(1)))
    sampler = Sampler(classifier, 10, GaussianNoise(SIGMA), 0, 500, device="cuda")
    assert sampler.pipeline
    for idx in range(10):  # 10 x 100 selection draws: each batch of 500 completes 5 requests
        sampler.add(idx, torch.rand(3, 8, 8, device="cuda"), 0, Certify(100, 1000, 0.001))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = sampler._launch()  # completes 5 requests: their tallies copied without waiting
        second = sampler._launch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first is not None and second is not None and len(first.complete) == len(second.complete) == 5
    assert first.tallies.is_pinned()
    first.ready.synchronize()
    assert first.tallies[:, :-1].sum(dim=1).tolist() == [100] * 5


# ----------------------------------------------------------------------------------------------- bf16 ties
class Counts(Procedure):
    """Returns the counts of ``n`` draws of stage 0 (to test the votes themselves)."""

    name: ClassVar[str] = "counts"
    record_type: ClassVar[type] = object
    certifies: ClassVar[bool] = False

    def __init__(self, n: int):
        self.n = n

    def run(self, idx: int, label: int, noise) -> Run:
        return (yield Draw(stage=0, num=self.n))

    def settings(self) -> dict:
        return {"n": self.n}

    def summarise(self, records: Sequence[Any], radii, noise, rho=0.0) -> Any:
        raise NotImplementedError

    @classmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def from_params(cls, params, radii) -> Counts:
        raise NotImplementedError


def tied_logits(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,3] bf16 logits from one noisy pixel s: (s, s * (1 + 2^-10), 0). In float32 class 1
    beats class 0 wherever s > 0; in bf16 (8 significant bits) the two round to one value for most s, an exact
    tie. Row by row, so a row's logits do not depend on its batch."""
    s = x[:, 0, 0, 0].float()
    return torch.stack([s, s * (1 + 2**-10), torch.zeros_like(s)], dim=1).to(torch.bfloat16)


def expected_votes(logits: torch.Tensor) -> list[int]:
    """The documented rule, in plain Python: the lowest class index among the row's exact maxima."""
    votes = []
    for row in logits.float().tolist():
        top = max(row)
        votes.append(min(c for c, v in enumerate(row) if v == top))
    return votes


def test_top_class_takes_the_lowest_index_among_exact_maxima():
    logits = torch.tensor(
        [[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [-1.0, -2.0, -1.0], [0.0, 0.0, 1.0]]
    )
    assert top_class(logits).tolist() == [0, 1, 0, 0, 2]
    assert top_class(logits.to(torch.bfloat16)).tolist() == [0, 1, 0, 0, 2]
    inf = float("inf")
    assert top_class(torch.tensor([[inf, inf, 0.0], [-inf, -inf, -inf]])).tolist() == [0, 0]
    assert top_class(torch.tensor([[0.0, float("nan"), 1.0]])).tolist() == [2]  # refused anyway: in range


def test_bf16_ties_are_counted_by_the_documented_rule_in_every_batch_size():
    n, x = 2000, torch.full((3, 2, 2), 0.5)
    classifier = Forward(tied_logits)
    smooth = Smooth(classifier, 3, GaussianNoise(SIGMA), precision="bf16-mixed")
    samples = smooth.sampler(64, seed=3, device="cpu").stage_samples(0, 0, n, x)  # [n,C,H,W], the Draw's rows
    logits = tied_logits(samples)
    votes = expected_votes(logits)
    expected = torch.bincount(torch.tensor(votes), minlength=3).tolist()
    ties = (logits[:, 0] == logits[:, 1]) & (logits[:, 0] > 0)
    assert ties.sum() > n // 4  # many exact ties between classes 0 and 1, all counted for class 0
    assert (logits[:, 1] > logits[:, 0]).sum() > 0  # and a few rows where class 1 wins outright
    highest_index = torch.bincount(2 - logits.float().flip(1).argmax(dim=1), minlength=3).tolist()
    assert highest_index != expected  # the tie rule decides these counts
    for batch_size in (1, 7, 64, 100, 333, 2000):
        for pipeline in (False, True):
            smooth = Smooth(classifier, 3, GaussianNoise(SIGMA), precision="bf16-mixed", pipeline=pipeline)
            [counts] = smooth.run(Counts(n), [(0, x, 0)], batch_size, seed=3)
            assert counts.tolist() == expected, (batch_size, pipeline)
    assert Smooth(classifier, 3, GaussianNoise(SIGMA), precision="bf16-mixed").predict(x, n, 0.01, 100) == 0


def test_bf16_autocast_linear_with_duplicated_class_counts_the_lower_class():
    """A bf16-autocast Linear head whose classes 1 and 2 have the same weights: class 2 never gets a vote."""
    torch.manual_seed(0)
    head = nn.Linear(12, 3)
    with torch.no_grad():
        head.weight[2] = head.weight[1]
        head.bias[2] = head.bias[1]
    classifier = nn.Sequential(nn.Flatten(1), head)
    x = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(5))
    for batch_size in (1, 50, 300):
        smooth = Smooth(classifier, 3, GaussianNoise(SIGMA), precision="bf16-mixed")
        [counts] = smooth.run(Counts(300), [(0, x, 0)], batch_size, seed=1)
        assert counts[2] == 0 and counts[1] > 0 and counts.sum() == 300
