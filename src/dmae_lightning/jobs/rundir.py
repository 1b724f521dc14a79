"""Hydra glue: run directories named by what a job computes, their lifecycle, and config resolvers.

Under ``srun`` every task runs ``@hydra.main`` itself, and a ``${now:...}`` directory would differ
per task and per restart. The run directory is therefore a pure function of the job's resolved
configuration and the SLURM job id, ``logs/<run_name>[/slurm-<job id>]/<key>``, where ``<key>`` is a
digest of everything that can change the results (``run_identity`` in the job config says what does
not): every rank and every requeued restart of a job finds the same directory, two configurations
never share one, and how the overrides were typed does not matter.

``prepare_run_dir`` is the one lifecycle both jobs follow: check that the directory can be written and
holds no other configuration's results (before anything is loaded), build the job, and only then write
the resolved config and point ``logs/<run_name>/latest`` at the directory. Hydra itself writes nothing
there (``hydra.output_subdir: null``), so a refused or invalid job leaves no trace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dmae_lightning.errors import ConfigError, one_line
from dmae_lightning.files import atomic_write_text
from dmae_lightning.jobs.cluster import global_rank, slurm_job_tag
from dmae_lightning.jobs.tracking import quiet_lightning
from dmae_lightning.models.weights import EXPORT_WEIGHTS

log = logging.getLogger(__name__)


T = TypeVar("T")


IDENTITY_FILE = "identity.json"  # in <run dir>/.hydra/, next to the resolved config.yaml


LOCK_FILE = "run.lock"  # in <run dir>/.hydra/: held by the job running there (rank 0)


LATEST = "latest"  # logs/<run_name>/latest -> the run directory of the newest finished job of that name


def run_dir(base: str, key: str = "") -> str:
    """``base[/slurm-<id>][/<key>]``: the same on every rank and after every restart."""
    parts = [base, slurm_job_tag(), key or None]
    return "/".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------ identity
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file's content (cached per path, size and mtime), or ``missing:<path>``.

    Content, not the path: ``logs/x/latest/checkpoints/last.ckpt`` and the real path are the same
    initial weights, and a checkpoint rewritten in place is a different one. An exported directory
    (jobs/export.py) is its ``model.safetensors``.
    """
    real = os.path.realpath(path)
    if os.path.isfile(os.path.join(real, EXPORT_WEIGHTS)):
        real = os.path.join(real, EXPORT_WEIGHTS)
    try:
        st = os.stat(real)
    except OSError:
        return f"missing:{path}"  # the job itself stops with one line when it needs the file
    if not os.path.isfile(real):  # a directory, say: the job says "not a file" in one line
        return f"not-a-file:{path}"
    cache_key = (real, st.st_size, st.st_mtime_ns)
    if cache_key not in _FILE_DIGESTS:
        sha = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
        _FILE_DIGESTS[cache_key] = f"sha256:{sha.hexdigest()}"
    return _FILE_DIGESTS[cache_key]


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            return
        tree = child
    tree.pop(leaf, None)


def _mapping(container: object) -> dict:
    """A job config as plain data: a dict (a config whose root is a list is no job's)."""
    if not isinstance(container, dict):
        raise TypeError(f"a job config is a mapping, got a {type(container).__name__}")
    return container


def resolved_config(cfg: DictConfig) -> dict:
    """The job config, resolved, as plain data (what the loggers record as the run's hyper-parameters)."""
    return _mapping(OmegaConf.to_container(cfg, resolve=True))


def job_identity(cfg: DictConfig) -> dict:
    """The job config, resolved, minus ``run_identity.ignore`` (where and how the job runs), with each key of
    ``run_identity.files`` replaced by its file's content digest: everything that can change the results."""
    spec = cfg.get("run_identity")
    if spec is None:
        raise ValueError("the job config has no run_identity (which keys name the run directory)")
    copy = OmegaConf.create(_mapping(OmegaConf.to_container(cfg, resolve=False)))
    with open_dict(copy):
        copy.pop("hydra", None)
        if "paths" in copy:  # Hydra names the run directory from this: other keys may point below it
            copy.paths.output_dir = "<run dir>"
    identity = _mapping(
        OmegaConf.to_container(copy, resolve=True)
    )  # resolved first: kept keys may use ignored ones
    for key in spec.ignore:
        _drop(identity, key)
    trainer = identity.get("trainer", {})
    if trainer.get("devices") in (-1, "auto") and trainer.get("accelerator") in ("gpu", "cuda"):
        import torch  # "every GPU of the node": the number itself changes the effective batch

        trainer["devices"] = torch.cuda.device_count()
    for key in spec.files:
        node, leaf = identity, key.split(".")
        for part in leaf[:-1]:
            node = node.get(part, {})
        if isinstance(node, dict) and node.get(leaf[-1]):
            node[leaf[-1]] = file_digest(str(node[leaf[-1]]))
    return identity


