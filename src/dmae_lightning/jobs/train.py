"""The training job behind ``python train.py``: pre-training, fine-tuning or linear probing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.trainer.states import TrainerStatus
from pytorch_lightning.utilities.model_summary import ModelSummary, get_human_readable_count

from dmae_lightning.certification.callback import CertificationCallback
from dmae_lightning.certification.checks import check_precision
from dmae_lightning.errors import BAD_INPUT, ConfigError, one_line
from dmae_lightning.files import atomic_write_text
from dmae_lightning.jobs.rundir import read_record, resolved_config, run_in_dir
from dmae_lightning.jobs.tracking import finish_runs, keep_logged_metrics
from dmae_lightning.noise import noise_from_config
from dmae_lightning.training.resume import check_matches, resume_checkpoint

log = logging.getLogger(__name__)
FINISHED = "finished.json"  # in the run directory of a training run that ran to its end: its final metrics


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate data, module (with its pre-trained weights), callbacks, logger and trainer.

    Every check that can fail on bad input runs here, before the first training step.
    """
    try:
        check_run_settings(cfg)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")  # missing or empty data folders stop here, not after the model is built
        noise = noise_from_config(cfg.noise)  # the job's one noise object: the module's and its model's
        # (partial, then called: Hydra would turn a dataclass keyword argument into a plain config)
        module = instantiate(cfg.task.module, _partial_=True, _convert_="all")(noise=noise)
        if cfg.pretrained and not cfg.ckpt_path:
            report = module.load_pretrained(cfg.pretrained)
            log.info("initialised from %s (%s layout): %s", cfg.pretrained, report.layout, report)
        callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c]
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_settings(cfg: DictConfig) -> None:
    """ValueError (one line) for run settings Lightning would only trip over once training has started (a
    comparison of 'abc' with an int, a division by zero, an infinite schedule), or would silently change."""
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {cfg.seed!r}")
    trainer = cfg.trainer
    max_steps = trainer.get("max_steps", -1)
    if not _is_int(max_steps) or not (max_steps == -1 or max_steps >= 1):
        raise ValueError(f"trainer.max_steps must be -1 (no limit) or an integer >= 1, got {max_steps!r}")
    max_epochs = trainer.get("max_epochs")
    if not _is_int(max_epochs) or max_epochs < 1:
        if not (max_epochs in (None, -1) and max_steps >= 1):
            raise ValueError(
                f"trainer.max_epochs must be an integer >= 1 (or -1 with trainer.max_steps), got "
                f"{max_epochs!r}"
            )
    for key in (
        "accumulate_grad_batches",
        "num_nodes",
    ):  # (devices may also be a list or "auto": Lightning's)
        value = trainer.get(key, 1)
        if not _is_int(value) or value < 1:
            raise ValueError(f"trainer.{key} must be an integer >= 1, got {value!r}")
    precision = str(cfg.get("precision", "32-true"))
    check_precision(precision)  # the one vocabulary (Lightning's names), old spellings named
    on_cpu = trainer.get("accelerator") == "cpu" or (
        trainer.get("accelerator") == "auto" and not torch.cuda.is_available()
    )
    if on_cpu and precision in ("16-mixed", "16", "16-true"):  # Lightning would run bf16 and record 16
        raise ValueError(f"precision={precision} needs a GPU: on the CPU use bf16-mixed or 32-true")


def train(cfg: DictConfig) -> dict:
    """Fit and return the final logged metrics (floats). The job runs in its run directory's lifecycle
    (:func:`~dmae_lightning.jobs.rundir.run_in_dir`): checked before anything is loaded, recorded once the job
    is valid, linked as ``logs/<run_name>/latest`` when it has finished. (``task=quickstart`` is the
    pipeline of :func:`~dmae_lightning.jobs.quickstart.quickstart`, which ``train.py`` dispatches to.)
    """
    if cfg.task.name == "quickstart":
        raise ConfigError(
            "task=quickstart is the whole pipeline: run it with python train.py experiment=quickstart "
            "or dmae_lightning.jobs.quickstart.quickstart(cfg)"
        )
    return run_in_dir(
        cfg,
        lambda: prepare(cfg),
        lambda prepared: fit(cfg, *prepared),
        resume_hint="rerun the same command to resume",
        finished=finished_run,
    )


