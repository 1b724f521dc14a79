"""The certification job's validated settings: every top-level key of conf/certify.yaml, checked
before anything is loaded, each bad value refused with one line (ConfigError)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dmae_lightning.certification.checks import (
    PRECISION_NAMES,
    check_alpha,
    check_counts,
    check_precision,
    evenly_spaced,
)
from dmae_lightning.certification.metrics import DEFAULT_RHO
from dmae_lightning.certification.procedures import PROCEDURES
from dmae_lightning.data import SPLITS
from dmae_lightning.errors import ConfigError
from dmae_lightning.models.weights import read_checkpoint
from dmae_lightning.noise import Noise, noise_from_config

_TRAINER_PRECISIONS = ("32-true", "32", 32)


@dataclass(frozen=True)
class AttackParams:
    """The ``attack:`` node (procedure=attack; procedures.AttackPredict)."""

    steps: int  # PGD steps T
    step_size: float  # each step moves step_size * eps / steps
    samples: int  # noise draws m averaged per step
    random_start: bool


@dataclass(frozen=True)
class JobParams:
    procedure: str  # a key of PROCEDURES
    weights: Path  # the classifier to certify
    split: str
    skip: int
    max: int | None
    num_images: int | None  # N evenly spaced images (protocol=images500 / images1000) instead of skip and max
    n0: int
    n: int
    alpha: float
    rho: float  # failure probability of the data-set-level lower bound on certified accuracy
    noise: Noise  # the job's one noise: sampling and radii
    noise_override: bool  # another noise than the checkpoint's training noise is allowed
    batch_size: int
    seed: int
    precision: str  # 32-true | bf16-mixed | 16-mixed (Lightning's names; the hardware group sets it)
    compile: bool
    skip_wrong_guess: bool
    radii: tuple[float, ...] | None
    log_every_s: float
    attack: AttackParams


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _radii(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    radii = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [value]
    if not radii or not all(_is_number(r) and r >= 0 for r in radii):
        raise ConfigError(f"radii must be null or a non-empty list of numbers >= 0, got {radii!r}")
    return tuple(float(r) for r in radii)


_ATTACK_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {  # key of the attack node: (check, the rule)
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "step_size": (lambda v: _is_number(v) and v > 0, "a number > 0 (in units of eps / steps)"),
    "samples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "random_start": (lambda v: isinstance(v, bool), "true or false"),
}


def _attack(node: Any) -> AttackParams:
    """The ``attack:`` node, each key checked (ConfigError, one line)."""
    if not isinstance(node, DictConfig | dict):
        raise ConfigError(f"attack must be a node of {', '.join(_ATTACK_RULES)}, got {node!r}")
    values: dict[str, Any] = {key: node.get(key) for key in _ATTACK_RULES}
    for key, (ok, rule) in _ATTACK_RULES.items():
        if not ok(values[key]):
            raise ConfigError(f"attack.{key} must be {rule}, got {values[key]!r}")
    return AttackParams(
        values["steps"], float(values["step_size"]), values["samples"], values["random_start"]
    )


def subset_indices(size: int, params: JobParams) -> tuple[int, list[int]]:
    """(skip, indices) of the images to certify among the split's ``size``: ``range(0, size, skip)[:max]``,
    or with ``num_images`` = N the N evenly spaced images ``range(0, size, size // N)[:N]``; ConfigError (one
    line) when the split has fewer than N images."""
    if params.num_images is None:
        return params.skip, list(range(0, size, params.skip))[: params.max]
    try:
        return size // params.num_images, evenly_spaced(size, params.num_images)
    except ValueError:
        raise ConfigError(
            f"num_images={params.num_images}, but the {params.split} split has only {size} images"
        ) from None


def validate(cfg: DictConfig) -> JobParams:
    """Check every top-level key before anything is loaded; ConfigError (one line) on the first bad one."""
    weights = OmegaConf.select(cfg, "weights", throw_on_missing=False)
    if not weights:
        raise ConfigError("weights is required: python certify.py weights=PATH ...")
    try:  # the library's own range rules (certification.checks)
        check_counts(n0=cfg.get("n0"), n=cfg.get("n"), batch_size=cfg.get("batch_size"))
        check_alpha(cfg.alpha)
        check_alpha(cfg.get("rho", DEFAULT_RHO), "rho")
        check_precision(cfg.precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key, minimum in (("skip", 1), ("seed", 0)):
        value = cfg.get(key)
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if cfg.max is not None and (not _is_int(cfg.max) or cfg.max < 1):
        raise ConfigError(f"max must be an integer >= 1 or null, got {cfg.max!r}")
    num_images = cfg.get("num_images")
    if num_images is not None:
        if not _is_int(num_images) or num_images < 1:
            raise ConfigError(f"num_images must be an integer >= 1 or null, got {num_images!r}")
        if cfg.skip != 1 or cfg.max is not None:
            raise ConfigError(
                f"num_images={num_images} (protocol=images{num_images}) picks evenly spaced images itself: leave "
                f"skip and max at their defaults (got skip={cfg.skip}, max={cfg.max})"
            )
    if cfg.get("noise") is None:  # ${checkpoint_noise:} found none
        path = Path(str(weights)).expanduser()
        if not path.exists():
            raise ConfigError(f"weights={weights} does not exist")
        try:  # a file that does not load says so (its tensors mapped, not read)
            read_checkpoint(path, mmap=True)
        except (ValueError, OSError) as err:
            raise ConfigError(str(err)) from None
        raise ConfigError(
            f"{weights} does not record the noise it was trained with (an official or plain file): choose the "
            "smoothing noise, e.g. noise=sigma_0.25"
        )
    try:
        noise = noise_from_config(cfg.noise)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    if cfg.procedure not in PROCEDURES:
        raise ConfigError(f"procedure must be one of {'|'.join(PROCEDURES)}, got {cfg.procedure!r}")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {'|'.join(SPLITS)}, got {cfg.split!r}")
    for key in ("skip_wrong_guess", "compile", "noise_override"):
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    log_every_s = cfg.get("log_every_s", 60)
    if not _is_number(log_every_s) or log_every_s <= 0:
        raise ConfigError(f"log_every_s must be a number > 0, got {log_every_s!r}")
    if cfg.trainer.get("precision", "32-true") not in _TRAINER_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} would autocast the whole job: leave it at 32-true "
            f"and choose the classifier's precision with the top-level key precision={'|'.join(PRECISION_NAMES)}"
        )
    return JobParams(
        procedure=cfg.procedure,
        weights=Path(str(weights)).expanduser(),
        split=cfg.split,
        skip=cfg.skip,
        max=cfg.max,
        num_images=num_images,
        n0=cfg.n0,
        n=cfg.n,
        alpha=float(cfg.alpha),
        rho=float(cfg.get("rho", DEFAULT_RHO)),
        noise=noise,
        noise_override=cfg.get("noise_override", False),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        precision=cfg.precision,
        compile=cfg.compile,
        skip_wrong_guess=cfg.skip_wrong_guess,
        radii=_radii(cfg.get("radii")),
        log_every_s=float(log_every_s),
        attack=_attack(cfg.get("attack")),
    )
