"""The OmegaConf resolvers the configs use (``${run_dir:}``, ``${sweep_dir:}``, ``${run_key:}``,
``${rank_zero_only:...}``, ``${is_terminal:}``, ``${require:key}``, ``${group_choice:group}``,
``${noise_tag:}``, ``${checkpoint_noise:}``), registered when :mod:`dmae_lightning.jobs` is imported, before Hydra composes a config.
Imports: :mod:`.rundir` (run directory names and identity), :mod:`.cluster`, the noise, models.weights."""

from __future__ import annotations

import functools
import logging
import os
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dmae_lightning.jobs.cluster import global_rank
from dmae_lightning.jobs.rundir import identity_key, job_identity, note_new_dir, run_dir
from dmae_lightning.models.weights import checkpoint_noise
from dmae_lightning.noise import noise_from_config

log = logging.getLogger(__name__)


def _key_or_invalid(root: DictConfig) -> str:
    """The identity key; a config that does not resolve gets ``invalid``: the job then stops with its one-line
    error (``run_in_dir``) and removes the directory again, instead of Hydra printing a traceback."""
    try:
        return identity_key(job_identity(root))
    except Exception:  # noqa: BLE001 (any resolution error is reported by the job itself)
        return "invalid"


def _hydra_dir(root: DictConfig, sweep: bool) -> str:
    """``${run_dir:}`` / ``${sweep_dir:}``: logs/<run_name>[/multirun][/slurm-<id>][/<key>]."""
    log_dir, name = OmegaConf.select(root, "paths.log_dir"), OmegaConf.select(root, "run_name")
    if log_dir is None or name is None:  # `--cfg hydra` prints the hydra node alone
        return "<paths.log_dir>/<run_name>/<key>: decided when the job runs"
    if sweep:
        return note_new_dir(run_dir(f"{log_dir}/{name}/multirun"))
    return note_new_dir(run_dir(f"{log_dir}/{name}", _key_or_invalid(root)))


def _run_dir_resolver(*, _root_: DictConfig) -> str:
    return _hydra_dir(_root_, sweep=False)


def _sweep_dir_resolver(*, _root_: DictConfig) -> str:
    return _hydra_dir(_root_, sweep=True)


def _sweep_subdir_resolver(*, _root_: DictConfig) -> str:
    base = _hydra_dir(_root_, sweep=True)
    key = _key_or_invalid(_root_)
    note_new_dir(f"{base}/{key}")
    return key


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


def noise_tag(*, _root_) -> str:
    """``${noise_tag:}``: the job's noise in its run name, e.g. ``sigma0.25`` or ``discrete_sigma0.25``; an
    invalid noise gets ``invalid-noise`` (Hydra names the directory before the job can report the error)."""
    if _root_.get("noise") is None:  # certify.py: the checkpoint records none (the job says so)
        return "noise-unknown"
    try:
        return noise_from_config(_root_.noise).tag
    except (ValueError, TypeError):
        return "invalid-noise"


@functools.lru_cache(maxsize=8)
def _recorded_noise(path: str, size: int, mtime_ns: int) -> dict | None:
    noise = checkpoint_noise(path)
    return None if noise is None else noise.config()


# Re-entry guard: ``weights=...${noise.sigma}...`` (a sweep over sigma) refers back to the noise.
_NAMING_WEIGHTS: list[bool] = []


def checkpoint_noise_config(*, _root_) -> dict | None:
    """``noise: ${checkpoint_noise:}`` (certify.py): the noise the checkpoint ``weights`` was trained with, as a
    noise config; None when the file records none or cannot be read (the job then says why in one line). Read
    once per file version (its tensors are mapped, not loaded). A ``weights`` path that names the noise itself
    (``${noise.sigma}``) resolves without it: Hydra names a sweep's directory before the swept noise is chosen."""
    if _NAMING_WEIGHTS:
        return None
    _NAMING_WEIGHTS.append(True)
    try:
        weights = OmegaConf.select(
            _root_, "weights", throw_on_missing=False, throw_on_resolution_failure=False
        )
    finally:
        _NAMING_WEIGHTS.pop()
    try:
        stat = os.stat(str(weights))
    except (OSError, TypeError, ValueError):
        return None
    return _recorded_noise(str(weights), stat.st_size, stat.st_mtime_ns)


def register_resolvers() -> None:
    resolvers = (
        ("run_dir", _run_dir_resolver),
        ("sweep_dir", _sweep_dir_resolver),
        ("run_key", _sweep_subdir_resolver),
        ("rank_zero_only", rank_zero_only_value),
        ("is_terminal", stderr_is_terminal),
        ("require", require),
        ("group_choice", group_choice),
        ("noise_tag", noise_tag),
        ("checkpoint_noise", checkpoint_noise_config),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