def finished_run(path: Path) -> dict[str, float] | None:
    """The final metrics of a training run that finished in ``path`` (its ``FINISHED`` file), else None.

    Running a finished run's command again changes nothing: to train again, change a setting of the run
    identity (``seed``, ``trainer.max_epochs``, ...), which names a new run directory."""
    metrics = read_record(path / FINISHED, "the run finished; to train it again remove that file")
    if metrics is None:
        return None
    log.info(
        "training already finished in %s: nothing to do (a new seed, trainer.max_epochs or another "
        "setting of the run trains a new run in its own directory)",
        path,
    )
    return metrics


def prepare(cfg: DictConfig) -> tuple[str | None, pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """The checkpoint to resume from (checked before anything is built; a damaged last.ckpt falls back to
    the checkpoint kept before it; an interrupted run's checkpoints are resumed even without ckpt_path=last,
    never trained over from step 0), then data, module and trainer."""
    try:
        ckpt_path = resume_checkpoint(cfg)
    except BAD_INPUT as err:
        raise ConfigError(f"cannot resume: {one_line(err)}") from None
    datamodule, module, trainer = build(cfg)
    if ckpt_path:
        try:
            check_matches(ckpt_path, module)
        except BAD_INPUT as err:
            raise ConfigError(f"cannot resume: {one_line(err)}") from None
        _warn_on_other_workers(cfg)
    return ckpt_path, datamodule, module, trainer


def _warn_on_other_workers(cfg: DictConfig) -> None:
    """One line when a resumed run loads its data with another worker count than the attempt before it (recorded
    in .hydra/config.yaml): each worker seeds its own augmentations, so the weights would silently differ from an
    uninterrupted run's (the count is not part of the run identity: it changes no result when kept)."""
    recorded = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    try:
        before = OmegaConf.select(OmegaConf.load(recorded), "data.num_workers")
    except (OSError, ValueError, yaml.YAMLError):
        return
    now = OmegaConf.select(cfg, "data.num_workers")
    if before is not None and before != now:
        log.warning(
            "resuming with data.num_workers=%s where the run so far used %s: the rest of the run draws "
            "other augmentations than an uninterrupted run would (pass data.num_workers=%s to keep it exact)",
            now,
            before,
            before,
        )


def fit(cfg: DictConfig, ckpt_path: str | None, datamodule, module, trainer: pl.Trainer) -> dict[str, float]:
    if cfg.ckpt_path or ckpt_path:
        keep_logged_metrics(trainer.loggers)  # a resumed run appends to what the attempts before it logged
    if trainer.is_global_zero:
        summary = ModelSummary(
            module, max_depth=0
        )  # one line instead of Lightning's table (enable_model_summary)
        log.info(
            "%s: %s parameters (%s trainable) on %d %s device(s) x %d node(s), precision %s",
            type(module.model).__name__,
            get_human_readable_count(summary.total_parameters),
            get_human_readable_count(summary.trainable_parameters),
            trainer.num_devices,
            type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            trainer.num_nodes,
            trainer.precision,
        )
        for lg in trainer.loggers:  # the full resolved config as the run's hyper-parameters
            lg.log_hyperparams(resolved_config(cfg))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException:
        finish_runs(failed=True)
        raise
    finish_runs()  # each job its own W&B run: a multirun's next job must not log into this one
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.state.status == TrainerStatus.FINISHED and not trainer.interrupted and trainer.is_global_zero:
        atomic_write_text(Path(cfg.paths.output_dir) / FINISHED, json.dumps(metrics, indent=1) + "\n")
    return metrics
