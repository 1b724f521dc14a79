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
    """The process rank as the launchers set it (torchrun, Lightning's own subprocesses, SLURM), in Lightning's
    order: SLURM_PROCID is inherited by the processes Lightning's launcher starts inside an allocation (all of
    them would read 0), so LOCAL_RANK comes first. With Lightning's launcher on several nodes the first process of
    another node has no rank variable yet, only its NODE_RANK: it is not the job's rank 0 either."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            rank = int(os.environ[var])
            break
    else:
        rank = 0
    if rank == 0 and var != "RANK" and int(os.environ.get("NODE_RANK") or 0) > 0:
        return 1  # a node's first process, not the job's
    return rank
