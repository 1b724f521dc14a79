"""Certify a smoothed classifier: python certify.py ckpt_path=PATH [key=value ...] (conf/certify.yaml)."""

import hydra
from omegaconf import DictConfig

from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.certify.job import certify


@hydra.main(version_base="1.3", config_path="conf", config_name="certify")
def main(cfg: DictConfig) -> None:
    try:
        certify(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
