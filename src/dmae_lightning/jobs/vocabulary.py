"""Old configuration spellings: each is refused in one line that names the new key, before Hydra composes (it
would only say that the key does not exist). The one table of renamed keys, per job config (``train``: train.py
with its tasks and the quickstart; ``certify``: certify.py), checked by the entry scripts on the command line
and by :func:`~dmae_lightning.jobs.compose.compose`. Imports: errors only (and Hydra's override parser)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from dmae_lightning.errors import ConfigError

_CERTIFICATION = {  # the certification settings, by their certify.py names (certify.py and the quickstart)
    "mode": "procedure",
    "batch": "batch_size",
    "images": "num_images",
    "trainer.precision": "precision (32-true | bf16-mixed | 16-mixed; the hardware group sets it)",
}
_OBJECTIVE = (
    "the objective group: objective=consistency | gaussian, with objective.copies (was m), objective.lbd, "
    "objective.eta (null: the paper's at the noise's sigma)"
)
RENAMED: dict[str, dict[str, str]] = {
    "certify": {
        **_CERTIFICATION,
        "ckpt_path": "weights (the classifier to certify; certify.py resumes by itself)",
    },
    "train": {
        **_CERTIFICATION,
        "consistency": _OBJECTIVE,
        "task.module.consistency": _OBJECTIVE,
        "task.callbacks": "callbacks (e.g. callbacks.certification.n=..., callbacks.reconstruction_pictures=null)",
        "callbacks.certification.batch": "callbacks.certification.batch_size",
    },
}


def refuse_old_spellings(config_name: str, overrides: Sequence[str]) -> None:
    """ConfigError (one line) for the first override of ``config_name``'s job that uses a renamed key.
    Arguments that are not overrides (``-m``, ``--cfg``) and overrides Hydra cannot parse are left to Hydra."""
    renamed = RENAMED.get(config_name, {})
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = OverridesParser.create().parse_overrides([arg])
        except HydraException:
            continue
        key = override.key_or_group
        for old, new in renamed.items():
            if key == old or key.startswith(f"{old}."):
                raise ConfigError(f"{arg}: {old} is now {new}")


def exit_on_old_spellings(config_name: str, argv: Sequence[str]) -> None:
    """The entry scripts' check of their command line: ``error: <line>`` and exit status 1."""
    try:
        refuse_old_spellings(config_name, argv)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
