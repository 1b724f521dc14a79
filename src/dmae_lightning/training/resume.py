"""Which checkpoint a training run resumes from (``ckpt_path``), checked before anything is built.

Lightning checks nothing until ``fit`` has built the model and the data: a missing file, a damaged one or a
pickle that is not a checkpoint surfaces as a long traceback (for a refused pickle one that ends with torch's
advice to load it with ``weights_only=False``). Here each becomes one line, and ``ckpt_path=last`` falls back
to the earlier checkpoint kept next to ``last.ckpt`` (conf/callbacks/default.yaml) when the newest is damaged,
for instance cut short by a kill on a file system where the write was not atomic.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dmae_lightning.models.weights import read_checkpoint

log = logging.getLogger(__name__)

LAST = "last"
# What Lightning needs to restore a run: without optimizer states it stops with a KeyError.
_TRAINING_KEYS = ("state_dict", "optimizer_states", "global_step")


def check_resumable(path: str | Path) -> None:
    """Raise FileNotFoundError / ValueError (one line) unless ``path`` is a training checkpoint that loads.

    The tensors are memory-mapped, not read, so this costs little even for a ViT-L checkpoint; a truncated
    file already fails here (its zip directory, written last, is missing).
    """
    ckpt = read_checkpoint(path, mmap=True)
    missing = [key for key in _TRAINING_KEYS if key not in ckpt]
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint to resume (no {', '.join(missing)}): "
            f"to start from its weights use pretrained={path}"
        )


def check_matches(path: str | Path, module) -> None:
    """ValueError (one line) unless the training checkpoint ``path`` holds this module's tensors: same names,
    same shapes. Lightning would find out inside ``fit`` with a long ``load_state_dict`` traceback (a
    fine-tuning checkpoint resumed as pre-training, a patch-8 model resumed as patch-4)."""
    ckpt = read_checkpoint(path, mmap=True)
    theirs = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs == ours:
        return
    differ = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
    model = (ckpt.get("hyper_parameters") or {}).get("model_name", "an unnamed model")
    first = differ[0]
    detail = f"{first}: {theirs.get(first, 'absent')} there, {ours.get(first, 'absent')} here"
    raise ValueError(
        f"{path} is a checkpoint of {model} ({len(differ)} tensors differ, e.g. {detail}); this run trains "
        f"{getattr(module.hparams, 'model_name', type(module).__name__)}: resume a checkpoint of this run, or "
        f"start from its weights with pretrained={path}"
    )


def _newest_first(folder: Path) -> list[Path]:
    """``last.ckpt``, then the other checkpoints of ``folder``, newest first, each file once."""
    last = folder / f"{LAST}.ckpt"
    others = sorted(
        (p for p in folder.glob("*.ckpt") if p != last and p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    paths, seen = [], set()
    for path in ([last] if last.is_symlink() or last.exists() else []) + others:
        real = path.resolve()
        if real not in seen:  # last.ckpt links to the newest kept file: try that file once
            seen.add(real)
            paths.append(path)
    return paths


def _checkpoint_folder(cfg: DictConfig) -> Path:
    """Where the ``last_checkpoint`` callback writes (the run directory's checkpoints/ by default)."""
    dirpath = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    return Path(dirpath or Path(cfg.paths.output_dir) / "checkpoints")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint file to pass to ``Trainer.fit`` for the train config ``cfg``, or None to start at step 0.

    ``cfg.ckpt_path``: null (start at step 0, unless that folder already holds checkpoints: an interrupted run
    is resumed, never overwritten), ``last`` (the newest loadable checkpoint in the folder of the
    ``last_checkpoint`` callback; none at all is not an error, so a job can always be submitted with
    ``ckpt_path=last``) or a file.
    """
    ckpt_path = cfg.ckpt_path
    if not ckpt_path:
        folder = _checkpoint_folder(cfg)
        newest = _newest_first(folder)
        hpc = sorted(Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime)
        if hpc and (not newest or hpc[-1].stat().st_mtime >= newest[0].resolve().stat().st_mtime):
            # a SLURM requeue's own checkpoint, newer than the epoch checkpoints: resume from it by path
            # (Lightning itself takes it only inside a SLURM job, and only when ckpt_path is null)
            check_resumable(hpc[-1])
            _warn(f"resuming the requeued run from {hpc[-1]}")
            return str(hpc[-1])
        if not newest:
            return None
        _warn(
            f"{folder} holds the checkpoints of an interrupted run: resuming it (ckpt_path=last), not "
            "starting over; to train from step 0, change a setting of the run (a new run directory)"
        )
        ckpt_path = LAST
    if ckpt_path != LAST:
        check_resumable(ckpt_path)
        return str(ckpt_path)
    folder = _checkpoint_folder(cfg)
    candidates = _newest_first(folder)
    if not candidates:
        _warn(f"ckpt_path=last: no checkpoint in {folder} yet, training starts at step 0")
        return None
    damaged = []
    for path in candidates:
        try:
            check_resumable(path)
        except (FileNotFoundError, ValueError) as err:
            damaged.append(str(err))
            continue
        if damaged:
            _warn(f"{damaged[0]}; resuming from {path} instead")
        return str(path)
    raise ValueError(f"{damaged[0]}; no other checkpoint in the folder loads either")


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)
