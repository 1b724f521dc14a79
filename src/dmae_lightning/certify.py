"""The certification job behind ``python certify.py``: CERTIFY (or PREDICT) every image of a data subset.

Each image of the subset ``range(0, len(split), skip)[:max]`` is certified exactly once, by one rank of a
Lightning ``Trainer`` (any number of devices and nodes): rank R takes ``todo[R::world]`` of the images not
yet done and appends one line per image to its own shard ``<mode>.rank{R}.tsv`` (fsync per line). The
noise of image ``idx`` comes from ``seeded_generator(seed, CERTIFY_STREAM, idx)``, so a result depends
neither on the batch order, nor on the number of ranks, nor on where an interrupted run was resumed
(on a CPU not on ``batch`` either; CUDA generators draw differently when one draw is split in two).

When every rank is done, rank 0 merges the shards (and a previous ``certify.tsv``) into ``certify.tsv``
ordered by idx, deletes the shards, and writes ``summary.json`` and ``certified_accuracy.png``.
Re-running into the same run directory resumes: the images already in ``certify.tsv`` or in a shard are
skipped. ``<mode>.params.json`` records what the results depend on, so a resume with other settings (or
another checkpoint) into the same directory is refused instead of mixing two runs.

``mode=predict`` runs PREDICT instead and writes ``predict.tsv`` (idx label predict correct time).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader, Dataset

from . import config
from .checkpoints import checkpoint_state_dict, load_weights, read_checkpoint
from .data import SPLITS
from .models import create_model
from .results import (
    ABSTAIN,
    Record,
    ShardWriter,
    atomic_write_text,
    default_radii,
    format_table,
    merge_shards,
    one_per_idx,
    plot_certified_accuracy,
    radius_key,
    read_records,
    sha256_file,
    summary_metrics,
    write_summary,
)
from .rng import CERTIFY_STREAM, seeded_generator
from .smoothing import AUTOCAST_DTYPES, Smooth
from .train import ConfigError, one_line

log = logging.getLogger(__name__)

MODES = ("certify", "predict")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
_TRAINER_PRECISIONS = ("32-true", "32", 32)


@dataclass(frozen=True)
class JobParams:
    """The validated top-level keys of conf/certify.yaml."""

    mode: str
    ckpt_path: Path
    split: str
    skip: int
    max: int | None
    n0: int
    n: int
    alpha: float
    sigma: float
    batch: int
    seed: int
    precision: str
    skip_wrong_guess: bool
    radii: tuple[float, ...] | None
    log_every_s: float

    def resume_key(self, dataset: str, data_subset: dict, checkpoint_sha256: str) -> dict:
        """What the per-image results depend on: a resumed run must agree on all of it."""
        key = {
            "mode": self.mode,
            "sigma": self.sigma,
            "n": self.n,
            "alpha": self.alpha,
            "seed": self.seed,
            "precision": self.precision,
            "dataset": dataset,
            "split": self.split,
            "data_subset": data_subset,
            "checkpoint_sha256": checkpoint_sha256,
        }
        if self.mode == "certify":
            key |= {"n0": self.n0, "skip_wrong_guess": self.skip_wrong_guess}
        return key


# --------------------------------------------------------------------------------------------- checks
def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def validate(cfg: DictConfig) -> JobParams:
    """Check every top-level key before anything is loaded; ConfigError (one line) on the first bad one."""
    try:
        ckpt_path = cfg.ckpt_path
    except MissingMandatoryValue:
        raise ConfigError("ckpt_path is required: python certify.py ckpt_path=PATH ...") from None
    if not ckpt_path:
        raise ConfigError("ckpt_path is required: python certify.py ckpt_path=PATH ...")
    for key, minimum in (("n0", 1), ("n", 1), ("batch", 1), ("skip", 1), ("seed", 0)):
        value = cfg.get(key)
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if cfg.max is not None and (not _is_int(cfg.max) or cfg.max < 1):
        raise ConfigError(f"max must be an integer >= 1 or null, got {cfg.max!r}")
    if not _is_number(cfg.alpha) or not 0 < cfg.alpha < 1:
        raise ConfigError(f"alpha must lie strictly between 0 and 1, got {cfg.alpha!r}")
    sigma = cfg.noise.sigma
    if not _is_number(sigma) or sigma <= 0:
        raise ConfigError(f"noise.sigma must be a finite number > 0, got {sigma!r}")
    if cfg.precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"precision must be one of {'|'.join(AUTOCAST_DTYPES)}, got {cfg.precision!r}")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {'|'.join(MODES)}, got {cfg.mode!r}")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {'|'.join(SPLITS)}, got {cfg.split!r}")
    if not isinstance(cfg.skip_wrong_guess, bool):
        raise ConfigError(f"skip_wrong_guess must be true or false, got {cfg.skip_wrong_guess!r}")
    radii = cfg.get("radii")
    if radii is not None:
        radii = list(radii) if OmegaConf.is_list(radii) or isinstance(radii, list | tuple) else [radii]
        if not radii or not all(_is_number(r) and r >= 0 for r in radii):
            raise ConfigError(f"radii must be null or a non-empty list of numbers >= 0, got {radii!r}")
        radii = tuple(float(r) for r in radii)
    log_every_s = cfg.get("log_every_s", 60)
    if not _is_number(log_every_s) or log_every_s <= 0:
        raise ConfigError(f"log_every_s must be a number > 0, got {log_every_s!r}")
    if cfg.trainer.get("precision", "32-true") not in _TRAINER_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} would autocast the whole job: leave it at 32-true "
            "and choose the classifier's precision with the top-level key precision=fp32|bf16|fp16"
        )
    return JobParams(
        mode=cfg.mode,
        ckpt_path=Path(str(ckpt_path)).expanduser(),
        split=cfg.split,
        skip=cfg.skip,
        max=cfg.max,
        n0=cfg.n0,
        n=cfg.n,
        alpha=float(cfg.alpha),
        sigma=float(sigma),
        batch=cfg.batch,
        seed=cfg.seed,
        precision=cfg.precision,
        skip_wrong_guess=cfg.skip_wrong_guess,
        radii=radii,
        log_every_s=float(log_every_s),
    )


def _instantiate(node: DictConfig, what: str, **kwargs):
    """hydra.utils.instantiate with the constructor's own complaint as a one-line ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise ConfigError(f"{what}: {one_line(err.__cause__ or err)}") from None


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ClassifierInfo:
    model_name: str
    source: str  # where the architecture came from
    layout: str  # checkpoint layout, as load_weights names it
    trained_sigma: float | None  # the checkpoint's training noise level, when it says


