"""The newcomer's path end to end, reduced: pre-train -> fine-tune -> certify through train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF, REPO
from omegaconf import OmegaConf

from dmae_lightning.certification import CertifyRecord
from dmae_lightning.certification.records import read_records


def run_quickstart(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",  # the reduced stage lists below would make a long directory name
        'quickstart.pretrain=["experiment=pretrain_digits","trainer.max_epochs=3"]',
        'quickstart.finetune=["experiment=finetune_digits","trainer.max_epochs=6"]',
        "n0=20",
        "n=200",
        "max=60",
        "batch_size=220",  # the certification stage's settings, by their certify.py names
        *extra,
    ]
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
        timeout=600,
    )


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end_and_rerun_skips_finished_stages(tmp_path):
    run = tmp_path / "quickstart"
    proc = run_quickstart(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (
        run / "pretrain" / "checkpoints" / "last.ckpt",
        run / "pretrain" / "pictures" / "reconstruction_final.png",
        run / "finetune" / "checkpoints" / "last.ckpt",
        run / "certify" / "latest" / "certify.tsv",
        run / "certify" / "latest" / "summary.json",
        run / "certify" / "latest" / "certified_accuracy.png",
    ):
        assert path.is_file(), path
    records = read_records(run / "certify" / "latest" / "certify.tsv", CertifyRecord)
    summary = json.loads((run / "certify" / "latest" / "summary.json").read_text())
    assert [r.idx for r in records] == list(range(60)) and summary["num_images"] == 60
    # Certified accuracy at r = 0, recomputed from the per-image file, is far above chance (10%).
    acc0 = sum(r.correct == 1 and r.radius >= 0 for r in records) / len(records)
    assert summary["certified_accuracy"]["0"] == pytest.approx(acc0)
    assert acc0 >= 0.5, acc0
    # The printed table and output paths.
    assert "| r=0 | r=0.25 | r=0.5 |" in proc.stdout and f"{100 * acc0:.1f}" in proc.stdout
    assert str((run / "certify" / "latest").resolve() / "certify.tsv") in proc.stdout
    # The attack stage on the same images: its row beside the certified one, and the cross-check line.
    attack = json.loads((run / "attack" / "latest" / "summary.json").read_text())
    assert attack["procedure"] == "attack" and attack["num_images"] == 60
    assert "| same model, under attack (empirical) |" in proc.stdout
    assert (
        "cross-check: r=0: " in proc.stdout
        and "r=0.25: " in proc.stdout
        and "consistent with sound certificates" in proc.stdout
    )

    # Running again does not redo finished stages: no file is rewritten.
    mtimes = {
        p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.suffix in (".ckpt", ".tsv")
    }
    again = run_quickstart(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (again.stdout + again.stderr).count("already complete") == 4


@pytest.mark.slow
def test_quickstart_without_pretraining_is_the_baseline(tmp_path):
    run = tmp_path / "quickstart-scratch"
    proc = run_quickstart(run, "pretrain=false", "noise=sigma_0.5", "logger=none", "trainer.max_epochs=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "pretrain").exists()
    assert (run / "certify" / "latest" / "summary.json").is_file()
    assert "fine-tuning from scratch" in proc.stdout
    # The overrides typed after experiment=quickstart reached the stages (issue 14.2).
    saved = OmegaConf.load(run / "finetune" / ".hydra" / "config.yaml")
    assert saved.noise.sigma == 0.5 and not saved.get("logger") and saved.trainer.max_epochs == 4
    assert json.loads((run / "certify" / "latest" / "summary.json").read_text())["sigma"] == 0.5
    assert not (run / "finetune" / "csv").exists()


def quickstart_stages(typed: list[str]) -> dict:
    """Each stage's config as the quickstart composes it for ``python train.py experiment=quickstart <typed>``."""
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.quickstart import CONFIG_NAME
    from dmae_lightning.jobs.quickstart import quickstart_stages as place

    conf = CONF
    _, overrides = place(compose(conf, "train", ["experiment=quickstart", *typed]))
    return {name: compose(conf, CONFIG_NAME[name], overrides[name]) for name in overrides}


