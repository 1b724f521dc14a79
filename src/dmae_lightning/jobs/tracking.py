"""Experiment tracking that survives SLURM requeue and Hydra multiruns (conf/logger/*.yaml).

- ``wandb_logger(...)``: Lightning's WandbLogger with the run's identity taken from the job. Inside a SLURM job
  the W&B run id is derived from the job (array) id and the run directory, with ``resume="allow"``, so a
  requeued restart continues the same W&B run; elsewhere W&B draws a fresh id for every job. A run still open
  from an earlier job of the same process is finished first (multirun jobs share one process).
- ``finish_runs(failed)``: ends the W&B run at the end of a job. Lightning never calls ``wandb.finish()``, and
  a WandbLogger that finds ``wandb.run`` still open *reuses* it: without this every point of a sweep would log
  into the first point's run.
- ``ResumableCSVLogger``: Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, which after
  a requeue or a resume would erase everything logged before; on a SLURM restart and on a resume
  (``keep_logged_metrics``) this one appends.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from dmae_lightning.jobs.cluster import slurm_job_tag

log = logging.getLogger(__name__)


def slurm_restart_count() -> int:
    """``SLURM_RESTART_COUNT`` (0 outside SLURM and on a job's first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def wandb_run_id(save_dir: str | Path) -> str | None:
    """``slurm-<job>[_<task>]-<hash of the run directory>`` inside a SLURM job, else None (W&B picks one).

    Every restart of a requeued job resolves the same run directory and job id, hence the same W&B run.
    """
    tag = slurm_job_tag()
    if tag is None:
        return None
    digest = hashlib.sha1(str(Path(save_dir).resolve()).encode()).hexdigest()[:10]
    return f"{tag}-{digest}"


def default_run_name(save_dir: str | Path, base_dir: str | Path | None, fallback: str) -> str:
    """The run directory below ``base_dir`` (e.g. ``<run_name>/slurm-123``), else ``fallback``."""
    if base_dir is not None:
        try:
            rel = Path(save_dir).resolve().relative_to(Path(base_dir).resolve())
        except ValueError:
            rel = None
        if rel is not None and str(rel) != ".":
            return rel.as_posix()
    return fallback


def finish_runs(failed: bool = False) -> None:
    """Finish the open W&B run, if any (only rank 0 has one); ``failed`` marks it with exit code 1."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def wandb_logger(
    save_dir: str,
    project: str = "dmae-lightning",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    base_dir: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    id: str | None = None,
    resume: str | None = None,
    log_model: bool | Literal["all"] = False,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger for one job (see the module docstring).

    ``name: null`` names the run after its run directory below ``base_dir`` (``logs/``), e.g.
    ``finetune_digits_sigma0.5/multirun/objective.lbd-1`` or ``pretrain_digits_sigma0.25/slurm-1234``,
    falling back to ``group``. ``id: null`` derives the id from the SLURM job (see ``wandb_run_id``); an
    explicit ``id`` resumes that run.
    """
    finish_runs()  # a run left open by an earlier job of this process must not absorb this one
    if id is None:
        id = wandb_run_id(save_dir)
    if id is not None and resume is None:
        resume = "allow"
    if name is None:
        name = default_run_name(save_dir, base_dir, group or project)
    if resume is not None:
        kwargs["resume"] = resume
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        group=group,
        name=name,
        tags=list(tags),
        id=id,
        log_model=log_model,
        **kwargs,
    )


class _SafeExperimentWriter(ExperimentWriter):
    """Rewrites metrics.csv (Lightning does when a new metric name appears) into a new file that is then renamed
    over it: Lightning rewrites it in place, and a kill during that rewrite would leave only part of it."""

    def _replace_metrics(self, text: str) -> None:
        partial = f"{self.metrics_file_path}.partial"
        with self._fs.open(partial, "w", newline="") as file:
            file.write(text)
        self._fs.mv(partial, self.metrics_file_path)  # a rename within the folder

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        self._replace_metrics(text.getvalue())


class _AppendingExperimentWriter(_SafeExperimentWriter):
    """Keeps an existing metrics.csv (and its header) instead of deleting it. A last row cut short by a kill
    (no newline at its end) is dropped: it belongs to a step after the checkpoint, which is logged again."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                text = file.read()
            if not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
                if text:
                    self._replace_metrics(text)
                else:  # not even a whole header: start the file afresh
                    self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = sorted(set(next(csv.reader(io.StringIO(text)), [])))
            log.info("appending to %s", self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends to the run's metrics.csv instead of deleting it: on a SLURM restart
    (``SLURM_RESTART_COUNT`` > 0), when ``append=true``, or after ``keep_logged_metrics`` (a resumed run).
    Rows of steps run twice (after the checkpoint, before the job was killed) then appear twice: the later row
    is the one the resumed run computed."""

    _experiment: ExperimentWriter | None  # one of the writers above, built by ``experiment``

    def __init__(self, *args: Any, append: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.append = slurm_restart_count() > 0 if append is None else bool(append)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = _AppendingExperimentWriter if self.append else _SafeExperimentWriter
            self._experiment = writer(log_dir=self.log_dir)
        return self._experiment


def keep_logged_metrics(loggers: list) -> None:
    """Make the CSV loggers of a resumed run append (call before anything is logged)."""
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.append = True


# ------------------------------------------------------------------------------------------ output
# Lightning's info lines that say nothing about the run: advertising tips, device availability repeated by every
# Trainer of a process (the job logs its devices once), the stepping-batch estimate.
_LIGHTNING_CHATTER = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Loading `train_dataloader` to estimate",
)


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_CHATTER)


def quiet_lightning() -> None:
    """Silence, by name, what Lightning prints that is no news about this run; every other warning stays.

    Lightning has no switch for these lines. Its ``srun`` hint fires on any machine with Slurm installed;
    it is dropped only outside a Slurm job (inside one it catches a forgotten ``srun``). The LeafSpec
    deprecation comes from Lightning's own code calling torch's pytree, not from ours.
    """
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in logger.filters):
            logger.addFilter(_DropLightningChatter())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if slurm_job_tag() is None:
        warnings.filterwarnings(
            "ignore", message="The `srun` command is available on your system but is not used"
        )
