"""Published per-image logs in our tables (issue 25.1): certified accuracy counted by hand, our data-set-level
bound and ACR on them, a row of the table of our runs with the same protocol but never in its envelope, and a
table of their own when the protocol differs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.rundirs import make_run

from dmae_lightning.certification.audit import PublishedRecord, read_result_file
from dmae_lightning.certification.metrics import certified_accuracy_lower_bound
from dmae_lightning.certification.records import CertifyRecord, ShardWriter
from dmae_lightning.jobs.analyze import main

RADII = (0.0, 0.25, 0.5, 0.75)
PROTOCOL = {
    "label": "Cohen et al. 2019, ResNet-110",
    "noise": "gaussian",
    "sigma": 0.25,
    "n0": 100,
    "n": 100000,
    "alpha": 0.001,
    "dataset": "cifar10",
    "split": "test",
    "skip": 20,
}
# the subset our certify job records for skip=20 on CIFAR-10's test split (10,000 images)
OUR_SUBSET = {"skip": 20, "max": None, "num_images": None, "indices": "range(0, 10000, 20)[:None]"}
OUR_SETTINGS = dict(n=100000, subset=OUR_SUBSET, data_subset={"subset_every": None, "subset_first": None})


def log_rows(count: int, seed: int = 0):
    """(idx, label, predict, radius, correct): a spread of radii below the top 0.953, abstentions, wrong ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label, kind = int(rng.integers(10)), rng.random()
        if kind < 0.15:
            rows.append((20 * i, label, -1, 0.0, 0))
        elif kind < 0.3:
            rows.append((20 * i, label, (label + 3) % 10, float(rng.uniform(0, 0.9)), 0))
        else:
            rows.append((20 * i, label, label, float(rng.uniform(0, 0.95)), 1))
    return rows


def write_log(path, rows, protocol=None, timedelta=False, final_newline=True):
    """A CERTIFY log as locuslab/smoothing writes it (radius '{:.3}', time in seconds), or as
    Hadisalman/smoothing-adversarial's copies hold it (time as a timedelta), with a sidecar protocol."""
    time = "0:00:15.393619" if timedelta else "15.4"
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t{y}\t{c}\t{r:.3}\t{ok}\t{time}" for i, y, c, r, ok in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    if protocol is not None:
        path.with_name(path.name + ".yaml").write_text("".join(f"{k}: {v}\n" for k, v in protocol.items()))
    return path


def tables(out) -> list[str]:
    return (out / "analysis.md").read_text().split("### ")[1:]


def row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


LABEL = "Cohen et al. 2019, ResNet-110, sigma=0.25 (published)"


def test_certified_accuracy_of_a_published_log_is_counted_by_hand(tmp_path):
    log = write_log(tmp_path / "sigma_0.25", log_rows(200), PROTOCOL)
    out = tmp_path / "report"
    assert main([str(log), "--radii", *map(str, RADII), "--out", str(out)]) == 0
    (table,) = tables(out)
    # by hand, from the file's own text: correct and radius >= r
    cells = [line.split("\t") for line in log.read_text().splitlines()[1:]]
    printed = [(int(c[4]), float(c[3])) for c in cells]
    by_hand = [100 * sum(ok == 1 and r >= radius for ok, r in printed) / len(printed) for radius in RADII]
    acr = sum(r for ok, r in printed if ok == 1) / len(printed)
    assert row(table, LABEL) == [*(f"{v:.1f}" for v in by_hand), f"{acr:.3f}"]
    # our data-set-level bound, computed on the records read back
    records = read_result_file(log).records
    assert all(isinstance(r, PublishedRecord) for r in records)
    bound = certified_accuracy_lower_bound(records, RADII, alpha=0.001)
    assert row(table, f"{LABEL} lower bound") == [*(f"{100 * v:.1f}" for v in bound.values()), ""]
    assert "best" not in table and "model_name=published" not in table  # the only group: no varying key


def test_a_published_log_joins_our_table_with_its_protocol_but_not_the_envelope(tmp_path):
    """Our two runs at sigma 0.25 and 0.5 on the same 500 images, n and alpha: the published row sits in their
    table, and the best-over-sigma row stays theirs although the published one is higher."""
    ours = [
        make_run(tmp_path / "s025", 0.25, [(0.1, 1), (0.3, 1), (0.0, 0), (0.0, 0)], **OUR_SETTINGS),
        make_run(tmp_path / "s050", 0.5, [(0.2, 1), (0.6, 1), (0.0, 0), (0.0, 0)], **OUR_SETTINGS),
    ]
    log = write_log(tmp_path / "published" / "sigma_0.25", [(0, 1, 1, 0.9, 1), (20, 2, 2, 0.8, 1)], PROTOCOL)
    out = tmp_path / "report"
    assert main([*map(str, ours), str(log), "--radii", "0", "0.5", "--out", str(out)]) == 0
    (table,) = tables(out)
    assert row(table, "best") == ["50.0", "25.0", ""]  # ours only: 50 / 25 at r = 0, 0.5
    assert row(table, LABEL) == ["100.0", "100.0", "0.850"]
    # our bound over its own 2 images: k* = 1 allowed false certificate, (2 - 1) / 2
    assert row(table, f"{LABEL} lower bound") == ["50.0", "50.0", ""]
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][2:]
    assert labels.index("best") < labels.index(LABEL)  # after the envelope, not in it
    assert (out / "analysis.png").is_file()


