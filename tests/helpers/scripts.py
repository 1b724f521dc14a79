"""The project's entry scripts run as a user runs them: a fresh interpreter, an environment without the caller's
SLURM job (a restart count would change the run) and one intra-op thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from helpers import REPO

OUTSIDE = ("SLURM_", "SBATCH_", "SRUN_")  # the caller's SLURM job, never the script's


def clean_env(drop: Sequence[str] = OUTSIDE, **extra: str) -> dict[str, str]:
    """This environment minus the variables starting with ``drop``, unbuffered, one thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_script(
    script: str, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in ``cwd`` with its output captured; prints how long it took."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"python {script} {' '.join(args)}: {time.monotonic() - started:.1f} s")
    return proc