def load_classifier(
    cfg: DictConfig, path: Path, num_classes: int, dataset: str
) -> tuple[torch.nn.Module, ClassifierInfo]:
    """The base classifier of ``path`` in eval mode, checked against the data set's class count.

    Our Lightning checkpoints carry their architecture in ``hyper_parameters`` (model_name, model_kwargs,
    num_classes); other layouts (official fine-tuned releases, plain state dicts) are built from the
    ``model`` group. A file whose head is missing or of another class count is refused.
    """
    try:
        ckpt = read_checkpoint(path)
        state, _ = checkpoint_state_dict(ckpt, path)
        head = state.get("head.weight")
        file_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
        hparams = ckpt.get("hyper_parameters")
        if isinstance(hparams, dict) and "model_name" in hparams:
            name = str(hparams["model_name"])
            if name != cfg.model.classifier_name:  # the run directory is named after the model group
                raise ConfigError(f"{path} holds a {name} classifier: add model={name}")
            kwargs = dict(hparams.get("model_kwargs") or {})
            file_classes = hparams.get("num_classes", file_classes)
            source = "the checkpoint's hyper-parameters"
            trained_sigma = hparams.get("sigma")
        else:
            name = str(cfg.model.classifier_name)
            kwargs = {"img_size": cfg.model.img_size}
            source = f"model={cfg.model.name}"
            trained_sigma = None
        del ckpt, state
        if name.startswith("dmae_"):
            raise ConfigError(f"{path} holds the pre-training model {name}: certify a fine-tuned classifier")
        if file_classes is None:
            raise ConfigError(
                f"{path} has no classification head (a pre-training file?): certify a fine-tuned classifier"
            )
        if int(file_classes) != num_classes:
            raise ConfigError(f"{path} classifies {file_classes} classes but {dataset} has {num_classes}")
        model = create_model(name, num_classes=num_classes, **kwargs)
        report = load_weights(model, path)
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
    return model.eval(), ClassifierInfo(name, source, report.layout, trained_sigma)


