"""Train a DMAE model: python train.py experiment=pretrain_digits (see README.md)."""

import hydra
from omegaconf import DictConfig

from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.quickstart import quickstart
from dmae_lightning.jobs.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        quickstart(cfg) if cfg.task.name == "quickstart" else train(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
