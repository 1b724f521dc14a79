"""The data errors: missing, damaged or undecodable files, each one line (also when raised in a DataLoader
worker). Imports: PIL and :mod:`dmae_lightning.errors` only."""

from __future__ import annotations

import os
import re

from PIL import Image

from dmae_lightning.errors import ConfigError, one_line


def _raised_in_worker(text: str, error_type: type) -> str:
    """The message a DataLoader worker raised, out of PyTorch's re-raise of it; other texts as they are.

    A worker's exception does not travel itself: the main process gets its type and its formatted traceback,
    and raises ``error_type("Caught <type> in DataLoader worker process <n>.\nOriginal Traceback (most recent
    call last):\n ... \n<module>.<type>: <message>\n")`` (torch.utils._utils.ExceptionWrapper.reraise). The
    last line that starts with the type's qualified name holds the message (ours are one line).
    """
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    prefix = f"{error_type.__module__}.{error_type.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return text


class DataError(ConfigError):
    """Missing, damaged or unreadable data files: one line, which the entry points print wherever it is raised.

    Raised in a DataLoader worker, it reaches the main process as PyTorch rebuilds it there, from its type and
    the worker's traceback: the constructor keeps the one line of the original (``_raised_in_worker``), so a
    training job still prints ``error: <message>`` and not the worker's traceback.
    """

    def __init__(self, message: str):
        super().__init__(_raised_in_worker(message, type(self)))


class BrokenImageError(DataError):
    """An image file that cannot be decoded, raised by the dataset when item ``index`` is read.

    Raised per item, not when the folder is scanned (decoding a million JPEGs up front would take hours),
    so a job meets it at that image; ``path`` and ``index`` let the caller record the image as failed.
    ``BrokenImageError(text)`` alone is PyTorch rebuilding one raised in a DataLoader worker (see DataError):
    the fields are read back from the message.
    """

    _MESSAGE = re.compile(r"image (-?\d+) \((.*?)\) cannot be decoded: (.*)", re.DOTALL)

    def __init__(self, path: str, index: int | None = None, reason: str | None = None):
        self.path: str | None = path  # None: rebuilt from a message that does not name the image
        if index is None:  # rebuilt from a worker's message
            message = _raised_in_worker(path, type(self))
            match = self._MESSAGE.fullmatch(message)
            self.path, index, reason = (match[2], int(match[1]), match[3]) if match else (None, None, message)
        else:
            message = f"image {index} ({path}) cannot be decoded: {reason}"
        super().__init__(message)
        self.index, self.reason = index, reason

    def __reduce__(self):  # pickled with its three fields (the default would call it with the message alone)
        fields = (self.path, self.index, self.reason) if self.index is not None else (str(self),)
        return type(self), fields


# PIL: truncated or unidentified files (OSError), bad headers (SyntaxError), images over its pixel limit
# (DecompressionBombError; the warning between 1x and 2x the limit too, where warnings are errors);
# RuntimeError: torchvision's JPEG decoder (the tensor pipeline).
UNDECODABLE = (
    OSError,
    SyntaxError,
    RuntimeError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def _why_undecodable(path: str, err: BaseException) -> str:
    """One line on why ``path`` cannot be decoded (PIL says "cannot identify image file" of an empty file)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass  # gone since the folder was scanned: the error says so
    return one_line(err)
