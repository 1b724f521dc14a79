"""The certification job behind ``python certify.py``: run a procedure on every image of a data subset.

Each image of the subset ``range(0, len(split), skip)[:max]`` is certified exactly once, by one rank of a
Lightning ``Trainer`` (any number of devices and nodes): rank R takes ``todo[R::world]`` of the images not
yet done and appends one line per image to its own shard (:mod:`.rundir`). Noise comes from the (seed,
idx) block streams of :mod:`.sampler`, so a result depends neither on the batch size, nor on the number
of ranks, nor on where an interrupted run was resumed. When every rank is done, rank 0 merges the shards
into ``<mode>.tsv`` ordered by idx and writes ``summary.json`` (and for radii, ``certified_accuracy.png``).
Re-running into the same run directory resumes; other settings are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from dmae_lightning.certification.metrics import default_radii, radius_key
from dmae_lightning.certification.procedures import PROCEDURES, Procedure
from dmae_lightning.certification.records import write_json
from dmae_lightning.certification.report import (
    BEYOND,
    bound_note,
    format_table,
    plot_certified_accuracy,
    sample_budget,
)
from dmae_lightning.certification.runs import PROCEDURE_KEY, RunSummary
from dmae_lightning.certification.sampler import NOISE_SCHEME, NonFiniteLogits, resolve_precision
from dmae_lightning.certification.summary import CertifiedSummary, EmpiricalSummary, PredictionSummary
from dmae_lightning.errors import ConfigError, one_line
from dmae_lightning.jobs.certify.params import JobParams, subset_indices, validate
from dmae_lightning.jobs.certify.predictor import ImageProgressBar, SmoothingPredictor
from dmae_lightning.jobs.certify.shards import (
    check_params,
    done_records,
    merge_results,
    record_params,
    results_path,
)
from dmae_lightning.jobs.rundir import file_digest, resolved_config, run_in_dir
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import checkpoint_state_dict, load_weights, read_checkpoint, trained_noise
from dmae_lightning.noise import Noise, noise_from_config

log = logging.getLogger(__name__)


def _instantiate(node: DictConfig, what: str, **kwargs):
    """hydra.utils.instantiate with the constructor's own complaint as a one-line ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise ConfigError(f"{what}: {one_line(err.__cause__ or err)}") from None


@dataclass(frozen=True)
class ClassifierInfo:
    model_name: str
    source: str  # where the architecture came from
    layout: str  # checkpoint layout, as load_weights names it
    trained_noise: Noise | None  # the checkpoint's training noise, when it says


def load_classifier(
    cfg: DictConfig, path: Path, num_classes: int, dataset: str
) -> tuple[torch.nn.Module, ClassifierInfo]:
    """The base classifier of ``path`` in eval mode, checked against the data set's class count.

    Our Lightning checkpoints carry their architecture in ``hyper_parameters`` (model_name, model_kwargs,
    num_classes); other layouts (official fine-tuned releases, plain state dicts) are built from the
    ``model`` group. A pre-training file, a file whose head is missing or of another class count, and a
    file with NaN/Inf weights are refused.
    """
    try:
        ckpt = read_checkpoint(path)
        state, _ = checkpoint_state_dict(ckpt, path)
        head = state.get("head.weight")
        file_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
        hparams = ckpt.get("hyper_parameters")
        other_group = False  # the checkpoint's architecture differs from the model group's
        if isinstance(hparams, dict) and "model_name" in hparams:
            name = str(hparams["model_name"])
            other_group = name != cfg.model.classifier_name
            kwargs = dict(hparams.get("model_kwargs") or {})
            file_classes = hparams.get("num_classes", file_classes)
            source = "the checkpoint's hyper-parameters"
            recorded = trained_noise(hparams)
        else:
            name = str(cfg.model.classifier_name)
            kwargs = {"img_size": cfg.model.img_size}
            source = f"model={cfg.model.name}"
            recorded = None
        del state
        if name.startswith("dmae_"):  # first: no model= override can make a pre-training file certifiable
            raise ConfigError(f"{path} holds the pre-training model {name}: certify a fine-tuned classifier")
        if other_group:
            raise ConfigError(
                f"{path} holds a {name} classifier: add model={name}"
            )  # names the run directory
        if file_classes is None:
            raise ConfigError(
                f"{path} has no classification head (a pre-training file?): certify a fine-tuned classifier"
            )
        if int(file_classes) != num_classes:
            raise ConfigError(f"{path} classifies {file_classes} classes but {dataset} has {num_classes}")
        model = create_model(name, num_classes=num_classes, **kwargs)
        report = load_weights(model, path, ckpt)  # the file read above, not a second time
        del ckpt
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
    if report.reinitialised:
        raise ConfigError(
            f"{path} leaves {', '.join(report.reinitialised)} of {name} at random initialisation: "
            "not a fine-tuned classifier"
        )
    if report.interpolated:
        log.warning("%s: position embeddings resampled to the model's grid: %s", path, report.interpolated)
    return model.eval(), ClassifierInfo(name, source, report.layout, recorded)