@pytest.mark.parametrize("change", [{"alpha": 0.01}, {"n": 10000}, {"skip": 10}, {"noise": "discrete"}])
def test_a_protocol_mismatch_gives_separate_tables(tmp_path, change):
    ours = make_run(tmp_path / "s025", 0.25, [(0.1, 1), (0.3, 1)], **OUR_SETTINGS)
    log = write_log(tmp_path / "published" / "log", [(0, 1, 1, 0.5, 1)], {**PROTOCOL, **change})
    out = tmp_path / "report"
    assert main([str(ours), str(log), "--radii", "0", "0.5", "--out", str(out)]) == 0
    mine, theirs = sorted(tables(out), key=lambda table: "published" in table)
    assert "(published)" not in mine and "| 0.25 | 100.0 | 0.0 | 0.200 |" in mine
    assert "model_name=published" in theirs.split(":")[0] and row(theirs, LABEL)[:2] == ["100.0", "100.0"]
    assert {p.name for p in out.glob("*.png")} == {"analysis_1.png", "analysis_2.png"}


def test_evenly_spaced_images_and_skip_are_one_subset(tmp_path):
    """num_images: 500 of CIFAR-10's test split are every 20th image: the same images as our skip=20 run."""
    ours = make_run(tmp_path / "s025", 0.25, [(0.1, 1), (0.3, 1)], **OUR_SETTINGS)
    protocol = {key: value for key, value in PROTOCOL.items() if key != "skip"}
    log = write_log(tmp_path / "log", [(0, 1, 1, 0.5, 1)], {**protocol, "num_images": 500})
    assert main([str(ours), str(log), "--radii", "0", "--out", str(tmp_path / "report")]) == 0
    (table,) = tables(tmp_path / "report")
    assert row(table, LABEL) == ["100.0", "0.500"]


def test_protocol_on_the_command_line_and_a_log_without_one(tmp_path, capsys):
    protocol = tmp_path / "cohen.yaml"
    protocol.write_text("".join(f"{k}: {v}\n" for k, v in PROTOCOL.items()))
    log = write_log(tmp_path / "a" / "sigma_0.25", log_rows(20))
    bare = write_log(tmp_path / "b" / "sigma_0.25", log_rows(20))
    assert main([str(log), "--protocol", str(protocol), "--out", str(tmp_path / "r1")]) == 0
    assert LABEL in (tmp_path / "r1" / "analysis.md").read_text()
    assert main([str(bare), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert (
        f"analyze: skipping {bare}: a result file without a protocol (write sigma_0.25.yaml next to it" in err
    )


def test_smoothing_adversarial_copies_and_our_older_certify_tsv(tmp_path):
    """Timedelta times and no newline at the end (Hadisalman/smoothing-adversarial's copies of Cohen's logs), and a
    certify.tsv of ours whose summary.json is gone: both read, both tabulated with their protocol."""
    rows = log_rows(30)
    theirs = write_log(
        tmp_path / "salman" / "sigma_0.25", rows, PROTOCOL, timedelta=True, final_newline=False
    )
    records = read_result_file(theirs).records
    assert len(records) == 30 and records[0].time == pytest.approx(15.393619)  # type: ignore[attr-defined]
    old = tmp_path / "old" / "certify.tsv"
    with ShardWriter(old, CertifyRecord) as writer:
        for i, y, c, r, ok in rows:
            writer.write(CertifyRecord(i, y, c, r, ok, 0, 100000, 1.0))
    old.with_name("certify.tsv.yaml").write_text(
        "".join(f"{k}: {v}\n" for k, v in {**PROTOCOL, "label": "our older run"}.items())
    )
    out = tmp_path / "report"
    assert main([str(theirs), str(old), "--radii", "0", "0.25", "--out", str(out)]) == 0
    (table,) = tables(out)
    assert row(table, LABEL)[:2] == row(table, "our older run, sigma=0.25 (published)")[:2]