def identity_key(identity: dict) -> str:
    """8 hex digits of the identity's sha256: distinct configurations never meet within one run_name."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def read_record(path: Path, says: str) -> dict | None:
    """The JSON object recorded at ``path``, None when there is none; ConfigError (one line) when it is damaged,
    ``says`` telling what it records (hence why nothing can go on without it). The one reader of the records
    that guard a run directory: its identity, a procedure's settings, a finished run or stage."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({one_line(err)}): {says}") from None
    return record


def refuse_other_settings(
    where: Path, before: dict, now: dict, advice: str = "choose another run directory or remove it"
) -> None:
    """The one rule for a directory that holds results of other settings (a run directory's configuration, a
    procedure's settings, a quickstart stage's): refused in one line naming the first differences."""
    diff = _differences(before, now)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(
            f"{where} holds the results of another configuration ({'; '.join(diff[:3])}{more}): {advice}"
        )


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two identities (for the refusal message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


# Hydra resolves hydra.run.dir (and a sweep's dir and subdir) before it creates the directory, and again
# when anything asks for it later: directories that did not exist at the first resolution were made for
# this job, with the nearest directory that did exist, so that an invalid job can remove them again.
MADE_FOR_JOB: dict[str, str] = {}


def note_new_dir(path: str) -> str:
    """Record a directory Hydra is about to create for this job; stop (one line) if it cannot be created:
    Hydra's own mkdir would fail with a traceback. SystemExit, because Hydra reports any Exception raised
    while it resolves the directory with a traceback."""
    absolute = Path(path).resolve()
    if str(absolute) not in MADE_FOR_JOB and not absolute.is_dir():
        existing = absolute
        while not existing.is_dir():
            if (
                existing.exists() or existing.is_symlink()
            ):  # a file (or a dangling link) where a folder must go
                raise SystemExit(
                    f"error: cannot create the run directory {absolute}: {existing} is a file, not a "
                    "directory; choose another paths.log_dir"
                )
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SystemExit(
                f"error: cannot create the run directory {absolute}: {existing} is not writable "
                "(permissions or a read-only file system); choose another paths.log_dir"
            )
        MADE_FOR_JOB[str(absolute)] = str(existing)
    return path


# ------------------------------------------------------------------------------------------ lifecycle
R = TypeVar("R")


# Nothing else may be in a directory before its job writes identity.json (Hydra's job log aside).
_NOT_RESULTS = ("train.log", "certify.log")


def _unwritable(path: Path) -> Path | None:
    """The run directory (or, before it exists, the nearest existing parent), one of its sub-directories
    where this process cannot create files, or one of its files that it cannot write (a read-only
    metrics.csv or certify.tsv that a resume appends to); None if all can be written. ``os.access`` changes
    nothing and also sees read-only mounts and immutable directories (which stop root too)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path:
        return None if os.access(existing, os.W_OK | os.X_OK) else existing
    entries = [path, *path.rglob("*")]
    return next(
        (
            p
            for p in entries
            if p.is_dir()
            and not p.is_symlink()
            and not os.access(p, os.W_OK | os.X_OK)
            or p.is_file()
            and not p.is_symlink()
            and not os.access(p, os.W_OK)
        ),
        None,
    )


def _results_present(path: Path) -> list[str]:
    """Files in ``path`` that some job wrote (Hydra's job log and our own .hydra/ records aside)."""
    if not path.is_dir():
        return []
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name not in _NOT_RESULTS and ".hydra" not in p.relative_to(path).parts
    )


def _check_run_dir(path: Path, identity: dict) -> None:
    """Refuse (one line, nothing written) a run directory that cannot be written or holds other results."""
    blocked = _unwritable(path)
    if blocked is not None:
        raise ConfigError(
            f"cannot write to {blocked} (permissions or a read-only file system): "
            "fix its permissions or choose another paths.log_dir"
        )
    recorded = path / ".hydra" / IDENTITY_FILE
    says = (
        f"it says which configuration {path} holds, so nothing there can be resumed safely; restore it, or "
        "choose another run directory"
    )
    old = read_record(recorded, says)
    if old is not None:
        if not isinstance(old.get("identity"), dict) or "key" not in old:
            raise ConfigError(f"{recorded} is damaged (not the record of a configuration): {says}")
        if old["key"] != identity_key(identity):
            refuse_other_settings(path, old["identity"], identity)
    elif found := _results_present(path):
        raise ConfigError(
            f"{path} holds results of an unrecorded configuration ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): choose another run directory or remove it"
        )


def _refuse_unread_additions() -> None:
    """``+key=value`` at the top level adds a key that the job's config does not have (Hydra refuses ``+`` for a
    key that exists), so nothing reads it: a typo, or a key of another job. Refused in one line rather than
    ignored under a new run identity (a full rerun). ``+group=option`` and dotted keys are Hydra's to check."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if override.is_add() and not any(c in key for c in "./") and key not in hydra_cfg.runtime.choices:
            raise ConfigError(
                f"{override.input_line}: the {hydra_cfg.job.config_name} config has no key {key!r} "
                "and nothing reads it: remove it or correct its name"
            )


class RunDirLock:
    """An exclusive lock on a run directory for as long as one job runs there (rank 0 of a job takes it).

    ``flock`` on ``.hydra/run.lock``: the kernel drops it when the process ends, however it ends (a kill -9
    included), so a dead job never leaves a stale lock. The holder's pid is written into the file for the
    refusal message. (filelock and similar packages wrap the same call; one function is not worth a
    dependency.)
    """

    def __init__(self, path: Path):
        self.file = path / ".hydra" / LOCK_FILE
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(
                f"another job is running in {path} (pid {holder}): wait for it to finish, or "
                "stop it and run the same command again to resume"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove``: also delete the lock file (a job found invalid leaves no trace)."""
        if remove:
            self.file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.file.parent.rmdir()  # .hydra, if the lock file was all it held
        os.close(self.fd)


def _record_config(path: Path, cfg: DictConfig, identity: dict) -> None:
    """``.hydra/{identity.json,config.yaml,overrides.yaml,hydra.yaml}``: what Hydra would write, but resolved and
    only for a job that was found valid (``hydra.output_subdir: null``); identity.json guards the directory."""
    hydra_dir = path / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    record = {"key": identity_key(identity), "identity": identity}
    atomic_write_text(
        hydra_dir / IDENTITY_FILE, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
    )
    atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
        atomic_write_text(
            hydra_dir / "hydra.yaml", OmegaConf.to_yaml({"hydra": OmegaConf.to_container(hydra_cfg)})
        )


def _point_latest(path: Path, cfg: DictConfig) -> Path | None:
    """``logs/<run_name>/latest`` -> this run directory (:func:`point_latest`)."""
    return point_latest(Path(cfg.paths.log_dir, cfg.run_name).resolve(), path)


def point_latest(home: Path, path: Path) -> Path | None:
    """``home/latest`` -> ``path``, replaced atomically; None where ``path`` is not below ``home`` (an explicit
    hydra.run.dir, a quickstart stage) or a real directory is in the way."""
    if home not in path.parents:
        return None
    link = home / LATEST
    if link.exists() and not link.is_symlink():  # a user's copy: never replaced, never deleted
        log.warning(
            "%s is a real directory, not the link this job keeps: not pointed at %s (move it away to get "
            "the link back)",
            link,
            path,
        )
        return None
    tmp = home / f".{LATEST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(path.relative_to(home), target_is_directory=True)
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
    return link


def _remove_if_made_for_job(path: Path, *, recorded: bool = False) -> None:
    """Undo Hydra's mkdir for a job that stopped with one line: before it was valid, only its job log and
    empty directories go; after its records were written (``recorded``: a quickstart stage refused), the whole
    directory goes as long as it holds no result (records, job log and empty folders); then the directories
    above it, up to the nearest directory that existed before the job."""
    existing = MADE_FOR_JOB.get(str(path))
    if existing is None:
        return
    if recorded:
        if _results_present(path):
            return
        shutil.rmtree(path, ignore_errors=True)
    for name in _NOT_RESULTS:  # the refused job's own log: its error was printed, nothing else is in it
        (path / name).unlink(missing_ok=True)
    current = path
    while str(current) != existing and not (current.is_dir() and any(current.iterdir())):
        if current.is_dir():
            current.rmdir()
        current = current.parent


def run_in_dir(
    cfg: DictConfig,
    build: Callable[[], T],
    run: Callable[[T], R],
    *,
    resume_hint: str,
    finished: Callable[[Path], R | None] | None = None,
) -> R:
    """The run directory's lifecycle, the same for every job (training, quickstart, certification):

    1. before anything is loaded: no ``+key`` that nothing reads, the directory (``paths.output_dir``) can be
       written and holds no other configuration's results (``.hydra/identity.json``), else one line and
       nothing touched; rank 0 locks it (:class:`RunDirLock`: a second job on the same directory is refused
       in one line); ``finished(path)``, when given, returns the result of a job that already finished there:
       it is returned without touching anything;
    2. ``build()`` (data, model, checkpoints: every check on the user's input); if it fails, a directory
       Hydra created for this job is removed again;
    3. rank 0 records the resolved config in ``.hydra/``; ``run(built)``; a full disk there ends in one
       line saying how to resume (``resume_hint``), and so do a SIGTERM and a Ctrl-C (exit status 1, not
       Lightning's 0 or its bare "attempting graceful shutdown");
    4. at the end rank 0 points ``logs/<run_name>/latest`` at the directory; both ends print it.
    """
    quiet_lightning()
    path = Path(cfg.paths.output_dir).resolve()
    lock = None
    try:
        _refuse_unread_additions()
        try:
            identity = job_identity(cfg)
        except (ValueError, MissingMandatoryValue, InterpolationResolutionError) as err:
            raise ConfigError(one_line(err)) from None
        _check_run_dir(path, identity)
        if global_rank() == 0:
            note_new_dir(
                str(path)
            )  # made here when Hydra did not make it (compose): removed again on refusal
            lock = RunDirLock(path)
        done = finished(path) if finished is not None else None
        if done is not None:
            if lock is not None:
                lock.release()
            return done
        built = build()
    except BaseException:
        if global_rank() == 0:
            if lock is not None:
                lock.release(
                    remove=not _results_present(path) and not (path / ".hydra" / IDENTITY_FILE).exists()
                )
            _remove_if_made_for_job(path)
        raise
    try:
        if global_rank() == 0:
            _record_config(path, cfg, identity)
            log.info("run directory: %s", path)
        result = run(built)
    except ConfigError:  # e.g. a quickstart stage refused its input: no run directory without results
        if global_rank() == 0:
            if lock is not None:
                lock.release()
                lock = None
            _remove_if_made_for_job(path, recorded=True)
        raise
    except (
        SIGTERMException
    ):  # Lightning's loops stop after a SIGTERM with a bare SystemExit: status 0, no word
        raise SIGTERMException(f"interrupted; {resume_hint}") from None
    except SystemExit as err:  # Lightning turns a Ctrl-C into a bare sys.exit(1) after "graceful shutdown"
        if isinstance(err.__context__, KeyboardInterrupt):
            raise SystemExit(f"interrupted; {resume_hint}") from None
        raise
    except KeyboardInterrupt:  # a Ctrl-C outside Lightning's loops
        raise SystemExit(f"interrupted; {resume_hint}") from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        staged = err.filename and path not in Path(str(err.filename)).resolve().parents
        where = f"{path} (while writing {err.filename})" if staged else (err.filename or path)
        raise ConfigError(
            f"no space left on the device of {where}: what was written before is kept; "
            f"free some space, then {resume_hint}"
        ) from None
    else:
        if global_rank() == 0:
            latest = _point_latest(path, cfg)
            if latest:  # (the directory itself was logged when the job started)
                log.info("finished: %s (also %s)", path, latest)
        return result
    finally:
        if lock is not None:
            lock.release()
