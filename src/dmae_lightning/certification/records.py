"""Per-image result records and the crash-safe files that hold them (shards, merged TSV, JSON).

Every procedure writes one TSV line per image (``certify.tsv``, ``predict.tsv``, ...); a record type is a
frozen dataclass whose fields are the columns, in order. ``certify.tsv`` keeps the leading columns of
Cohen et al.'s format (idx, label, predict, radius, correct) and adds n_a and n (the Monte Carlo counts)
before the time in seconds. Floats are written with ``repr`` so they read back bit for bit: a radius
rounded for display (0.49996 -> 0.5) would wrongly count as certified at r = 0.5. ``None`` is written
``none``.

Shards are written line by line (a killed job loses at most the line in flight; that partial line is cut off
on reopen and ignored on read, never parsed as a record) and fsynced in groups (a crash of the machine loses at
most the last group: :class:`ShardWriter`).
This module imports no torch, so the analysis CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from dmae_lightning.files import atomic_write_text, fsync_dir

ABSTAIN = -1  # the ``predict`` value of an abstention


def _format(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):  # a list-valued column (one value per radius): comma-separated
        return ",".join(_format(v) for v in value)
    return repr(float(value)) if isinstance(value, float) else str(value)


def _optional_float(text: str) -> float | None:
    return None if text == "none" else float(text)


# Column parsers by the field annotation (the annotations are strings: ``from __future__ import annotations``).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "float | None": _optional_float,
    "tuple[float, ...]": lambda text: tuple(map(float, text.split(","))),
    "tuple[int, ...]": lambda text: tuple(map(int, text.split(","))),
}


R = TypeVar("R", bound="Record")


@dataclass(frozen=True)
class Record:
    """Base of the record types: ``idx`` (index in the data split) first, ``time`` (seconds) last.

    Every record type has the columns ``idx`` and ``label`` first (declared here; a subclass may repeat
    them, which keeps their place), a ``predict`` (a column, or derived from the others) and ``time`` as
    its last column. The other columns differ: ``radius`` and ``n`` are :class:`CertifyRecord`'s and
    :class:`RadiiRecord`'s only, ``correct`` :class:`CertifyRecord`'s and :class:`PredictRecord`'s; code
    that reads them narrows a list of records with :func:`of_type` first.
    """

    idx: int
    label: int

    if TYPE_CHECKING:  # columns of every subclass that cannot be fields here: fields keep the base's order

        @property
        def predict(self) -> int:
            """The predicted class, or ABSTAIN."""
            ...

        @property
        def time(self) -> float:
            """Seconds spent on the image (the last column)."""
            ...

    def to_line(self) -> str:
        """One TSV line (no newline)."""
        return "\t".join(_format(getattr(self, name)) for name in self.columns())

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def header(cls) -> str:
        return "\t".join(cls.columns())

    @classmethod
    def from_line(cls, line: str, where: str = "<line>") -> Record:
        """Inverse of :meth:`to_line`; ``where`` names the line in error messages."""
        fields = dataclasses.fields(cls)
        values = line.split("\t")
        if len(values) != len(fields):
            raise ValueError(
                f"{where}: expected {len(fields)} tab-separated fields, got {len(values)}: {line!r}"
            )
        try:
            return cls(*(_PARSERS[str(f.type)](v) for f, v in zip(fields, values)))
        except ValueError as err:
            raise ValueError(f"{where}: malformed record {line!r} ({err})") from None

    @property
    def certified_correct_radius(self) -> float | None:
        """The radius at which this image is certified correctly classified, None if it is not."""
        return None

    def timed(self: R, seconds: float) -> R:
        """This record with its ``time`` column (the last, on every record type) set to ``seconds``."""
        changes: dict[str, Any] = {"time": seconds}  # a column of the subclasses: not a field of this base
        return dataclasses.replace(self, **changes)

    def result(self) -> tuple:
        """The record's type and columns without ``time`` (a measurement, not a result): equal for two
        records of the same image exactly when they report the same result."""
        return (type(self), *(getattr(self, name) for name in self.columns() if name != "time"))


@dataclass(frozen=True)
class CertifyRecord(Record):
    """CERTIFY of one image: a line of ``certify.tsv``."""

    idx: int
    label: int
    predict: int  # certified class cA, or ABSTAIN (the guess is kept after a skipped wrong guess)
    radius: float  # certified L2 radius in [0,1] pixel space; 0.0 when abstaining or skipped
    correct: int  # 1 when predict == label
    n_a: int  # estimation draws that returned the guessed class
    n: int  # estimation draws made (0 when skipped after a wrong guess)
    time: float  # seconds from the image's first to its last forward batch

    @property
    def certified_correct_radius(self) -> float | None:
        return self.radius if self.correct == 1 else None


@dataclass(frozen=True)
class PredictRecord(Record):
    """PREDICT of one image: a line of ``predict.tsv``."""

    idx: int
    label: int
    predict: int  # top class, or ABSTAIN
    correct: int
    time: float


@dataclass(frozen=True)
class RadiiRecord(Record):
    """Sequential certification of one image at a fixed grid of radii: a line of ``certify_radii.tsv``."""

    idx: int
    label: int
    radius: float | None  # the largest grid radius certified for the label, none when no radius is
    n: int  # noisy samples used (at most the cap)
    lower: float  # final (running) confidence bounds on P(f(x + eps) = label)
    upper: float
    time: float

    @property
    def certified_correct_radius(self) -> float | None:
        return self.radius

    @property
    def predict(self) -> int:  # the label when certified at some radius, else no claim (ABSTAIN)
        return self.label if self.radius is not None else ABSTAIN


@dataclass(frozen=True)
class AttackRecord(Record):
    """PREDICT of one image after an L2 attack at each radius of a grid: a line of ``attack.tsv``.

    The list-valued columns hold one comma-separated value per radius, in the order of ``radii``
    (``0.25,0.5``; ``3,-1``; ``0,0``). It certifies nothing (no ``certified_correct_radius``).
    """

    idx: int
    label: int
    radii: tuple[float, ...]  # the attack's radii eps, increasing
    predictions: tuple[int, ...]  # PREDICT of the smoothed classifier on the adversarial image, or ABSTAIN
    correct: tuple[int, ...]  # 1 where that prediction is the label (an abstention is not correct)
    time: float

    def __post_init__(self):
        if not len(self.radii) == len(self.predictions) == len(self.correct):
            raise ValueError(
                f"idx {self.idx}: {len(self.radii)} radii, {len(self.predictions)} predictions, "
                f"{len(self.correct)} correct values"
            )

    @property
    def predict(self) -> int:  # at the smallest radius: the clean image's PREDICT when the grid starts at 0
        return self.predictions[0]


def of_type(records: Iterable[Record], record_type: type[R]) -> list[R]:
    """``records`` as a list of ``record_type``'s; a TypeError names the first record of another type
    (e.g. a procedure handed another procedure's records)."""
    checked = []
    for record in records:
        if not isinstance(record, record_type):
            raise TypeError(
                f"expected {record_type.__name__} records, got a {type(record).__name__}: {record}"
            )
        checked.append(record)
    return checked


def read_records(path: str | os.PathLike, record_type: type[Record]) -> list[Record]:
    """All complete records of a TSV file, in file order; a partial last line is ignored."""
    return _parse_complete_lines(Path(path).read_text(encoding="utf-8"), str(path), record_type)


def _parse_complete_lines(text: str, source: str, record_type: type[Record]) -> list[Record]:
    lines = text.split("\n")[:-1]  # the last piece is "" or a partial line
    if not lines:
        return []
    if lines[0] != record_type.header():
        raise ValueError(
            f"{source}: not a {record_type.__name__} TSV (first line {lines[0]!r}, expected {record_type.header()!r})"
        )
    return [record_type.from_line(line, f"{source}:{i}") for i, line in enumerate(lines[1:], start=2)]


def write_json(path: str | os.PathLike, data: dict) -> None:
    """JSON written atomically; paths and other non-JSON values are stored as strings."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class ShardWriter:
    """Append-only, crash-safe writer of one shard's TSV.

    Opening an existing shard keeps its complete records (``existing``) and truncates a trailing
    partial line; a new file gets the header. Use as a context manager or call :meth:`close`.

    Every record is handed to the operating system when :meth:`write` returns (a write, no fsync), so a killed
    process (SIGKILL, out of memory) loses none of them; the fsyncs that make them survive a crash of the machine
    are grouped: one after every ``fsync_every`` records (k, default :data:`FSYNC_EVERY`) or on the first write
    ``fsync_after_s`` seconds (t, default :data:`FSYNC_AFTER_S`) after the previous fsync, whichever comes first,
    and always at :meth:`close` (the end, the SIGTERM stop, ``__exit__`` on an exception) and at interpreter exit
    for a writer never closed. A crash of the machine loses at most the records since the last fsync: the last
    group, fewer than k. ``fsync_every=1`` fsyncs every record.
    """

    FSYNC_EVERY = 32
    FSYNC_AFTER_S = 5.0

    def __init__(
        self,
        path: str | os.PathLike,
        record_type: type[Record],
        fsync_every: int = FSYNC_EVERY,
        fsync_after_s: float = FSYNC_AFTER_S,
    ):
        if fsync_every < 1 or not fsync_after_s >= 0:
            raise ValueError(
                f"fsync_every must be >= 1 and fsync_after_s >= 0, got {fsync_every}, {fsync_after_s}"
            )
        self.path = Path(path)
        self.record_type = record_type
        self.fsync_every, self.fsync_after_s = fsync_every, fsync_after_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # kept open across writes; closed in close()
        # close() runs it; so does the garbage collector or interpreter exit for a writer an exception skipped
        self._finalizer = weakref.finalize(self, _sync_and_close, self._file)
        self._unsynced = 0  # records written since the last fsync
        self._synced_at = time.monotonic()
        try:
            self.existing = self._recover()
        except BaseException:
            self._finalizer.detach()
            self._file.close()
            raise

    def _recover(self) -> list[Record]:
        self._file.seek(0)
        data = self._file.read()
        keep = data.rfind(b"\n") + 1  # length up to the end of the last complete line (0 if none)
        if keep < len(data):
            self._file.truncate(keep)
        if keep == 0:
            self._write_line(self.record_type.header())
            self.sync()
            fsync_dir(self.path.parent)
            return []
        return _parse_complete_lines(data[:keep].decode("utf-8"), str(self.path), self.record_type)

    def _write_line(self, line: str) -> None:
        self._file.write(line.encode("utf-8") + b"\n")
        self._file.flush()  # to the operating system: a killed process loses nothing written

    def sync(self) -> None:
        """fsync now: every record written so far survives a crash of the machine."""
        os.fsync(self._file.fileno())
        self._unsynced, self._synced_at = 0, time.monotonic()

    def write(self, record: Record) -> None:
        """Append one record: written when this returns, on disk at the next fsync of its group (see the class)."""
        self._write_line(record.to_line())
        self._unsynced += 1
        if self._unsynced >= self.fsync_every or time.monotonic() - self._synced_at >= self.fsync_after_s:
            self.sync()

    def close(self) -> None:
        """fsync the last group and close (once; later calls do nothing)."""
        self._finalizer()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _sync_and_close(file: BinaryIO) -> None:
    """ShardWriter's finaliser: fsync what was written, then close (a closed file is left alone)."""
    if file.closed:
        return
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()


def one_per_idx(records: Iterable[tuple[Record, object]]) -> list[Record]:
    """One record per idx, sorted by idx, from (record, where it came from) pairs.

    The same image may appear twice; that is fine when the results agree, the time column aside (a
    measurement, not a result). Disagreeing results mean two different runs were mixed: they raise.
    """
    merged: dict[int, tuple[Record, object]] = {}
    for record, source in records:
        first, first_source = merged.setdefault(record.idx, (record, source))
        if first.result() != record.result():
            raise ValueError(
                f"conflicting records for idx {record.idx}: {first} in {first_source} vs {record} in {source}"
            )
    return [merged[idx][0] for idx in sorted(merged)]


def merge_files(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike, record_type: type[Record]):
    """Union of the files' records and those already in ``out_path`` (see :func:`one_per_idx`), written
    to ``out_path`` atomically; the merged records are returned."""
    out_path = Path(out_path)
    sources = [Path(p) for p in paths]
    if out_path.exists() and out_path not in sources:
        sources.append(out_path)
    records = one_per_idx((r, source) for source in sources for r in read_records(source, record_type))
    lines = [record_type.header(), *(r.to_line() for r in records)]
    atomic_write_text(out_path, "".join(f"{line}\n" for line in lines))
    return records
