"""Train a DMAE model: python train.py experiment=pretrain_digits (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.quickstart import quickstart
from dmae_lightning.jobs.train import train
from dmae_lightning.jobs.vocabulary import exit_on_old_spellings


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        quickstart(cfg) if cfg.task.name == "quickstart" else train(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    exit_on_old_spellings("train", sys.argv[1:])
    main()
