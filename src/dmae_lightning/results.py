"""Certification results: per-image ``certify.tsv``, ``summary.json``, certified-accuracy tables and plots.

``certify.tsv`` keeps the leading columns of Cohen et al.'s format (idx, label, predict, radius,
correct) and adds n_a and n (the Monte Carlo counts) before the time in seconds. Floats are
written with ``repr`` so they read back bit for bit: a radius rounded for display (0.49996 -> 0.5)
would wrongly count as certified at r = 0.5.

Shards are written line by line with fsync, so a crashed job loses at most the line in flight;
that partial line is cut off on reopen and ignored on read, never parsed as a record.
This module imports no torch, so the analysis CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ABSTAIN = -1  # the ``predict`` value of an abstention (also ``Smooth.ABSTAIN``)

COLUMNS = ("idx", "label", "predict", "radius", "correct", "n_a", "n", "time")
HEADER = "\t".join(COLUMNS)

IMAGENET_RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
CIFAR10_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)

# Keys write_summary requires, so every run directory can be analysed and traced to its checkpoint.
SUMMARY_KEYS = (
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "precision",
    "checkpoint",
    "checkpoint_sha256",
    "dataset",
    "subset",
    "num_images",
    "certified_accuracy",
    "average_certified_radius",
    "abstain_rate",
    "wall_time_s",
    "skip_wrong_guess",
)


def default_radii(dataset: str) -> tuple[float, ...]:
    """The paper's radii: ImageNet's for imagenet, CIFAR-10's for every other (32x32) data set."""
    return IMAGENET_RADII if "imagenet" in str(dataset).lower() else CIFAR10_RADII


@dataclass(frozen=True)
class Record:
    """One certified image: a line of ``certify.tsv``."""

    idx: int  # index of the image in the dataset split
    label: int
    predict: int  # certified class, or ABSTAIN
    radius: float  # L2 radius in [0,1] pixel space; 0.0 when abstaining
    correct: int  # 1 when predict == label
    n_a: int  # estimation draws that returned the guessed class
    n: int  # estimation draws made (0 when skipped after a wrong guess)
    time: float  # seconds spent on this image


def format_record(record: Record) -> str:
    """One TSV line (no newline); floats via repr so they round-trip exactly."""
    r = record
    fields = (r.idx, r.label, r.predict, repr(float(r.radius)), r.correct, r.n_a, r.n, repr(float(r.time)))
    return "\t".join(str(f) for f in fields)


def parse_record(line: str, where: str = "<line>") -> Record:
    """Inverse of :func:`format_record`; ``where`` names the line in error messages."""
    fields = line.split("\t")
    if len(fields) != len(COLUMNS):
        raise ValueError(
            f"{where}: expected {len(COLUMNS)} tab-separated fields, got {len(fields)}: {line!r}"
        )
    try:
        idx, label, predict, radius, correct, n_a, n, time = fields
        return Record(
            int(idx), int(label), int(predict), float(radius), int(correct), int(n_a), int(n), float(time)
        )
    except ValueError as err:
        raise ValueError(f"{where}: malformed record {line!r} ({err})") from None


def _parse_complete_lines(text: str, source: str) -> list[Record]:
    """Records of a TSV text; anything after the last newline is a crash leftover and is ignored."""
    lines = text.split("\n")[:-1]  # the last piece is "" or a partial line
    if not lines:
        return []
    if lines[0] != HEADER:
        raise ValueError(f"{source}: not a certification TSV (first line {lines[0]!r}, expected {HEADER!r})")
    return [parse_record(line, f"{source}:{i}") for i, line in enumerate(lines[1:], start=2)]


def read_records(path: str | os.PathLike) -> list[Record]:
    """All complete records of a TSV file, in file order; a partial last line is ignored."""
    return _parse_complete_lines(Path(path).read_text(encoding="utf-8"), str(path))


