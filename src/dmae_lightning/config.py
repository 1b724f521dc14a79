"""Hydra glue: resolvers for run directories that survive ``srun`` and requeue, and config checks.

Under ``srun`` every task runs ``@hydra.main`` itself, and a ``${now:...}`` directory would differ
per task and per restart. The run directory is therefore a pure function of the config and the
SLURM job id: every rank and every requeued restart of a job resolves the same path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict


def slurm_job_tag() -> str | None:
    """``slurm-<job>`` (``slurm-<array job>_<task>`` for arrays) inside a SLURM job, else None."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm-{array_job}_{array_task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def run_dir(base: str, overrides: str = "") -> str:
    """``base[/slurm-<id>][/<overrides>]``: the same on every rank and after every restart."""
    parts = [base, slurm_job_tag(), overrides or None]
    return "/".join(p for p in parts if p)


def global_rank() -> int:
    """The process rank as the launchers set it (SLURM, torchrun, Lightning's own subprocesses)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def rank_zero_only_value(value, otherwise=None):
    """``value`` on rank 0, ``otherwise`` elsewhere: only rank 0 writes Hydra's ``.hydra`` folder and log."""
    return value if global_rank() == 0 else otherwise


def stderr_is_terminal() -> bool:
    """Progress bars only for a person at a terminal: no bar spam in batch logs."""
    return sys.stderr.isatty()


def require(key: str):
    """``key: ${require:key}`` in an experiment: the command line must set it.

    (OmegaConf merges skip ``???`` values, so an experiment cannot mark a key mandatory that way.)
    """
    raise ValueError(f"this experiment needs {key}=... on the command line")


def group_choice(group: str, *, _root_) -> str:
    """``${group_choice:data}``: the option chosen for a config group, e.g. "digits".

    ``${hydra:runtime.choices.data}`` only resolves inside a job (HydraConfig set), but a -m sweep
    resolves run_name for its sweep directory before that; there the config still holds the hydra node.
    """
    choice = OmegaConf.select(_root_, f"hydra.runtime.choices.{group}", default=None)
    if choice is None:
        choice = HydraConfig.get().runtime.choices[group]
    return str(choice)


def register_resolvers() -> None:
    resolvers = (
        ("run_dir", run_dir),
        ("rank_zero_only", rank_zero_only_value),
        ("is_terminal", stderr_is_terminal),
        ("require", require),
        ("group_choice", group_choice),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(config_dir, config_name: str, overrides: list[str] = (), output_dir: str | None = None):
    """Compose a job config outside ``@hydra.main`` (tests, notebooks), as the command line would.

    ``${hydra:...}`` interpolations resolve against the composed Hydra config; ``output_dir``
    stands in for the run directory Hydra would create.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
