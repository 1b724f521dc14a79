"""One Hydra compose for tests, notebooks and the quickstart's stages, as the command line would compose.
Imports: :mod:`.resolvers` (so that every interpolation resolves), :mod:`.vocabulary`."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import dmae_lightning.jobs.resolvers  # noqa: F401 (registers the resolvers the configs use)
from dmae_lightning.jobs.vocabulary import refuse_old_spellings

log = logging.getLogger(__name__)


def compose(
    config_dir, config_name: str, overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None
):
    """Compose a job config outside ``@hydra.main`` (tests, notebooks), as the command line would.

    ``${hydra:...}`` interpolations resolve against the composed Hydra config; ``output_dir``
    stands in for the run directory Hydra would create.
    """
    refuse_old_spellings(config_name, overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@contextlib.contextmanager
def keep_hydra_config():
    """Compose other jobs' configs inside and get the running job's Hydra config back afterwards: ``compose``
    sets Hydra's global config, which ``${hydra:...}`` interpolations of the job's own config (its run
    directory among them) resolve against."""
    instance = HydraConfig.instance()
    saved = instance.cfg
    try:
        yield
    finally:
        instance.cfg = saved
