"""The protocol presets (conf/protocol): which images a certification run takes."""

from __future__ import annotations

import pytest
from helpers import CONF

from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.certify.params import subset_indices, validate
from dmae_lightning.jobs.compose import compose


def params(tmp_path, *overrides):
    return validate(
        compose(CONF, "certify", ["weights=x.ckpt", "noise=sigma_0.25", *overrides], output_dir=tmp_path)
    )


def test_protocols_compose_to_the_paper_subsets(tmp_path):
    # ImageNet: 1,000 of the 50,000 validation images, every 50th (Cohen et al.)
    skip, indices = subset_indices(50_000, params(tmp_path, "data=imagenet", "protocol=images1000"))
    assert skip == 50 and indices == list(range(0, 50_000, 50))
    # CIFAR-10: 500 of the 10,000 test images, every 20th; or the whole test set
    skip, indices = subset_indices(10_000, params(tmp_path, "data=cifar10", "protocol=images500"))
    assert skip == 20 and indices == list(range(0, 10_000, 20)) and len(indices) == 500
    assert subset_indices(10_000, params(tmp_path, "data=cifar10", "protocol=all")) == (
        1,
        list(range(10_000)),
    )
    # an uneven size: the first N of every (size // N)-th image
    skip, indices = subset_indices(1797, params(tmp_path, "protocol=images500"))
    assert skip == 3 and indices == list(range(0, 1500, 3))
    # without a protocol: skip and max, as before
    plain = params(tmp_path, "skip=7", "max=4")
    assert plain.num_images is None and subset_indices(100, plain) == (7, [0, 7, 14, 21])
    assert subset_indices(100, params(tmp_path, "protocol=all", "skip=7", "max=4")) == (7, [0, 7, 14, 21])


def test_protocol_mistakes_are_one_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"num_images=500 \(protocol=images500\) picks evenly spaced images itself: "
        r"leave skip and max at their defaults \(got skip=2, max=None\)",
    ):
        params(tmp_path, "protocol=images500", "skip=2")
    with pytest.raises(ConfigError, match="num_images=1000, but the test split has only 360 images"):
        subset_indices(360, params(tmp_path, "protocol=images1000"))
