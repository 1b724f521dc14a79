"""Certify a smoothed classifier: python certify.py weights=PATH [key=value ...] (conf/certify.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.certify.job import certify
from dmae_lightning.jobs.vocabulary import exit_on_old_spellings


@hydra.main(version_base="1.3", config_path="conf", config_name="certify")
def main(cfg: DictConfig) -> None:
    try:
        certify(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    exit_on_old_spellings("certify", sys.argv[1:])
    main()