def test_quickstart_overrides_reach_every_stage_they_apply_to():
    typed = [
        "hardware=gpu",
        "logger=wandb",
        "logger.project=qs",
        "noise=sigma_0.5",
        "seed=3",
        "trainer.max_epochs=2",
        "data.batch_size=32",
    ]
    cfgs = quickstart_stages(typed)
    for name, cfg in cfgs.items():
        assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("gpu", 1), name
        assert cfg.logger.project == "qs" and cfg.noise.sigma == 0.5 and cfg.seed == 3, name
        assert cfg.data.batch_size == 32 and cfg.data.seed == 3, name
    assert cfgs["pretrain"].task.name == "pretrain" and cfgs["finetune"].task.name == "finetune"
    assert cfgs["pretrain"].trainer.max_epochs == cfgs["finetune"].trainer.max_epochs == 2
    assert cfgs["finetune"].noise.sigma == 0.5 and cfgs["certify"].n == 1000  # the stage's own list kept
    assert "max_epochs" not in cfgs["certify"].trainer  # a training-only key goes to the training stages only
    none = quickstart_stages(["logger=none"])
    assert all(not cfg.get("logger") for cfg in none.values())
    sequential = quickstart_stages(["procedure=certify_radii"])  # the sequential procedure, as an option
    assert (sequential["certify"].procedure, sequential["certify"].n) == ("certify_radii", 1000)
    # issue 22: the certification settings by their certify.py names, and the protocol group
    certify = quickstart_stages(["n=300", "alpha=0.01", "split=train", "protocol=images500"])["certify"]
    assert (certify.n, certify.max, certify.alpha, certify.split, certify.num_images) == (
        300,
        None,
        0.01,
        "train",
        500,
    )
    assert quickstart_stages(["max=20"])["certify"].max == 20


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        (
            "pretrained=x.ckpt",
            r"quickstart: pretrained=x.ckpt is not accepted \(fine-tuning starts from the "
            r"pre-training stage \(pretrain=false: from scratch\)\)",
        ),
        ("ckpt_path=last", "quickstart: ckpt_path=last is not accepted"),
        (
            "+foo.bar=1",
            r"quickstart: \+foo.bar=1 applies to none of its stages \(pretrain, finetune, certify\)",
        ),
        # issue 22: refused before any stage runs (before: after training, or after a stage directory was made)
        ("procedure=certfy_radii", "procedure must be one of certify | certify_radii, got 'certfy_radii'"),
        (
            "procedure=predict",
            "procedure must be one of certify | certify_radii, got 'predict'",
        ),  # no radii to tabulate
        (
            "noise=discrete_gaussian_sigma_0.25",
            "quickstart: the certification stage would refuse its settings: "
            "discrete noise needs 8-bit images",
        ),
        ("protocol=images500", "num_images=500, but the test split has only 360 images"),
        ("n=0", r"n must be an integer in \[1, 10\^12\], got 0"),
    ],
)
def test_quickstart_refuses_overrides_no_stage_takes(typed, message):
    from dmae_lightning.jobs.rundir import ConfigError

    with pytest.raises(ConfigError, match=message):
        quickstart_stages([typed])


def test_another_procedure_reuses_the_trained_stages():
    """procedure=certify_radii (or another certification list) must not change the quickstart's run directory,
    where the finished training stages are (issue 17.4.5); a training setting must."""
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.rundir import identity_key, job_identity

    def key(*typed):
        return identity_key(job_identity(compose(CONF, "train", ["experiment=quickstart", *typed])))

    assert key() == key("procedure=certify_radii") == key('quickstart.certify=["n=10"]')
    assert key() != key("trainer.max_epochs=2")


