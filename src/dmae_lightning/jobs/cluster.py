"""Where a job runs: its rank and its SLURM job, as the launchers (srun, torchrun, Lightning's own
subprocesses) tell each process through the environment. Imports: nothing of this package."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def slurm_job_tag() -> str | None:
    """``slurm-<job>`` (``slurm-<array job>_<task>`` for arrays) inside a SLURM job, else None."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm-{array_job}_{array_task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def global_rank() -> int:
    """The process rank as the launchers set it (SLURM, torchrun, Lightning's own subprocesses)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0
