"""docs/configuration.md lists every key a user can set (issue 23, one configuration vocabulary): every top-level
key of the composed job configs, every config group and every renamed (old) key, each as `key`."""

from __future__ import annotations

import pytest
from helpers import CONF, REPO

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.vocabulary import RENAMED

DOC = REPO / "docs" / "configuration.md"
JOBS = {
    "task=pretrain": ("train", ["task=pretrain"]),
    "task=finetune": ("train", ["experiment=finetune_digits"]),
    "quickstart": ("train", ["experiment=quickstart"]),
    "certify": ("certify", ["weights=x.ckpt", "noise=sigma_0.25"]),
}


def undocumented(keys) -> list[str]:
    text = DOC.read_text()
    return sorted(key for key in keys if f"`{key}`" not in text)


@pytest.mark.parametrize("job", JOBS)
def test_every_top_level_key_is_documented(job, tmp_path):
    config_name, overrides = JOBS[job]
    cfg = compose(CONF, config_name, overrides, output_dir=tmp_path)
    assert not undocumented(cfg.keys()), f"{job}: add these keys to {DOC.name}"


def test_every_group_and_renamed_key_is_documented():
    groups = [path.name for path in CONF.iterdir() if path.is_dir()]
    renamed = [old for table in RENAMED.values() for old in table]
    assert not undocumented([*groups, *renamed]), f"add these to {DOC.name}"