def _fsync_dir(directory: Path) -> None:
    """Make a file creation or rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the complete new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class ShardWriter:
    """Append-only, crash-safe writer of one shard's TSV.

    Opening an existing shard keeps its complete records (available as ``existing`` so a resumed
    job can skip those images) and truncates a trailing partial line; a new file gets the header.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # kept open across writes; closed in close()
        try:
            self.existing = self._recover()
        except BaseException:
            self._file.close()
            raise

    def _recover(self) -> list[Record]:
        self._file.seek(0)
        data = self._file.read()
        keep = data.rfind(b"\n") + 1  # length up to the end of the last complete line (0 if none)
        if keep < len(data):
            self._file.truncate(keep)
        if keep == 0:
            self._write_line(HEADER)
            _fsync_dir(self.path.parent)
            return []
        return _parse_complete_lines(data[:keep].decode("utf-8"), str(self.path))

    def _write_line(self, line: str) -> None:
        self._file.write(line.encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: Record) -> None:
        """Append one record; it is on disk when this returns."""
        self._write_line(format_record(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def one_per_idx(records: Iterable[tuple[Record, object]]) -> list[Record]:
    """One record per idx, sorted by idx, from (record, where it came from) pairs.

    The same image may appear twice; that is fine when the results agree, the time column aside (a
    measurement, not a result). Disagreeing results mean two different runs were mixed: they raise.
    """
    merged: dict[int, tuple[Record, object]] = {}
    for record, source in records:
        first, first_source = merged.setdefault(record.idx, (record, source))
        if dataclasses.replace(first, time=0.0) != dataclasses.replace(record, time=0.0):
            raise ValueError(
                f"conflicting records for idx {record.idx}: {first} in {first_source} vs {record} in {source}"
            )
    return [merged[idx][0] for idx in sorted(merged)]


def merge_shards(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> list[Record]:
    """Union of the shards' records and those already in ``out_path`` (see :func:`one_per_idx`).

    The output is replaced atomically; the merged records are returned.
    """
    out_path = Path(out_path)
    sources = [Path(p) for p in paths]
    if out_path.exists() and out_path not in sources:
        sources.append(out_path)
    records = one_per_idx((record, source) for source in sources for record in read_records(source))
    atomic_write_text(out_path, "".join(f"{line}\n" for line in [HEADER, *map(format_record, records)]))
    return records


def radius_key(radius: float) -> str:
    """Canonical name of a radius in dicts and JSON: ``f"{r:g}"``, e.g. "0", "0.25", "1" (1 and 1.0 agree)."""
    return f"{float(radius):g}"


def _require_records(records: Iterable[Record]) -> list[Record]:
    records = list(records)
    if not records:
        raise ValueError("no certification records")
    return records


def certified_accuracy(records: Iterable[Record], radii: Iterable[float]) -> dict[str, float]:
    """Fraction of images predicted correctly with radius >= r, keyed by :func:`radius_key`."""
    records = _require_records(records)
    return {
        radius_key(r): sum(rec.correct == 1 and rec.radius >= r for rec in records) / len(records)
        for r in radii
    }


def average_certified_radius(records: Iterable[Record]) -> float:
    """Mean of radius * correct: wrong and abstained images count as radius 0."""
    records = _require_records(records)
    return sum(rec.radius * (rec.correct == 1) for rec in records) / len(records)


def abstain_rate(records: Iterable[Record]) -> float:
    records = _require_records(records)
    return sum(rec.predict == ABSTAIN for rec in records) / len(records)


def summary_metrics(records: Iterable[Record], radii: Iterable[float]) -> dict:
    """The result fields of summary.json computed from the records."""
    records = _require_records(records)
    return {
        "num_images": len(records),
        "certified_accuracy": certified_accuracy(records, radii),
        "average_certified_radius": average_certified_radius(records),
        "abstain_rate": abstain_rate(records),
    }


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file (the checkpoint), read in chunks so multi-GB files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_summary(path: str | os.PathLike, **fields) -> None:
    """Write summary.json atomically; all of SUMMARY_KEYS are required, extra fields are kept.

    Paths and other non-JSON values are stored as strings.
    """
    missing = [key for key in SUMMARY_KEYS if key not in fields]
    if missing:
        raise ValueError(f"summary is missing fields: {', '.join(missing)}")
    atomic_write_text(Path(path), json.dumps(fields, indent=2, default=str) + "\n")


def read_summary(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def best_over_sigma(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Envelope of several certified-accuracy dicts: the best value per radius, as papers report it."""
    first, *_ = rows.values()
    return {key: max(row[key] for row in rows.values()) for key in first}


def plot_certified_accuracy(
    curves: Mapping[str, Sequence[Record]], out_png: str | os.PathLike, envelope: bool = True
) -> None:
    """Certified accuracy vs radius, one curve per label, plus the best-over-sigma envelope if several."""
    # Imported here: matplotlib is slow to import and only this function needs it.
    import numpy as np
    from matplotlib.figure import Figure  # draws with the Agg canvas, leaves the pyplot backend alone

    # Radii of the correctly certified images, sorted, per curve.
    certified = {label: np.sort([r.radius for r in recs if r.correct == 1]) for label, recs in curves.items()}
    largest = max((radii[-1] for radii in certified.values() if len(radii)), default=0.0)
    grid = np.linspace(0.0, max(largest * 1.05, 0.25), 1000)  # [G]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    accuracies = []
    for label, radii in certified.items():
        # images with radius >= r, for every grid point r
        acc = (len(radii) - np.searchsorted(radii, grid, side="left")) / len(curves[label])  # [G]
        accuracies.append(acc)
        ax.plot(grid, acc, label=label)
    if envelope and len(curves) > 1:
        ax.plot(grid, np.max(accuracies, axis=0), "k--", label="best over sigma")
    ax.set_xlabel("L2 radius ([0,1] pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(0.0, grid[-1])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=150)


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    radii: Iterable[float],
    fmt: str = "markdown",
    label_header: str = "sigma",
) -> str:
    """Certified-accuracy table, a row per label, a column per radius; fractions printed in % (1 decimal)."""
    keys = [radius_key(r) for r in radii]
    body = [[label, *(f"{100 * row[key]:.1f}" for key in keys)] for label, row in rows.items()]
    if fmt == "markdown":
        lines = [[label_header, *(f"r={key}" for key in keys)], ["---", *("---:" for _ in keys)], *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    if fmt == "latex":
        header = [_latex_escape(label_header), *(f"$r={key}$" for key in keys)]
        lines = [
            "\\begin{tabular}{l" + "r" * len(keys) + "}",
            "\\toprule",
            " & ".join(header) + " \\\\",
            "\\midrule",
            *(" & ".join([_latex_escape(cells[0]), *cells[1:]]) + " \\\\" for cells in body),
            "\\bottomrule",
            "\\end{tabular}",
        ]
        return "\n".join(lines)
    raise ValueError(f"unknown table format {fmt!r}, expected 'markdown' or 'latex'")
