"""The training job behind ``python train.py``: pre-training, fine-tuning or linear probing."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.model_summary import ModelSummary, get_human_readable_count

from .certification.callback import CertificationCallback
from .config import run_in_dir
from .errors import BAD_INPUT, ConfigError, one_line
from .noise import noise_from_config
from .resume import resume_checkpoint
from .tracking import finish_runs, keep_logged_metrics

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate data, module (with its pre-trained weights), callbacks, logger and trainer.

    Every check that can fail on bad input runs here, before the first training step.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")  # missing or empty data folders stop here, not after the model is built
        noise = noise_from_config(cfg.noise)  # the job's one noise object: the module's and its model's
        # (partial, then called: Hydra would turn a dataclass keyword argument into a plain config)
        module = instantiate(cfg.task.module, _partial_=True, _convert_="all")(noise=noise)
        if cfg.pretrained and not cfg.ckpt_path:
            report = module.load_pretrained(cfg.pretrained)
            log.info("initialised from %s (%s layout): %s", cfg.pretrained, report.layout, report)
        callback_cfgs = {**cfg.get("callbacks", {}), **cfg.task.get("callbacks", {})}
        callbacks = [instantiate(c) for c in callback_cfgs.values() if c]
        for callback in callbacks:  # what a callback needs of the data and the noise, before the first step
            if isinstance(callback, CertificationCallback):
                callback.check(datamodule, noise)
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        if not logger:  # logger=none: nothing to report learning rates to
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    except BAD_INPUT as err:
        raise ConfigError(one_line(err)) from None
    except InstantiationException as err:  # hydra wraps the constructor's own error
        if isinstance(err.__cause__, BAD_INPUT):
            raise ConfigError(one_line(err.__cause__)) from None
        raise
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict:
    """Fit and return the final logged metrics (floats); ``task=quickstart`` runs the whole pipeline.

    Either way the job runs in its run directory's lifecycle (``config.run_in_dir``): checked before anything
    is loaded, recorded once the job is valid, linked as ``logs/<run_name>/latest`` when it has finished.
    """
    if cfg.task.name == "quickstart":
        from .quickstart import (  # here: the pipeline calls back into train()
            quickstart_stages,
            run_quickstart,
        )

        return run_in_dir(cfg, lambda: quickstart_stages(cfg), lambda stages: run_quickstart(cfg, *stages),
                          resume_hint="rerun the same command to resume (finished stages are kept)")
    again = "rerun the same command to resume" if cfg.ckpt_path == "last" else (
        "rerun the same command with ckpt_path=last to resume")
    return run_in_dir(cfg, lambda: prepare(cfg), lambda prepared: fit(cfg, *prepared), resume_hint=again)


def prepare(cfg: DictConfig) -> tuple[str | None, pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """The checkpoint to resume from (checked before anything is built; a damaged last.ckpt falls back to
    the checkpoint kept before it), then data, module and trainer."""
    try:
        ckpt_path = resume_checkpoint(cfg)
    except BAD_INPUT as err:
        raise ConfigError(f"cannot resume: {one_line(err)}") from None
    return (ckpt_path, *build(cfg))


def fit(cfg: DictConfig, ckpt_path: str | None, datamodule, module, trainer: pl.Trainer) -> dict[str, float]:
    if cfg.ckpt_path:
        keep_logged_metrics(trainer.loggers)  # a resumed run appends to what the attempts before it logged
    if trainer.is_global_zero:
        summary = ModelSummary(module, max_depth=0)  # one line instead of Lightning's table (enable_model_summary)
        log.info("%s: %s parameters (%s trainable) on %d %s device(s) x %d node(s), precision %s",
                 type(module.model).__name__, get_human_readable_count(summary.total_parameters),
                 get_human_readable_count(summary.trainable_parameters), trainer.num_devices,
                 type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(), trainer.num_nodes,
                 trainer.precision)
        for lg in trainer.loggers:  # the full resolved config as the run's hyper-parameters
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException:
        finish_runs(failed=True)
        raise
    finish_runs()  # each job its own W&B run: a multirun's next job must not log into this one
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
