"""A certification run directory: rank shards, the merged results file, and the params file that
keeps a resume from mixing two runs.

Rank R appends to ``<mode>.rank{R}.tsv``; rank 0 folds the shards (and a previous ``<mode>.tsv``) into
``<mode>.tsv`` ordered by idx and deletes the shards. ``<mode>.params.json`` records what the results
depend on; a later run into the same directory with other settings is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dmae_lightning.certification.records import (
    Record,
    atomic_write_text,
    merge_files,
    one_per_idx,
    read_records,
)
from dmae_lightning.jobs.rundir import read_record, refuse_other_settings


def shard_paths(run_dir: Path, mode: str) -> list[Path]:
    """Shards of every rank of every session so far (the world size may have changed between them)."""
    pattern = re.compile(rf"{re.escape(mode)}\.rank(\d+)\.tsv")
    found = [
        (int(m.group(1)), p) for p in run_dir.glob(f"{mode}.rank*.tsv") if (m := pattern.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def results_path(run_dir: Path, mode: str) -> Path:
    return run_dir / f"{mode}.tsv"


def done_records(run_dir: Path, mode: str, record_type: type[Record]) -> list[Record]:
    """One record per image already on disk (merged file and all shards), ordered by idx."""
    sources = [results_path(run_dir, mode), *shard_paths(run_dir, mode)]
    return one_per_idx(
        (r, path) for path in sources if path.is_file() for r in read_records(path, record_type)
    )


def merge_results(run_dir: Path, mode: str, record_type: type[Record]) -> list[Record]:
    """Fold the shards into ``<mode>.tsv`` (ordered by idx, one line per image), then delete the shards."""
    shards = shard_paths(run_dir, mode)
    records = merge_files(shards, results_path(run_dir, mode), record_type)
    for shard in shards:  # only now: the merged file is on disk
        shard.unlink()
    return records


def _params_path(run_dir: Path, mode: str) -> Path:
    return run_dir / f"{mode}.params.json"


def check_params(run_dir: Path, key: dict, mode: str) -> None:
    """Refuse to resume into a directory whose results came from other settings (reads only)."""
    previous = read_record(
        _params_path(run_dir, mode),
        f"it says which settings the results in {run_dir} came from, so they cannot be resumed safely; restore "
        "it, or choose another run_name (or hydra.run.dir) for a new run",
    )
    if previous is not None:
        refuse_other_settings(run_dir, previous, key)


def record_params(run_dir: Path, key: dict, mode: str) -> None:
    """Write ``<mode>.params.json`` once, before the first result (rank 0)."""
    path = _params_path(run_dir, mode)
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(key, indent=2) + "\n")