# --------------------------------------------------------------------------------------------- files
def shard_paths(run_dir: Path, mode: str) -> list[Path]:
    """Shards of every rank of every session so far (the world size may have changed between them)."""
    pattern = re.compile(rf"{mode}\.rank(\d+)\.tsv")
    found = [
        (int(m.group(1)), p) for p in run_dir.glob(f"{mode}.rank*.tsv") if (m := pattern.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def read_predict_tsv(path: Path, n: int) -> list[Record]:
    """Records of a ``predict.tsv`` (idx label predict correct time); a partial last line is ignored."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    if not lines:
        return []
    if lines[0] != "\t".join(PREDICT_COLUMNS):
        raise ValueError(f"{path}: not a predict TSV (first line {lines[0]!r})")
    records = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            idx, label, predict, correct, seconds = line.split("\t")
            records.append(
                Record(int(idx), int(label), int(predict), 0.0, int(correct), 0, n, float(seconds))
            )
        except ValueError:
            raise ValueError(f"{path}:{number}: malformed record {line!r}") from None
    return records


def write_predict_tsv(path: Path, records: list[Record]) -> None:
    lines = ["\t".join(PREDICT_COLUMNS)]
    lines += [f"{r.idx}\t{r.label}\t{r.predict}\t{r.correct}\t{float(r.time)!r}" for r in records]
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def done_records(run_dir: Path, params: JobParams) -> list[tuple[Record, Path]]:
    """Every complete record already on disk, with its file: the merged file and all shards."""
    merged = run_dir / f"{params.mode}.tsv"
    records = []
    if merged.is_file():
        read = read_records if params.mode == "certify" else lambda path: read_predict_tsv(path, params.n)
        records += [(record, merged) for record in read(merged)]
    for shard in shard_paths(run_dir, params.mode):
        records += [(record, shard) for record in read_records(shard)]
    return records


def merge_results(run_dir: Path, params: JobParams) -> list[Record]:
    """Fold the shards into ``<mode>.tsv`` (ordered by idx, one line per image), then delete the shards."""
    shards = shard_paths(run_dir, params.mode)
    out = run_dir / f"{params.mode}.tsv"
    if params.mode == "certify":
        records = merge_shards(shards, out)
    else:
        records = one_per_idx(done_records(run_dir, params))
        write_predict_tsv(out, records)
    for shard in shards:  # only now: the merged file is on disk
        shard.unlink()
    return records


def check_run_dir(run_dir: Path, key: dict, mode: str, is_rank_zero: bool) -> None:
    """Refuse to resume into a directory whose results came from other settings; record them otherwise."""
    path = run_dir / f"{mode}.params.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        differ = [
            f"{k}: {previous.get(k)!r} there, {v!r} now" for k, v in key.items() if previous.get(k) != v
        ]
        if differ:
            raise ConfigError(
                f"run directory {run_dir} holds {mode} results of other settings ({'; '.join(differ)}): "
                "choose another run_name (or hydra.run.dir) for a new run"
            )
    elif is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(key, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- Lightning
class _IndexedImages(Dataset):
    """``(idx, image [C,H,W], label)`` for the given dataset indices; None gives a placeholder ``(-1, [], -1)``."""

    def __init__(self, dataset: Dataset, indices: list[int | None]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        idx = self.indices[i]
        if idx is None:
            return -1, torch.zeros(0), -1
        image, label = self.dataset[idx]
        return idx, image, int(label)


class SmoothingPredictor(pl.LightningModule):
    """Certifies (or predicts) one image per ``predict_step`` and appends its line to this rank's shard."""

    def __init__(
        self,
        classifier: torch.nn.Module,
        num_classes: int,
        params: JobParams,
        dataset: Dataset,
        todo: list[int],
        run_dir: Path,
        num_workers: int = 0,
    ):
        super().__init__()
        self.model = classifier
        self.smooth = Smooth(classifier, num_classes, params.sigma, params.precision)
        self.params = params
        self.dataset = dataset
        self.todo = todo
        self.run_dir = run_dir
        self.num_workers = num_workers
        self.strict_loading = False  # a SLURM requeue checkpoint holds no weights (see on_save_checkpoint)
        self.writer: ShardWriter | None = None
        self.share: list[int] = []
        self._done = 0
        self._started = self._last_log = 0.0

    def predict_dataloader(self) -> DataLoader:
        # Rank 0's list: every rank splits the same list even if another rank read the files at another time.
        todo = self.trainer.strategy.broadcast(self.todo, src=0)
        return self.loader(todo, self.global_rank, self.trainer.world_size)

    def loader(self, todo: list[int], rank: int, world_size: int) -> DataLoader:
        """Rank ``rank``'s images ``todo[rank::world_size]``, one per step, unpadded."""
        self.share = todo[rank::world_size]
        # Lightning refuses a rank without batches while others have some: such a rank gets a placeholder.
        items = self.share or ([None] if todo else [])
        return DataLoader(
            _IndexedImages(self.dataset, items), batch_size=None, shuffle=False, num_workers=self.num_workers
        )

    def on_predict_start(self) -> None:
        self.model.eval()
        self.writer = ShardWriter(self.run_dir / f"{self.params.mode}.rank{self.global_rank}.tsv")
        self._started = self._last_log = time.perf_counter()

    def predict_step(self, batch, batch_idx: int) -> None:
        idx, image, label = batch  # int, [C,H,W], int
        if idx < 0:  # the placeholder of a rank with nothing to do
            return
        p = self.params
        generator = seeded_generator(p.seed, CERTIFY_STREAM, idx, device=image.device)
        start = time.perf_counter()
        if p.mode == "certify":
            outcome = self.smooth.certify_record(
                image,
                p.n0,
                p.n,
                p.alpha,
                p.batch,
                generator,
                label=label,
                skip_wrong_guess=p.skip_wrong_guess,
            )
            prediction, radius, n_a, n = outcome.prediction, outcome.radius, outcome.n_a, outcome.n
        else:
            prediction = self.smooth.predict(image, p.n, p.alpha, p.batch, generator)
            radius, n_a, n = 0.0, 0, p.n
        seconds = time.perf_counter() - start  # the counts are on the CPU, so the device has finished
        self.writer.write(Record(idx, label, prediction, radius, int(prediction == label), n_a, n, seconds))
        self._done += 1
        self._log_progress()

    def _log_progress(self) -> None:
        """Periodic progress lines from rank 0 when there is no progress bar (batch logs)."""
        now = time.perf_counter()
        if self.trainer.progress_bar_callback is not None or not self.trainer.is_global_zero:
            return
        if now - self._last_log < self.params.log_every_s and self._done < len(self.share):
            return
        self._last_log = now
        rate = self._done / max(now - self._started, 1e-9)
        eta = (len(self.share) - self._done) / rate if rate > 0 else float("inf")
        log.info(
            "rank 0: %d/%d images, %.3g images/s, ETA %s (world size %d)",
            self._done,
            len(self.share),
            rate,
            _duration(eta),
            self.trainer.world_size,
        )

    def on_predict_end(self) -> None:
        self.teardown("predict")

    def teardown(self, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves an "hpc" checkpoint on a SLURM requeue signal; the weights are in ckpt_path and
        # the progress in the shards, so it need not hold a copy of the model.
        checkpoint["state_dict"] = {}


class ImageProgressBar(TQDMProgressBar):
    """Lightning's bar with images as the unit: images/s and the ETA of this rank's share (rank 0 shows)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    @property
    def predict_description(self) -> str:
        return self.description

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_description(self.description, refresh=False)  # no "DataLoader 0"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------- the job
def certify(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg`` (conf/certify.yaml) and return the summary (rank 0; {} elsewhere)."""
    started = time.time()
    params = validate(cfg)
    is_rank_zero = config.global_rank() == 0
    datamodule = _instantiate(cfg.data, "data")
    try:
        dataset = datamodule.dataset(params.split)
        num_classes = int(datamodule.num_classes)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    classifier, info = load_classifier(cfg, params.ckpt_path, num_classes, datamodule.name)
    if info.trained_sigma is not None and not math.isclose(float(info.trained_sigma), params.sigma):
        log.warning(
            "the classifier was trained at sigma=%s, certification uses sigma=%s",
            info.trained_sigma,
            params.sigma,
        )
    indices = list(range(0, len(dataset), params.skip))[: params.max]
    if not indices:
        raise ConfigError(f"the {datamodule.name} {params.split} split is empty")
    run_dir = Path(cfg.paths.output_dir)
    checkpoint_sha256 = sha256_file(params.ckpt_path)
    data_subset = {k: getattr(datamodule, k, None) for k in ("subset_every", "subset_first")}
    check_run_dir(
        run_dir, params.resume_key(datamodule.name, data_subset, checkpoint_sha256), params.mode, is_rank_zero
    )
    try:
        done = {record.idx for record, _ in done_records(run_dir, params)}
    except ValueError as err:
        raise ConfigError(str(err)) from None
    todo = [idx for idx in indices if idx not in done]
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    bar = (
        [ImageProgressBar({"certify": "Certifying", "predict": "Predicting"}[params.mode])]
        if cfg.trainer.get("enable_progress_bar")
        else []
    )
    trainer = _instantiate(
        cfg.trainer,
        "trainer",
        logger=logger,
        callbacks=bar,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    if is_rank_zero:
        log.info("run directory: %s", run_dir.resolve())
        log.info(
            "classifier %s from %s (%s layout, architecture from %s); %s %s split: %d images "
            "(skip=%d, max=%s), %d already done",
            info.model_name,
            params.ckpt_path,
            info.layout,
            info.source,
            datamodule.name,
            params.split,
            len(indices),
            params.skip,
            params.max,
            len(indices) - len(todo),
        )
        for lg in trainer.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    module = SmoothingPredictor(
        classifier,
        num_classes,
        params,
        dataset,
        todo,
        run_dir,
        num_workers=getattr(datamodule, "num_workers", 0),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*predict returned None.*")  # on purpose: results go to the shards
        trainer.predict(module, return_predictions=False, weights_only=True)
    trainer.strategy.barrier("certify_merge")
    if not trainer.is_global_zero:
        return {}
    records = merge_results(run_dir, params)
    by_idx = {record.idx: record for record in records}
    missing = [idx for idx in indices if idx not in by_idx]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result (first idx {missing[0]}): re-run to resume")
    subset = [by_idx[idx] for idx in indices]
    common = {
        "mode": params.mode,
        "sigma": params.sigma,
        "n": params.n,
        "alpha": params.alpha,
        "seed": params.seed,
        "precision": params.precision,
        "batch": params.batch,
        "checkpoint": str(params.ckpt_path.resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "model_name": info.model_name,
        "dataset": datamodule.name,
        "split": params.split,
        "subset": {
            "skip": params.skip,
            "max": params.max,
            "indices": f"range(0, {len(dataset)}, {params.skip})[:{params.max}]",
            "data_subset": data_subset,
        },
        "world_size": trainer.world_size,
        "device": trainer.strategy.root_device.type,
    }
    if params.mode == "predict":
        summary = common | {
            "num_images": len(subset),
            "accuracy": sum(r.correct for r in subset) / len(subset),
            "abstain_rate": sum(r.predict == ABSTAIN for r in subset) / len(subset),
            "wall_time_s": time.time() - started,
        }
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        log.info("PREDICT accuracy %.4f, abstain rate %.4f", summary["accuracy"], summary["abstain_rate"])
        _log_to_loggers(trainer, summary)
        outputs = [run_dir / "predict.tsv", run_dir / "summary.json"]
    else:
        radii = params.radii or default_radii(datamodule.name)
        summary = common | {
            "n0": params.n0,
            "skip_wrong_guess": params.skip_wrong_guess,
            "radii": list(radii),
        }
        summary |= summary_metrics(subset, radii) | {"wall_time_s": time.time() - started}
        if params.skip_wrong_guess:  # a skipped wrong guess is written as a wrong, not an abstaining, prediction
            summary["abstain_rate"] = None
        write_summary(run_dir / "summary.json", **summary)
        png = run_dir / "certified_accuracy.png"
        plot_certified_accuracy({f"sigma={params.sigma:g}": subset}, png)
        table = format_table({f"{params.sigma:g}": summary["certified_accuracy"]}, radii)
        log.info(
            "certified accuracy (%%) of %d images, ACR %.4f, abstain rate %s:\n%s",
            len(subset),
            summary["average_certified_radius"],
            "not measured (skip_wrong_guess)" if params.skip_wrong_guess else f"{summary['abstain_rate']:.4f}",
            table,
        )
        _log_to_loggers(trainer, summary, radii, png)
        outputs = [run_dir / "certify.tsv", run_dir / "summary.json", png]
    for path in outputs:
        print(f"wrote {path}")
    return summary


def _log_to_loggers(trainer: pl.Trainer, summary: dict, radii=None, png: Path | None = None) -> None:
    """The results as metrics for every logger; for Weights & Biases also the certified-accuracy table and
    plot, and the end of the W&B run (the next job of a -m sweep must not log into it)."""
    if summary["mode"] == "certify":
        metrics = {f"cert/acc@{key}": value for key, value in summary["certified_accuracy"].items()}
        metrics["cert/acr"] = summary["average_certified_radius"]
        if summary["abstain_rate"] is not None:
            metrics["cert/abstain_rate"] = summary["abstain_rate"]
    else:
        metrics = {"predict/accuracy": summary["accuracy"], "predict/abstain_rate": summary["abstain_rate"]}
    for lg in trainer.loggers:
        lg.log_metrics(metrics)
        if isinstance(lg, WandbLogger) and summary["mode"] == "certify":
            keys = [radius_key(r) for r in radii]
            row = [summary["sigma"], *(summary["certified_accuracy"][k] for k in keys)]
            lg.log_table(key="certified_accuracy", columns=["sigma", *(f"r={k}" for k in keys)], data=[row])
            lg.log_image(key="certified_accuracy_plot", images=[str(png)])
        lg.save()
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