@dataclass
class Prepared:
    """A validated certification job, everything loaded, nothing written yet."""

    params: JobParams
    procedure: Procedure
    dataset_name: str
    dataset_size: int
    radii: tuple[float, ...]  # of the tables: the data set's paper radii unless radii= names others
    skip: int  # of the subset's indices (params.skip, or size // images)
    indices: list[int]
    todo: list[int]
    trainer: pl.Trainer
    module: SmoothingPredictor
    info: ClassifierInfo
    key: dict  # what the results depend on (<mode>.params.json)
    started: float


def certify(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg`` (conf/certify.yaml) and return the summary (rank 0; {} elsewhere).

    It runs in the run directory's lifecycle (``run_in_dir``): checked before anything is loaded,
    everything validated and loaded by :func:`prepare` before anything is written.
    """
    return run_in_dir(
        cfg,
        lambda: prepare(cfg),
        lambda job: run(cfg, job),
        resume_hint="run the same command again to resume",  # the images already done are kept
    )


def prepare(cfg: DictConfig) -> Prepared:
    """Validate the settings, load data and classifier, check the run directory's earlier results."""
    started = time.time()
    params = validate(cfg)
    datamodule = _instantiate(cfg.data, "data")
    radii = params.radii or default_radii(datamodule.name)
    try:
        procedure = PROCEDURES[params.procedure].from_params(params, radii)
    except ValueError as err:
        raise ConfigError(f"procedure={params.procedure}: {err}") from None
    try:
        dataset = datamodule.dataset(params.split)
        num_classes = int(datamodule.num_classes)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    classifier, info = load_classifier(cfg, params.weights, num_classes, datamodule.name)
    if info.trained_noise is not None and info.trained_noise != params.noise:
        if not params.noise_override:
            raise ConfigError(
                f"{params.weights} was trained with noise {info.trained_noise.tag}, not {params.noise.tag}: leave "
                "noise out to certify with the checkpoint's, or add noise_override=true"
            )
        log.warning(
            "the classifier was trained with %s, certification uses %s (noise_override)",
            info.trained_noise,
            params.noise,
        )
    skip, indices = subset_indices(len(dataset), params)
    if not indices:
        raise ConfigError(f"the {datamodule.name} {params.split} split is empty")
    try:  # e.g. the discrete noise on images off the 8-bit grid: said now, not at the first image's samples
        params.noise.check_input(dataset[indices[0]][0])
    except ValueError as err:
        raise ConfigError(f"noise {params.noise.tag} on {datamodule.name}: {err}") from None
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    bar = [ImageProgressBar(procedure.name)] if cfg.trainer.get("enable_progress_bar") else []
    trainer = _instantiate(
        cfg.trainer,
        "trainer",
        logger=logger,
        callbacks=bar,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    params = dataclasses.replace(
        params, precision=resolve_precision(params.precision, trainer.strategy.root_device)
    )
    run_dir = Path(cfg.paths.output_dir)
    key = {
        "procedure": procedure.name,
        **procedure.settings(),
        "noise": params.noise.config(),
        # the classifier's own training noise, when it says and differs (noise_override=true)
        "trained_noise": None if info.trained_noise in (None, params.noise) else info.trained_noise.config(),
        "sigma": params.noise.sigma,
        "seed": params.seed,
        "precision": params.precision,
        "noise_scheme": NOISE_SCHEME,
        "dataset": datamodule.name,
        "split": params.split,
        "data_subset": {k: getattr(datamodule, k, None) for k in ("subset_every", "subset_first")},
        # the run directory's identity hashed it already (cached): the same digest, computed once
        "checkpoint_sha256": file_digest(str(params.weights)).removeprefix("sha256:"),
    }
    check_params(run_dir, key, procedure.name)
    try:
        done = {record.idx for record in done_records(run_dir, procedure.name, procedure.record_type)}
    except ValueError as err:
        raise ConfigError(str(err)) from None
    todo = [idx for idx in indices if idx not in done]
    module = SmoothingPredictor(
        classifier,
        num_classes,
        procedure,
        params,
        dataset,
        todo,
        run_dir,
        num_workers=getattr(datamodule, "num_workers", 0),
    )
    return Prepared(
        params,
        procedure,
        datamodule.name,
        len(dataset),
        tuple(radii),
        skip,
        indices,
        todo,
        trainer,
        module,
        info,
        key,
        started,
    )


def run(cfg: DictConfig, job: Prepared) -> dict:
    """Certify the images not yet done, merge the shards, write the summary (rank 0)."""
    params, procedure, trainer, info = job.params, job.procedure, job.trainer, job.info
    run_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        record_params(run_dir, job.key, procedure.name)
        log.info(
            "%s with classifier %s from %s (%s layout, architecture from %s), precision %s%s; %s %s split: "
            "%d images (skip=%d, max=%s), %d already done",
            procedure.name,
            info.model_name,
            params.weights,
            info.layout,
            info.source,
            params.precision,
            ", compiled" if params.compile else "",
            job.dataset_name,
            params.split,
            len(job.indices),
            job.skip,
            params.num_images or params.max,
            len(job.indices) - len(job.todo),
        )
        for lg in trainer.loggers:
            lg.log_hyperparams(resolved_config(cfg))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*predict returned None.*")  # on purpose: results go to the shards
        try:
            trainer.predict(job.module, return_predictions=False, weights_only=True)
        except NonFiniteLogits as err:
            raise ConfigError(str(err)) from None
    trainer.strategy.barrier("certify_merge")
    if not trainer.is_global_zero:
        return {}
    records = merge_results(run_dir, procedure.name, procedure.record_type)
    by_idx = {record.idx: record for record in records}
    missing = [idx for idx in job.indices if idx not in by_idx]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result (first idx {missing[0]}): re-run to resume")
    subset = [by_idx[idx] for idx in job.indices]
    result = procedure.summarise(subset, job.radii, params.noise, params.rho)
    summary = RunSummary(
        type(procedure),
        {
            **{key: value for key, value in job.key.items() if key != PROCEDURE_KEY},
            "batch_size": params.batch_size,
            "compile": params.compile,
            "checkpoint": str(params.weights.resolve()),
            "model_name": info.model_name,
            "subset": {
                "skip": params.skip,
                "max": params.max,
                "num_images": params.num_images,
                "indices": f"range(0, {job.dataset_size}, {job.skip})[:{params.num_images or params.max}]",
            },
            "world_size": trainer.world_size,
            "device": trainer.strategy.root_device.type,
            "wall_time_s": time.time() - job.started,
        },
        result,
    )
    data = summary.to_json()
    write_json(run_dir / "summary.json", data)
    outputs = [results_path(run_dir, procedure.name), run_dir / "summary.json"]
    png = None
    if isinstance(result, CertifiedSummary):
        png = run_dir / "certified_accuracy.png"
        label = f"sigma={params.noise.sigma:g}"
        plot_certified_accuracy(
            {label: subset},
            png,
            title=plot_title(summary),
            limits={label: result.max_certifiable_radius},
            grid=result.grid,
        )
        outputs.append(png)
    log.info("%s", report(summary))
    _log_to_loggers(trainer, summary, png)
    for path in outputs:
        print(f"wrote {path}")
    return data


def plot_title(summary: RunSummary) -> str:
    settings = summary.settings
    return (
        f"{settings['model_name']} on {settings['dataset']} {settings['split']} ({summary.result.num_images} "
        f"images): {noise_from_config(settings['noise']).tag}, "
        f"{sample_budget(summary.n, summary.procedure.grid_only)}, alpha={summary.alpha:g}"
    )


def report(summary: RunSummary) -> str:
    """The summary as the lines the job logs."""
    result, name = summary.result, summary.procedure.name
    if isinstance(result, PredictionSummary):
        return (
            f"{name}: accuracy {100 * result.accuracy:.1f} %, abstain rate "
            f"{100 * result.abstain_rate:.1f} % of {result.num_images} images"
        )
    label = f"{summary.sigma:g}"
    if isinstance(result, EmpiricalSummary):
        table = format_table({label: result.empirical_robust_accuracy}, result.radii)
        cost = (
            ""
            if result.samples is None or result.attack_samples is None
            else f", {result.samples:,} noisy samples to predict and {result.attack_samples:,} to attack"
        )
        return (
            f"{name}: empirical robust accuracy (%) of {result.num_images} images under the L2 attack of "
            f"radius r (PREDICT on the adversarial image; an upper bound on robust accuracy, not a "
            f"certificate){cost}:\n{table}"
        )
    rows = {label: result.certified_accuracy}
    bound = result.certified_accuracy_lower_bound
    if bound is not None:
        rows[f"{label} lower bound"] = bound
    acr = result.average_certified_radius
    table = format_table(rows, result.radii, acr=None if acr is None else {label: acr})
    if bound is not None and result.false_certificates_allowed is not None:
        table += "\n" + bound_note(result.rho, result.false_certificates_allowed, result.num_images)
    extra = []
    if result.samples is not None:
        extra.append(
            f"{result.samples:,} noisy samples ({result.samples / result.num_images:,.0f} per image)"
        )
    if not result.grid_only:  # a grid-only procedure certifies each radius or not: no abstention to count
        rate = result.abstain_rate
        extra.append(
            "abstain rate not measured (skip_wrong_guess)" if rate is None else f"abstain rate {rate:.4f}"
        )
    saving = sample_saving(name, result)
    return (
        f"{name}: certified accuracy (%) of {result.num_images} images, {', '.join(extra)}:\n"
        f"{table}{f'{chr(10)}{saving}' if saving else ''}"
    )


def sample_saving(procedure: str, result: CertifiedSummary) -> str | None:
    """The samples a sequential procedure used against fixed-n certify's (n0 + n per image), as one line."""
    cost = result.sequential
    if cost is None or not cost.saving_vs_fixed_n:
        return None
    return (
        f"{procedure} used {result.samples:,} noisy samples where fixed-n certify would use "
        f"{cost.fixed_n_samples:,} (n0 + n per image): {cost.saving_vs_fixed_n:.1f}x fewer"
    )


def _log_to_loggers(trainer: pl.Trainer, summary: RunSummary, png: Path | None) -> None:
    """The results as metrics for every logger; for Weights & Biases also the certified-accuracy table and
    plot, and the end of the W&B run (the next job of a -m sweep must not log into it)."""
    result = summary.result
    metrics = result.metrics(summary.procedure.name)
    for lg in trainer.loggers:
        # a radius beyond the run's reach: BEYOND in the CSV file, left out where a metric must be a number
        # (Lightning's signature says float; the CSV writer writes any value)
        lg.log_metrics(
            {key: BEYOND if value is None else value for key, value in metrics.items()}  # type: ignore[misc]
            if isinstance(lg, CSVLogger)
            else {k: v for k, v in metrics.items() if v is not None}
        )
        if isinstance(lg, WandbLogger) and isinstance(result, CertifiedSummary) and png is not None:
            keys = [radius_key(r) for r in result.radii]
            row = [summary.sigma, *(result.certified_accuracy[k] for k in keys)]
            lg.log_table(key="certified_accuracy", columns=["sigma", *(f"r={k}" for k in keys)], data=[row])
            lg.log_image(key="certified_accuracy_plot", images=[str(png)])
        if isinstance(lg, WandbLogger) and isinstance(result, EmpiricalSummary):
            keys = [radius_key(r) for r in result.radii]
            row = [summary.sigma, *(result.empirical_robust_accuracy[k] for k in keys)]
            lg.log_table(
                key="empirical_robust_accuracy", columns=["sigma", *(f"r={k}" for k in keys)], data=[row]
            )
        lg.save()
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
