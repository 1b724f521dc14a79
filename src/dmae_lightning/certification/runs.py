"""A certification run's ``summary.json`` as a typed object: :class:`RunSummary` (its procedure, the settings its
numbers depend on and its result, :mod:`.summary`), and :func:`read_summary`, the one reader of those files, older
ones included (the only place that knows their key names). Imports :mod:`.procedures` (the registry), hence torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmae_lightning.certification.procedures import PROCEDURES, Certify
from dmae_lightning.certification.protocol import Procedure
from dmae_lightning.certification.records import read_json
from dmae_lightning.certification.summary import Result, number

PROCEDURE_KEY = "procedure"  # summary.json's key of the procedure's name
# Keys of older summary.json files, by their names now (top level and in "subset"): read_summary only.
OLD_KEYS = {"mode": PROCEDURE_KEY, "batch": "batch_size", "images": "num_images"}


@dataclass(frozen=True)
class RunSummary:
    """A run's summary.json: its procedure (the class), the settings its numbers depend on and its result.

    ``settings`` holds every other key of the file: the job's key (the procedure's settings, noise, sigma, seed,
    precision, data set, split, ...), the image subset, the classifier, timings.
    """

    procedure: type[Procedure]
    settings: Mapping[str, Any]
    result: Result

    @property
    def sigma(self) -> float:
        return float(self.settings["sigma"])

    @property
    def n(self) -> int:
        return int(self.settings["n"])

    @property
    def alpha(self) -> float:
        return float(self.settings["alpha"])

    def to_json(self) -> dict[str, Any]:
        """The contents of summary.json."""
        return {PROCEDURE_KEY: self.procedure.name, **self.settings, **self.result.to_json()}

    @classmethod
    def from_json(cls, data: Any, where: str = "summary") -> RunSummary:
        """The summary of ``data`` (a summary.json's contents, older files' key names included); ValueError
        (one line, starting with ``where``) when it is none."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a JSON {type(data).__name__}, not a run summary")
        settings = _renamed(data)
        if isinstance(settings.get("subset"), dict):
            settings["subset"] = _renamed(settings["subset"])
        # the first summaries named no procedure: CERTIFY was the only one
        name = settings.pop(PROCEDURE_KEY, Certify.name)
        if not isinstance(name, str) or name not in PROCEDURES:
            raise ValueError(f"{where}: unknown procedure {name!r} (one of {' | '.join(PROCEDURES)})")
        procedure = PROCEDURES[name]
        sigma = settings.get("sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < sigma < math.inf:
            raise ValueError(f"{where}: sigma must be a number > 0, got {sigma!r}")
        try:
            number(settings, "n"), number(settings, "alpha")
            result = procedure.result_from_json(settings)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        kept = {key: value for key, value in settings.items() if key not in type(result).JSON_KEYS}
        return cls(procedure, kept, result)


def _renamed(data: dict) -> dict[str, Any]:
    """``data`` with the key names of older files replaced by today's."""
    return {OLD_KEYS.get(str(key), str(key)): value for key, value in data.items()}


def read_summary(path: str | Path) -> RunSummary:
    """The :class:`RunSummary` of a summary.json; ValueError (one line, naming the file) when it is damaged or
    not a run summary (FileNotFoundError when there is none)."""
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "python certify.py with the run's command rebuilds it from the per-image file"
        ) from None
    return RunSummary.from_json(data, str(path))
