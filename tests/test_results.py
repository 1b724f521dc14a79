"""Record files (round trip, crash safety, shard merging), metrics by hand, JSON, tables, plot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from scipy.stats import beta, norm

from dmae_lightning.certification.metrics import (
    CIFAR10_RADII,
    IMAGENET_RADII,
    abstain_rate,
    average_certified_radius,
    best_over_sigma,
    certified_accuracy,
    max_certifiable_radius,
    radius_key,
    within_reach,
)
from dmae_lightning.certification.records import (
    ABSTAIN,
    CertifyRecord,
    PredictRecord,
    ShardWriter,
    merge_files,
    read_json,
    write_json,
)
from dmae_lightning.certification.records import read_records as read_any
from dmae_lightning.certification.report import BEYOND, format_table, plot_certified_accuracy
from dmae_lightning.jobs.rundir import file_digest
from dmae_lightning.noise import GaussianNoise

HEADER = CertifyRecord.header()


def read_records(path):
    return read_any(path, CertifyRecord)


def format_record(record):
    return record.to_line()


def parse_record(line, where="<line>"):
    return CertifyRecord.from_line(line, where)


def merge_shards(paths, out):
    return merge_files(paths, out, CertifyRecord)


def rec(idx, radius=0.5, correct=1, predict=None, label=1, n_a=900, n=1000, time=0.5):
    predict = label if predict is None else predict
    return CertifyRecord(idx, label, predict, radius, correct, n_a, n, time)


def test_header_and_paper_radii():
    assert HEADER == "idx\tlabel\tpredict\tradius\tcorrect\tn_a\tn\ttime"
    assert IMAGENET_RADII == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    assert CIFAR10_RADII == (0.0, 0.25, 0.5, 0.75, 1.0)


def test_format_and_parse_keep_full_precision():
    record = CertifyRecord(3, 7, 7, 0.49960000000000004, 1, 9000, 10000, 1.25)
    line = format_record(record)
    assert line == "3\t7\t7\t0.49960000000000004\t1\t9000\t10000\t1.25"
    assert parse_record(line) == record
    tiny = CertifyRecord(4, 0, ABSTAIN, 0.1 + 0.2, 0, 10, 100, 1e-17)
    assert parse_record(format_record(tiny)).radius == 0.30000000000000004
    with pytest.raises(ValueError, match="f.tsv:3: expected 8 tab-separated fields, got 2"):
        parse_record("1\t2", "f.tsv:3")
    with pytest.raises(ValueError, match="malformed record"):
        parse_record("1\t2\t2\tx\t1\t1\t1\t0.1")


def test_writer_round_trip_and_near_threshold_radius(tmp_path):
    path = tmp_path / "sub" / "shard0.tsv"
    records = [
        rec(0, 0.49960000000000004),
        rec(1, 0.5),
        rec(2, 2.0 / 3.0, correct=0, predict=4),
        rec(3, 0.0, 0, ABSTAIN),
    ]
    with ShardWriter(path, CertifyRecord) as writer:
        assert writer.existing == []
        for r in records:
            writer.write(r)
    assert path.read_text().splitlines()[0] == HEADER
    back = read_records(path)
    assert back == records
    assert back[0].radius == 0.49960000000000004
    assert certified_accuracy(back, [0.0, 0.4996, 0.5]) == {"0": 0.5, "0.4996": 0.5, "0.5": 0.25}


def test_partial_trailing_line_is_ignored_then_truncated_on_reopen(tmp_path):
    path = tmp_path / "shard.tsv"
    first = [rec(0), rec(1, 0.75)]
    with ShardWriter(path, CertifyRecord) as writer:
        for r in first:
            writer.write(r)
    with open(path, "ab") as f:  # a crash in the middle of a line
        f.write(b"2\t1\t1\t0.3")
    assert read_records(path) == first

    with ShardWriter(path, CertifyRecord) as writer:
        assert writer.existing == first
        assert path.read_bytes().endswith(b"\t0.5\n")  # the partial line is gone
        writer.write(rec(5, 1.5))
    assert read_records(path) == [*first, rec(5, 1.5)]
    assert "0.3" not in path.read_text()


def test_crash_inside_the_header_and_foreign_files(tmp_path):
    path = tmp_path / "shard.tsv"
    path.write_bytes(b"idx\tla")
    assert read_records(path) == []
    with ShardWriter(path, CertifyRecord) as writer:
        assert writer.existing == []
        writer.write(rec(0))
    assert path.read_text() == HEADER + "\n" + format_record(rec(0)) + "\n"

    other = tmp_path / "other.tsv"
    other.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n")
    with pytest.raises(ValueError, match="not a CertifyRecord TSV"):
        read_records(other)
    with pytest.raises(ValueError, match="not a CertifyRecord TSV"):
        ShardWriter(other, CertifyRecord)


def write_shard(path: Path, records) -> Path:
    with ShardWriter(path, CertifyRecord) as writer:
        for r in records:
            writer.write(r)
    return path


def test_merge_sorts_dedups_and_includes_the_existing_final_file(tmp_path):
    a = write_shard(tmp_path / "a.tsv", [rec(4, 0.4), rec(0, 0.1), rec(2, 0.2)])
    # b holds idx 2 again, re-certified (same result, other time)
    b = write_shard(tmp_path / "b.tsv", [rec(1, 0.11), rec(3, 0.3), rec(2, 0.2, time=9.0)])
    out = tmp_path / "certify.tsv"
    write_shard(out, [rec(0, 0.1), rec(5, 0.5)])  # an earlier merge
    merged = merge_shards([a, b], out)
    assert [r.idx for r in merged] == [0, 1, 2, 3, 4, 5]
    assert [r.radius for r in merged] == [0.1, 0.11, 0.2, 0.3, 0.4, 0.5]
    assert merged[2].time == 0.5  # first occurrence kept
    assert read_records(out) == merged
    assert merge_shards([out], out) == merged  # merging again changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "b.tsv", "certify.tsv"]  # no temp left


def test_merge_refuses_conflicting_results(tmp_path):
    a = write_shard(tmp_path / "a.tsv", [rec(0, 0.1), rec(1, 0.2)])
    b = write_shard(tmp_path / "b.tsv", [rec(1, 0.25)])
    out = tmp_path / "certify.tsv"
    with pytest.raises(ValueError, match="conflicting records for idx 1"):
        merge_shards([a, b], out)
    assert not out.exists()


RECORDS = [
    rec(0, 1.2),  # correct, r = 1.2
    rec(1, 0.5),  # correct, exactly 0.5
    rec(2, 0.3),  # correct, r = 0.3
    rec(3, 0.9, correct=0, predict=2),  # wrong class, never counts
    rec(4, 0.0, correct=0, predict=ABSTAIN),  # abstained
    rec(5, 0.0, correct=0, predict=ABSTAIN),  # abstained
    rec(6, 0.0, correct=0, predict=0, n_a=0, n=0),  # wrong guess, skipped
    rec(7, 0.05),  # correct, small radius
]


def test_metrics_against_a_hand_count():
    acc = certified_accuracy(RECORDS, [0, 0.25, 0.5, 1.0, 2.0])
    assert acc == {"0": 4 / 8, "0.25": 3 / 8, "0.5": 2 / 8, "1": 1 / 8, "2": 0.0}
    assert average_certified_radius(RECORDS) == pytest.approx((1.2 + 0.5 + 0.3 + 0.05) / 8)
    assert abstain_rate(RECORDS) == 2 / 8
    assert [radius_key(r) for r in (0, 0.0, 0.25, 1.0, 1.5, 3)] == ["0", "0", "0.25", "1", "1.5", "3"]
    with pytest.raises(ValueError, match="no certification records"):
        certified_accuracy([], [0.5])


def test_json_and_sha256(tmp_path):
    checkpoint = tmp_path / "ckpt.pth"
    data = bytes(range(256)) * 1000
    checkpoint.write_bytes(data)
    assert file_digest(str(checkpoint)) == "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "summary.json"
    write_json(
        path, {"checkpoint": checkpoint, "certified_accuracy": certified_accuracy(RECORDS, IMAGENET_RADII)}
    )
    summary = read_json(path)
    assert summary == json.loads(path.read_text())
    assert summary["checkpoint"] == str(checkpoint)
    assert summary["certified_accuracy"] == {
        "0": 0.5,
        "0.5": 0.25,
        "1": 0.125,
        "1.5": 0.0,
        "2": 0.0,
        "3": 0.0,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "summary.json"]  # no temp file left


def test_predict_records_and_optional_fields_round_trip(tmp_path):
    record = PredictRecord(5, 3, ABSTAIN, 0, 0.25)
    assert record.to_line() == "5\t3\t-1\t0\t0.25"
    assert PredictRecord.from_line(record.to_line()) == record
    assert PredictRecord.header() == "idx\tlabel\tpredict\tcorrect\ttime"
    assert record.certified_correct_radius is None


@pytest.mark.parametrize("sigma,n,alpha", [(0.25, 1000, 0.001), (0.25, 10_000, 0.001), (0.5, 100_000, 0.001)])
def test_max_certifiable_radius_is_n_out_of_n(sigma, n, alpha):
    # n successes out of n: the Clopper-Pearson bound is the alpha quantile of Beta(n, 1) = alpha^(1/n)
    p_lower = beta.ppf(alpha, n, 1)
    assert max_certifiable_radius(GaussianNoise(sigma), n, alpha) == pytest.approx(
        sigma * norm.ppf(p_lower), rel=1e-9
    )
    assert max_certifiable_radius(GaussianNoise(0.25), 10_000, 0.001) == pytest.approx(
        0.7996, abs=1e-4
    )  # method.md: about 0.80


def test_table_marks_radii_beyond_the_runs_reach():
    row = within_reach({"0": 0.9, "0.5": 0.6, "0.75": 0.0}, 0.6158)
    assert row == {"0": 0.9, "0.5": 0.6, "0.75": None}
    table = format_table({"0.25": row}, [0.0, 0.5, 0.75])
    assert table.splitlines()[2] == f"| 0.25 | 90.0 | 60.0 | {BEYOND} |"
    assert "beyond the largest radius the run can certify" in table
    assert BEYOND not in format_table({"0.25": {"0": 0.9, "0.5": 0.6, "0.75": 0.0}}, [0.0, 0.5, 0.75])
    # the envelope takes the best reachable value; n/c only where no row reaches the radius
    best = best_over_sigma({"0.25": row, "0.5": {"0": 0.8, "0.5": 0.7, "0.75": None}})
    assert best == {"0": 0.9, "0.5": 0.7, "0.75": None}


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "curve.png"
    nothing_certified = [rec(0, 0.0, correct=0, predict=ABSTAIN)]
    plot_certified_accuracy(
        {"sigma=0.25": RECORDS, "sigma=0.5": RECORDS[:4], "sigma=1": nothing_certified}, out
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 1000


ROWS = {
    "0.25": {"0": 0.8, "0.5": 0.6},
    "0.5": {"0": 0.7, "0.5": 0.625},
}


def test_best_over_sigma_and_tables():
    rows = {**ROWS, "best": best_over_sigma(ROWS)}
    assert rows["best"] == {"0": 0.8, "0.5": 0.625}
    assert format_table(rows, [0.0, 0.5]) == (
        "| sigma | r=0 | r=0.5 |\n"
        "| --- | ---: | ---: |\n"
        "| 0.25 | 80.0 | 60.0 |\n"
        "| 0.5 | 70.0 | 62.5 |\n"
        "| best | 80.0 | 62.5 |"
    )
    assert format_table({"model_a": ROWS["0.5"]}, [0.0, 0.5], fmt="latex", label_header="run") == (
        "\\begin{tabular}{lrr}\n"
        "\\toprule\n"
        "run & $r=0$ & $r=0.5$ \\\\\n"
        "\\midrule\n"
        "model\\_a & 70.0 & 62.5 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}"
    )
    with pytest.raises(ValueError, match="unknown table format 'html'"):
        format_table(rows, [0.0], fmt="html")
