"""Issue 21: the noise a radius is computed with is always the noise the counts were drawn from.

An exactly computable classifier: f(z) = 1 when pixel 0 exceeds a threshold, at exact L2 distance 0.30 from
every image, so the smoothed classifier's exact radius is 0.30 for every Gaussian sigma and a certified
radius above it is a false certificate (probability <= alpha per image). Before the fix, a reassigned
``Smooth.noise`` and a run built with another noise and handed to a ``Sampler`` certified 1.14-1.17.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest
import torch
from scipy.stats import binom

import dmae_lightning.certification as certification
from dmae_lightning.certification import Certify, Sampler, Smooth
from dmae_lightning.noise import GaussianNoise

DISTANCE, ALPHA, IMAGES = 0.30, 0.001, 20
# false certificates allowed among IMAGES images: P(more) < 1e-3 for a sound certifier
ALLOWED = int(binom.ppf(1 - 1e-3, IMAGES, ALPHA))


def threshold_classifier(images: torch.Tensor):
    """Class 1 where pixel 0 of the noisy image lies above (its clean value - DISTANCE): f's decision
    boundary is the hyperplane at L2 distance DISTANCE from the image, whatever the noise."""
    thresholds = images[:, 0, 0, 0].double() - DISTANCE  # [N]

    def classify(z: torch.Tensor) -> torch.Tensor:
        # every image of the test has the same pixel 0, so one threshold serves every row
        above = (z[:, 0, 0, 0].double() > thresholds[0]).long()  # [B]
        return torch.nn.functional.one_hot(above, 2).float()  # [B,2]

    return classify


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x = torch.rand(IMAGES, 1, 2, 2, generator=torch.Generator().manual_seed(0))  # [N,1,2,2]
    x[:, 0, 0, 0] = 0.5
    return x


def false_certificates(records) -> int:
    assert all(r.predict == 1 for r in records)  # the smoothed classifier is right everywhere
    return sum(r.radius > DISTANCE for r in records)


def test_the_noise_of_a_smooth_cannot_be_replaced(images):
    smooth = Smooth(threshold_classifier(images), 2, GaussianNoise(0.25))
    batch = [(i, x, 1) for i, x in enumerate(images)]
    procedure = Certify(100, 1000, ALPHA)
    before = smooth.run(procedure, batch, batch_size=500)
    assert 0.25 < max(r.radius for r in before) and false_certificates(before) <= ALLOWED
    with pytest.raises(AttributeError, match="fixed at construction.*build a new Smooth"):
        smooth.noise = GaussianNoise(1.0)
    after = smooth.run(procedure, batch, batch_size=500)
    assert [r.radius for r in after] == [r.radius for r in before]
    # even the private attribute cannot pair an old sampler with a new noise: a sampler serves one noise
    smooth._noise = GaussianNoise(1.0)
    poked = smooth.run(procedure, batch, batch_size=500)
    assert false_certificates(poked) <= ALLOWED and max(r.radius for r in poked) < 0.27  # sigma 1.0's 0.25
    # the sweep a notebook does: one Smooth per sigma
    for sigma in (0.25, 0.5, 1.0):
        swept = Smooth(threshold_classifier(images), 2, GaussianNoise(sigma)).run(procedure, batch, 500)
        assert false_certificates(swept) <= ALLOWED


def test_a_sampler_starts_every_run_with_its_own_noise(images):
    sampler = Sampler(threshold_classifier(images), 2, GaussianNoise(0.25), seed=0, batch_size=500)
    procedure = Certify(100, 1000, ALPHA)
    run_elsewhere = procedure.run(0, 1, GaussianNoise(1.0))
    with pytest.raises(TypeError, match="the sampler starts the run itself, with its own noise"):
        sampler.submit(0, images[0], 1, run_elsewhere)
    with pytest.raises(TypeError):  # the old call, a started run in the procedure's place
        sampler.submit(0, images[0], run_elsewhere)
    with pytest.raises(AttributeError):
        sampler.noise = GaussianNoise(1.0)
    assert sampler.images == []  # nothing was started
    records = {}
    for idx, x in enumerate(images):
        records.update(sampler.submit(idx, x, 1, procedure))
    records.update(sampler.drain())
    assert false_certificates(records.values()) <= ALLOWED and len(records) == IMAGES


def test_no_public_name_pairs_a_run_with_another_sampler():
    """Walk every public name of dmae_lightning.certification and its modules: no public callable takes
    a started run (a generator) as a parameter, and every public class holding a noise keeps it read-only."""
    modules = [certification] + [
        importlib.import_module(f"{certification.__name__}.{info.name}")
        for info in pkgutil.iter_modules(certification.__path__)
    ]
    seen, holders = 0, []
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_") or not getattr(obj, "__module__", "").startswith(certification.__name__):
                continue
            members = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                members += [
                    (f"{name}.{m}", f)
                    for m, f in inspect.getmembers(obj, inspect.isfunction)
                    if not m.startswith("_") or m == "__init__"
                ]
                if "noise" in dir(obj) or "noise" in getattr(obj, "__dataclass_fields__", {}):
                    holders.append(obj)
            for qualname, fn in members:
                seen += 1
                for parameter in inspect.signature(fn).parameters.values():
                    annotation = str(parameter.annotation)
                    assert not re.search(r"\bRun\b|Generator\[", annotation), (
                        f"{qualname}({parameter.name}: {annotation})"
                    )
                    assert parameter.name != "run", f"{qualname} takes a run"
    assert seen > 50
    for holder in holders:
        params = getattr(holder, "__dataclass_params__", None)
        if params is not None and "noise" in holder.__dataclass_fields__:
            assert params.frozen, f"{holder.__name__}.noise can be replaced"
        else:
            attribute = inspect.getattr_static(holder, "noise")
            assert isinstance(attribute, property), f"{holder.__name__}.noise is a plain attribute"
    assert {Smooth, Sampler} <= set(holders)