def finished(tmp_path: Path, typed: list[str]) -> tuple:
    """A quickstart job whose three stages are recorded as finished in ``tmp_path`` (records older than identity
    keys, which are taken as finished): (cfg, conf dir, overrides, certification directory)."""
    from dmae_lightning.jobs.compose import compose
    from dmae_lightning.jobs.quickstart import DONE, certification_dir
    from dmae_lightning.jobs.quickstart import quickstart_stages as place

    cfg = compose(
        CONF, "train", ["experiment=quickstart", "quickstart.attack=null", *typed], output_dir=tmp_path
    )
    conf, overrides = place(cfg)
    checkpoint = f"weights={tmp_path / 'finetune' / 'checkpoints' / 'last.ckpt'}"
    certified = certification_dir(tmp_path, cfg.procedure, conf, [*overrides["certify"], checkpoint])
    for stage in (tmp_path / "pretrain", tmp_path / "finetune", certified):
        stage.mkdir(parents=True)
        (stage / DONE).write_text("{}")
    summary = {
        "procedure": "certify",
        "certified_accuracy": {"0": 0.5, "0.25": 0.25, "0.5": 0.125},
        "num_images": 8,
        "n0": 20,
        "n": 200,
        "alpha": 0.001,
        "samples": 1760,
        "sigma": 0.25,
        "average_certified_radius": 0.1,
    }
    (certified / "summary.json").write_text(json.dumps(summary))
    return cfg, conf, overrides, certified


@pytest.mark.parametrize("logger", ["wandb", "none"])
def test_a_finished_quickstart_says_that_its_logger_gets_nothing_new(logger, tmp_path, caplog, capsys):
    """logger=wandb on a finished quickstart (same run directory: the logger is not in its identity) skips every
    stage: one line per stage says nothing new was logged, and no W&B run is started (issue 17.4.6a)."""
    from dmae_lightning.jobs.quickstart import run_quickstart

    cfg, conf, overrides, certified = finished(tmp_path, [f"logger={logger}"])
    with caplog.at_level("INFO", logger="dmae_lightning"):
        run_quickstart(cfg, conf, overrides)
    lines = [r.getMessage() for r in caplog.records if "already complete" in r.getMessage()]
    note = "; nothing new logged to logger=wandb (it logged when the stage ran)" if logger == "wandb" else ""
    assert lines == [
        f"quickstart: {name} already complete in {stage}, not redone{note}"
        for name, stage in zip(
            ("pre-training", "fine-tuning", "certification"),
            (tmp_path / "pretrain", tmp_path / "finetune", certified),
        )
    ]
    assert "| 50.0 | 25.0 | 12.5 | 0.100 |" in capsys.readouterr().out
    assert not any(tmp_path.rglob("wandb"))
    assert (certified.parent / "latest").resolve() == certified


def test_finished_stages_are_matched_by_identity_not_by_the_typed_settings(tmp_path, caplog):
    """Issue 22: a finished quickstart rerun with data.num_workers=0 (the default) or logger=none, or after the
    project folder was moved, was refused as "finished with other settings: remove that directory"; other
    certification settings now get their own directory beside the finished one, and a certification whose
    summary.json was cut in half is run again (the job rebuilds it) instead of a JSON traceback."""
    from dmae_lightning.jobs.quickstart import DONE, certification_dir, run_quickstart

    cfg, conf, overrides, certified = finished(tmp_path, ["logger=none"])
    moved = {
        stage: [*typed, "data.num_workers=0"] if stage != "certify" else [*typed, "batch_size=500"]
        for stage, typed in overrides.items()
    }
    with caplog.at_level("INFO", logger="dmae_lightning"):
        run_quickstart(cfg, conf, moved)
    assert caplog.text.count("already complete") == 3

    checkpoint = f"weights={tmp_path / 'finetune' / 'checkpoints' / 'last.ckpt'}"
    other = certification_dir(tmp_path, "certify", conf, [*overrides["certify"], "n=2000", checkpoint])
    assert other.parent == certified.parent and other != certified
    # a stage recorded with another identity: one line, and no advice to delete it
    (tmp_path / "finetune" / DONE).write_text(json.dumps({"key": "0badc0de"}))
    with pytest.raises(
        Exception,
        match=r"finetune holds the results of another configuration \(key: 0badc0de -> \w+\): give these settings their "
        r"own run, e.g. run_name=quickstart_2 \(the finished stage is kept\)",
    ):
        run_quickstart(cfg, conf, {stage: list(typed) for stage, typed in overrides.items()})
