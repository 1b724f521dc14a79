"""Bad input, said in one line: the exception both jobs raise and the entry points print.

Kept apart from the jobs so that any module (data, checkpoints, certification) can raise it without
importing the training job.
"""

from __future__ import annotations

import re

from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import MissingMandatoryValue
from omegaconf.errors import InterpolationResolutionError


class ConfigError(ValueError):
    """Bad input found before any expensive work: the entry points print it as one line."""


# Errors that mean "bad config, data or checkpoint" when raised while a job is being built (Lightning's
# MisconfigurationException: e.g. hardware=gpu on a machine without one).
BAD_INPUT = (
    ValueError,
    FileNotFoundError,
    MissingMandatoryValue,
    InterpolationResolutionError,
    MisconfigurationException,
)


def one_line(err: BaseException) -> str:
    """The first line of an error's message (a resolver's own message for a failed interpolation)."""
    if isinstance(err, InterpolationResolutionError) and err.__cause__ is not None:
        err = err.__cause__  # a resolver's own message, e.g. ${require:pretrained}
    text = str(err).strip().splitlines()
    # OmegaConf may drop the cause and prefix its type: "ValueError raised while resolving interpolation: ..."
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", text[0]) if text else type(err).__name__
