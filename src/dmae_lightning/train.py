"""The training job behind ``python train.py``: pre-training, fine-tuning or linear probing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import config  # noqa: F401  (registers the Hydra resolvers)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Bad input found before any training work: the entry points print it as one line."""


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate data, module (with its pre-trained weights), callbacks, logger and trainer.

    Every check that can fail on bad input runs here, before the first training step.
    """
    try:
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.task.module, _convert_="all")
        if cfg.pretrained and not cfg.ckpt_path:
            report = module.load_pretrained(cfg.pretrained)
            log.info("initialised from %s (%s layout): %s", cfg.pretrained, report.layout, report)
        callback_cfgs = {**cfg.get("callbacks", {}), **cfg.task.get("callbacks", {})}
        callbacks = [instantiate(c) for c in callback_cfgs.values() if c]
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and return the final logged metrics (floats)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    if trainer.is_global_zero:
        log.info("run directory: %s", Path(cfg.paths.output_dir).resolve())
        for lg in trainer.loggers:  # the full resolved config as the run's hyper-parameters
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
