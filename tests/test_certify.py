"""The certification job: outputs against independent recomputation, determinism, DDP, resume, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.certify import (
    SIGMA,
    certify_on_two_cpu_processes,
    compose_cfg,
    finish,
    overrides_with,
    run,
    script,
)
from helpers.noise import reference_noise
from scipy.stats import beta, binom, binomtest, norm

from dmae_lightning.certification import PROCEDURES, CertifyRecord, PredictRecord, Smooth
from dmae_lightning.certification.records import read_json, read_records
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.certify.params import validate
from dmae_lightning.jobs.certify.predictor import SmoothingPredictor
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import load_weights
from dmae_lightning.noise import GaussianNoise

pytestmark = pytest.mark.usefixtures("single_thread")


def results(path: Path) -> list[tuple]:
    """Every column but the time."""
    return [dataclasses.astuple(dataclasses.replace(r, time=0.0)) for r in read_records(path, CertifyRecord)]


def classifier(path: Path) -> torch.nn.Module:
    model = create_model("vit_micro_patch8", num_classes=10, img_size=32)
    load_weights(model, path)
    return model.eval()


def expected_radius(n_a: int, n: int, alpha: float, sigma: float) -> float | None:
    """Cohen et al.'s radius from the counts, None for an abstention."""
    p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
    return sigma * norm.ppf(p_lower) if p_lower >= 0.5 else None


@pytest.fixture(scope="module")
def wandb_calls():
    """WandbLogger's table and image calls, recorded (wandb itself disabled: no network, no files)."""
    from pytorch_lightning.loggers import WandbLogger

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setattr(WandbLogger, "log_table", lambda self, **kw: calls.append(("table", kw)))
        mp.setattr(WandbLogger, "log_image", lambda self, **kw: calls.append(("image", kw)))
        yield calls


@pytest.fixture(scope="module")
def base(tmp_path_factory, ckpt, wandb_calls) -> tuple[Path, dict]:
    """The reference run: 12 test images, n0=10, n=100, batch 100 (logged to a disabled wandb)."""
    out = tmp_path_factory.mktemp("base")
    summary = run(out, ckpt, "logger=wandb", "+logger.mode=disabled")
    return out, summary


# --------------------------------------------------------------------------------------------- outputs
def test_outputs_and_summary_match_the_records(base, ckpt):
    out, summary = base
    assert {p.name for p in out.iterdir()} >= {"certify.tsv", "summary.json", "certified_accuracy.png"}
    assert not list(out.glob("certify.rank*.tsv"))  # shards are deleted after the merge
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_records(out / "certify.tsv", CertifyRecord)
    labels = DigitsDataModule().dataset("test").labels
    assert [r.idx for r in records] == list(range(12))
    assert [r.label for r in records] == labels[:12].tolist()

    on_disk = read_json(out / "summary.json")
    assert on_disk == json.loads(json.dumps(summary))
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]  # CIFAR-10's radii for a data set other than ImageNet
    assert on_disk["radii"] == radii
    expected_acc = {f"{r:g}": sum(x.correct == 1 and x.radius >= r for x in records) / 12 for r in radii}
    # n = 100 certifies at most sigma * Phi^-1(0.001^(1/100)) = 0.375: beyond it null, not 0
    assert on_disk["max_certifiable_radius"] == pytest.approx(SIGMA * norm.ppf(0.001 ** (1 / 100)))
    assert [on_disk["certified_accuracy"][k] for k in ("0.5", "0.75", "1")] == [None, None, None]
    assert [on_disk["certified_accuracy_lower_bound"][k] for k in ("0.5", "0.75", "1")] == [None, None, None]
    reachable = {key: value for key, value in expected_acc.items() if float(key) < 0.375}
    assert {k: on_disk["certified_accuracy"][k] for k in reachable} == pytest.approx(reachable, abs=1e-12)
    assert on_disk["average_certified_radius"] == pytest.approx(
        sum(x.radius * x.correct for x in records) / 12
    )
    assert on_disk["abstain_rate"] == pytest.approx(sum(x.predict == -1 for x in records) / 12)
    # rho = 0.001: P(Bin(12, 0.001) > 0) = 0.012 > rho >= P(Bin(12, 0.001) > 1) = 6.6e-5, so one false
    # certificate among the 12 is allowed for
    assert binom.sf(0, 12, 0.001) > 0.001 >= binom.sf(1, 12, 0.001)
    assert (on_disk["rho"], on_disk["false_certificates_allowed"]) == (0.001, 1)
    expected_bound = {key: max(12 * acc - 1, 0) / 12 for key, acc in reachable.items()}
    assert {k: on_disk["certified_accuracy_lower_bound"][k] for k in reachable} == pytest.approx(
        expected_bound
    )
    assert on_disk["num_images"] == 12
    assert (on_disk["sigma"], on_disk["n0"], on_disk["n"], on_disk["alpha"]) == (SIGMA, 10, 100, 0.001)
    assert (on_disk["seed"], on_disk["precision"], on_disk["skip_wrong_guess"]) == (0, "32-true", False)
    assert (on_disk["dataset"], on_disk["split"]) == ("digits", "test")
    assert on_disk["subset"]["skip"] == 1 and on_disk["subset"]["max"] == 12
    assert on_disk["checkpoint"] == str(ckpt.resolve())
    assert on_disk["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert on_disk["wall_time_s"] > 0
    # The classifier is neither perfect nor useless, so every kind of line occurs.
    assert any(r.correct and r.radius > 0 for r in records)
    assert any(r.predict == -1 for r in records)
    assert any(r.predict not in (-1, r.label) for r in records)


def test_radius_is_cohens_formula_from_the_counts(base):
    out, _ = base
    for r in read_records(out / "certify.tsv", CertifyRecord):
        assert r.n == 100 and 0 <= r.n_a <= 100
        radius = expected_radius(r.n_a, r.n, 0.001, SIGMA)
        if radius is None:
            assert (r.predict, r.radius, r.correct) == (-1, 0.0, 0)
        else:
            assert r.predict != -1 and r.radius == pytest.approx(radius, rel=1e-12, abs=1e-15)
            assert r.correct == int(r.predict == r.label)


def test_counts_equal_smooth_with_the_per_image_generator(base, ckpt):
    """Line idx is Smooth.certify_record on image idx with the same seed and idx."""
    out, _ = base
    smooth = Smooth(classifier(ckpt), 10, GaussianNoise(SIGMA))
    dataset = DigitsDataModule().dataset("test")
    for r in read_records(out / "certify.tsv", CertifyRecord)[::4]:
        image, _ = dataset[r.idx]
        rec = smooth.certify_record(image, 10, 100, 0.001, 100, seed=0, idx=r.idx)
        assert (rec.predict, rec.radius, rec.n_a, rec.n) == (r.predict, r.radius, r.n_a, r.n)


def test_wandb_gets_the_table_and_the_plot(base, wandb_calls):
    out, summary = base
    (kind, table), (kind2, image) = wandb_calls
    assert (kind, kind2) == ("table", "image")
    assert table["columns"] == ["sigma", "r=0", "r=0.25", "r=0.5", "r=0.75", "r=1"]
    assert table["data"] == [[SIGMA, *summary["certified_accuracy"].values()]]
    assert image["images"] == [str(out / "certified_accuracy.png")]


# --------------------------------------------------------------------------------------------- determinism
def test_same_seed_and_other_batch_give_identical_results(base, ckpt, tmp_path):
    out, _ = base
    run(tmp_path / "again", ckpt)
    assert results(tmp_path / "again" / "certify.tsv") == results(out / "certify.tsv")
    # The noise of an image does not depend on how it is batched: blocks split (30, 45), several images
    # per forward pass (250).
    for batch in (30, 45, 250):
        run(tmp_path / f"batch{batch}", ckpt, f"batch_size={batch}")
        assert results(tmp_path / f"batch{batch}" / "certify.tsv") == results(out / "certify.tsv")


def test_other_seed_other_noise(base, ckpt, tmp_path):
    out, _ = base
    run(tmp_path / "seed1", ckpt, "seed=1", "max=4")
    assert [r[5] for r in results(tmp_path / "seed1" / "certify.tsv")] != [
        r[5] for r in results(out / "certify.tsv")[:4]
    ]


def test_skip_and_max_pick_dataset_indices(base, ckpt, tmp_path):
    out, _ = base
    summary = run(tmp_path / "skip", ckpt, "skip=3", "max=4")
    reference = {r[0]: r for r in results(out / "certify.tsv")}
    assert results(tmp_path / "skip" / "certify.tsv") == [reference[i] for i in (0, 3, 6, 9)]
    assert summary["num_images"] == 4 and summary["subset"]["indices"] == "range(0, 360, 3)[:4]"


def test_skip_wrong_guess_keeps_certified_accuracy(base, ckpt, tmp_path):
    out, summary = base
    skipped = run(tmp_path / "skip_wrong", ckpt, "skip_wrong_guess=true")
    assert skipped["certified_accuracy"] == summary["certified_accuracy"]
    assert skipped["average_certified_radius"] == summary["average_certified_radius"]
    assert (
        skipped["abstain_rate"] is None and summary["abstain_rate"] is not None
    )  # not measurable when skipping
    reference = {r.idx: r for r in read_records(out / "certify.tsv", CertifyRecord)}
    for r in read_records(tmp_path / "skip_wrong" / "certify.tsv", CertifyRecord):
        full = reference[r.idx]
        if full.predict not in (-1, full.label):  # guessed wrong: the n estimation draws were skipped
            assert (r.n, r.n_a, r.predict, r.radius, r.correct) == (0, 0, full.predict, 0.0, 0)
        if r.n == 0:
            assert r.predict != r.label and full.correct == 0
        else:  # same selection and estimation draws as the full run
            assert dataclasses.replace(r, time=0.0) == dataclasses.replace(full, time=0.0)
    assert any(r.n == 0 for r in read_records(tmp_path / "skip_wrong" / "certify.tsv", CertifyRecord))


# --------------------------------------------------------------------------------------------- resume
def test_resume_certifies_only_the_rest(base, ckpt, tmp_path):
    """A shard of 5 lines and a torn sixth, and a merged file from an earlier session with 2 more."""
    out, _ = base
    reference = read_records(out / "certify.tsv", CertifyRecord)
    marked = [dataclasses.replace(r, time=1000.0 + r.idx) for r in reference]  # tells reused lines apart
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    header = (out / "certify.tsv").read_text().split("\n")[0]
    (run_dir / "certify.tsv").write_text(
        "".join(f"{line}\n" for line in [header, *(r.to_line() for r in marked[7:9])])
    )
    torn = marked[5].to_line()[:9]
    (run_dir / "certify.rank0.tsv").write_text(
        header + "\n" + "".join(f"{r.to_line()}\n" for r in marked[:5]) + torn
    )
    shutil.copy(out / "certify.params.json", run_dir / "certify.params.json")
    shutil.copytree(out / ".hydra", run_dir / ".hydra")  # the run directory's recorded configuration
    run(run_dir, ckpt)
    final = read_records(run_dir / "certify.tsv", CertifyRecord)
    assert results(run_dir / "certify.tsv") == results(out / "certify.tsv")
    reused = [r.idx for r in final if r.time >= 1000.0]
    assert reused == [0, 1, 2, 3, 4, 7, 8]
    assert not list(run_dir.glob("certify.rank*.tsv"))
    # A finished run re-run: nothing left to certify, same files.
    before = (run_dir / "certify.tsv").read_text()
    summary = run(run_dir, ckpt)
    assert (run_dir / "certify.tsv").read_text() == before and summary["num_images"] == 12


def test_resume_with_other_settings_or_checkpoint_is_refused(base, ckpt, tmp_path):
    out, _ = base
    run_dir = tmp_path / "mixed"
    shutil.copytree(out, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds the results of another configuration \(n: 100 -> 200\)"):
        run(run_dir, ckpt, "n=200")
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.head.bias"] += 1.0
    torch.save(state, other)
    with pytest.raises(ConfigError, match=r"holds the results of another configuration \(weights"):
        run(run_dir, other)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # left as it was
    # What the config does not show (another noise scheme, precision resolved on another device) is in
    # certify.params.json: a resume that would mix two noise schemes is refused too.
    params = json.loads((run_dir / "certify.params.json").read_text())
    (run_dir / "certify.params.json").write_text(json.dumps({**params, "noise_scheme": "block100-v0"}))
    with pytest.raises(
        ConfigError, match=r"another configuration \(noise_scheme: block100-v0 -> block100-v1\)"
    ):
        run(run_dir, ckpt)
    # issue 22: a damaged params file was a JSON traceback
    (run_dir / "certify.params.json").write_text('{"n0": 100, ')
    with pytest.raises(ConfigError, match=r"certify.params.json is damaged \(.*\): it says which settings"):
        run(run_dir, ckpt)


KILLED = ("max=6", "n=10000", "batch_size=1000")  # about 1.5 s per image: time to stop a real process mid-run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ckpt) -> Path:
    """certify.tsv of an uninterrupted run with the settings KILLED, for the kill tests to compare against."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, ckpt, *KILLED)
    return out / "certify.tsv"


def killed_args(ckpt: Path, logs: Path) -> list[str]:
    return [f"weights={ckpt}", f"paths.log_dir={logs}", *overrides_with(*KILLED)]


def wait_for_records(proc: subprocess.Popen, logs: Path, log: Path, count: int) -> Path:
    """The rank-0 shard of the run writing into ``logs``, once it holds ``count`` records; the run still going."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(logs.glob("*/*/certify.rank0.tsv"))
        if found and found[0].read_text().count("\n") >= count + 1:  # the header and ``count`` images
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"the run finished before it could be stopped:\n{log.read_text()}")


def check_resumed(proc: subprocess.Popen, log: Path, run_dir: Path, uninterrupted: Path) -> None:
    """The same command again, into ``run_dir``: finishes, and certify.tsv holds the uninterrupted run's lines."""
    output = finish(proc, log, 300)
    assert proc.returncode == 0, output
    text = (run_dir / "certify.tsv").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 7
    assert results(run_dir / "certify.tsv") == results(uninterrupted)
    assert not list(run_dir.glob("certify.rank*.tsv"))
    assert f"wrote {run_dir / 'certify.tsv'}" in output


@pytest.mark.slow
def test_sigkill_and_restart_equal_an_uninterrupted_run(ckpt, uninterrupted, tmp_path):
    """A real process killed mid-run (SIGKILL), then the same command: no lost, duplicate or torn lines."""
    args, log = killed_args(ckpt, tmp_path / "logs"), tmp_path / "out.log"
    proc = script(log, *args)
    shard = wait_for_records(proc, tmp_path / "logs", log, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = shard.parent
    assert not (run_dir / "certify.tsv").exists()
    first = len(read_records(shard, CertifyRecord))
    assert 2 <= first < 6
    check_resumed(script(log, *args), log, run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_stops_at_the_next_image_keeps_the_records_and_resumes(ckpt, uninterrupted, tmp_path):
    """SIGTERM (a scheduler's or `kill`'s) of a real ``python certify.py``: Lightning's predict loop never looks
    at its SIGTERM flag, so the job used to certify every image and exit 0 (issue 22.6). It must stop at the next
    image with status 1 and one line, keep what it wrote, and the same command must then finish the run."""
    args, log = killed_args(ckpt, tmp_path / "logs"), tmp_path / "out.log"
    proc = script(log, *args)
    shard = wait_for_records(proc, tmp_path / "logs", log, 1)
    before = read_records(shard, CertifyRecord)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, log, 120)
    assert proc.returncode == 1, output[-3000:]
    assert output.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in output
    run_dir = shard.parent
    after = read_records(shard, CertifyRecord)
    assert after[: len(before)] == before and len(after) < 6  # kept, and stopped before the end
    assert not (run_dir / "certify.tsv").exists()
    check_resumed(script(log, *args), log, run_dir, uninterrupted)


@pytest.mark.slow
def test_two_ddp_processes_equal_one(base, ckpt, tmp_path):
    """Lightning's DDP on the CPU (gloo, 2 processes, 6 + 5 images): each image once, the same lines as 1."""
    out, _ = base
    merged = certify_on_two_cpu_processes(ckpt, tmp_path, "max=11") / "certify.tsv"  # the finished run
    assert results(merged) == results(out / "certify.tsv")[:11]
    summary = read_json(merged.parent / "summary.json")
    assert summary["world_size"] == 2 and summary["num_images"] == 11
    assert not list(merged.parent.glob("certify.rank*.tsv"))


def test_a_rank_without_images_gets_a_placeholder(ckpt, tmp_path):
    """Lightning refuses an empty loader on one rank while another has batches (1 image, 2 ranks)."""
    params = validate(compose_cfg(tmp_path, ckpt))
    dataset = DigitsDataModule().dataset("test")
    procedure = PROCEDURES[params.procedure].from_params(params, (0.0,))
    module = SmoothingPredictor(classifier(ckpt), 10, procedure, params, dataset, todo=[7], run_dir=tmp_path)
    assert [idx for idx, *_ in module.loader([7], 0, 2)] == [7]
    assert [idx for idx, *_ in module.loader([7], 1, 2)] == [-1] and module.share == []
    assert len(module.loader([], 1, 2)) == 0  # nothing left anywhere: empty everywhere is fine
    assert module.predict_step((-1, torch.zeros(0), -1, ""), 0) is None  # no writer needed: nothing written


# --------------------------------------------------------------------------------------------- predict
def test_predict_mode(base, ckpt, tmp_path):
    summary = run(tmp_path / "predict", ckpt, "procedure=predict", "max=6")
    path = tmp_path / "predict" / "predict.tsv"
    lines = path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tcorrect\ttime" and len(lines) == 7
    records = read_records(path, PredictRecord)
    model = classifier(ckpt)
    dataset = DigitsDataModule().dataset("test")
    for r in records:
        image, label = dataset[r.idx]
        with torch.no_grad():  # recount from the documented noise (test_procedures.reference_noise)
            noisy = image + SIGMA * reference_noise(0, r.idx, 0, 100, image.shape)  # [100,C,H,W]
            counts = torch.bincount(model(noisy).argmax(1), minlength=10)
        top2 = counts.sort(descending=True, stable=True)
        n_a, n_b = (int(c) for c in top2.values[:2])
        expected = -1 if binomtest(n_a, n_a + n_b, 0.5).pvalue > 0.001 else int(top2.indices[0])
        assert (r.label, r.predict, r.correct) == (label, expected, int(expected == label))
    assert summary["accuracy"] == pytest.approx(sum(r.correct for r in records) / 6)
    assert summary["abstain_rate"] == pytest.approx(sum(r.predict == -1 for r in records) / 6)
    assert read_json(tmp_path / "predict" / "summary.json")["num_images"] == 6
    assert not (tmp_path / "predict" / "certify.tsv").exists()


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, ckpt) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    five = folder / "five.ckpt"  # the same file with a 5-class head, as a 5-class fine-tuning writes it
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["num_classes"] = 5
    for key in ("model.head.weight", "model.head.bias"):
        state["state_dict"][key] = state["state_dict"][key][:5].clone()
    torch.save(state, five)
    files = {"text": text, "five": five, "missing": folder / "missing.ckpt", "directory": folder}
    for name, change in {
        "nan": lambda st: st["state_dict"]["model.head.weight"].view(-1).__setitem__(3, float("nan")),
        "pretrain": lambda st: st["hyper_parameters"].__setitem__("model_name", "dmae_vit_micro_patch4"),
        "overflow": lambda st: st["state_dict"]["model.head.weight"].fill_(
            3e38
        ),  # finite weights, inf logits
    }.items():
        state = torch.load(ckpt, weights_only=True)
        change(state)
        torch.save(state, files.setdefault(name, folder / f"{name}.ckpt"))
    return files


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["n0=0"], "n0 must be an integer in [1, 10^12], got 0"),
        (["n=0"], "n must be an integer in [1, 10^12], got 0"),
        (["alpha=0"], "alpha must lie strictly between 0 and 1, got 0"),
        (["alpha=1"], "alpha must lie strictly between 0 and 1, got 1"),
        (["rho=0"], "rho must lie strictly between 0 and 1, got 0"),
        (
            ["noise=sigma_0.25", "noise.sigma=-1", "noise_override=true"],
            "noise.sigma must be a finite number > 0, got -1",
        ),
        (
            ["noise=sigma_0.25", "noise.sigma=0", "noise_override=true"],
            "noise.sigma must be a finite number > 0, got 0",
        ),
        (["batch_size=0"], "batch_size must be an integer in [1, 10^12], got 0"),
        (["skip=0"], "skip must be an integer >= 1, got 0"),
        (["max=0"], "max must be an integer >= 1 or null, got 0"),
        (["precision=fp64"], "precision must be one of 32-true|bf16-mixed|16-mixed, got 'fp64'"),
        (["procedure=guess"], "procedure must be one of certify|predict"),
        (["split=dev"], "split must be one of train|val|test"),
        (["radii=[0.5,-1]"], "radii must be null or a non-empty list of numbers >= 0"),
        (["trainer.precision=bf16-mixed"], "trainer.precision is now precision"),
        (
            [
                "noise=discrete_gaussian_sigma_0.25",
                "noise_override=true",
            ],  # digits are in 1/16 steps, bicubic-resized: not 8-bit
            "noise discrete_sigma0.25 on digits: discrete noise needs 8-bit images",
        ),
    ],
)
def test_bad_settings_rejected_before_sampling(ckpt, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "bad", ckpt, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()  # nothing written, nothing sampled


@pytest.mark.parametrize(
    "which, message",
    [
        ("five", "classifies 5 classes but digits has 10"),
        ("text", "is not a loadable PyTorch checkpoint"),
        ("missing", "does not exist"),
        ("directory", "does not exist or is not a file"),  # issue 22: was a traceback
        ("nan", "holds non-finite (NaN/Inf) weights in head.weight: a diverged or damaged model"),
        # first, not "add model=dmae_vit_micro_patch4" (following that advice would fail)
        ("pretrain", "holds the pre-training model dmae_vit_micro_patch4: certify a fine-tuned classifier"),
    ],
)
def test_bad_checkpoints_rejected(bad_files, tmp_path, which, message):
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "bad", bad_files[which])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_a_classifier_with_non_finite_logits_is_never_certified(bad_files, tmp_path):
    """Finite weights whose logits overflow: argmax would return class 0 for every draw and certify the
    largest radius; the job stops on the first image instead, naming it, and writes no result."""
    with pytest.raises(
        ConfigError, match=r"^image 0: the base classifier returned NaN/Inf logits for \d+ of 10 "
    ):
        run(tmp_path / "overflow", bad_files["overflow"], "max=3")
    assert not (tmp_path / "overflow" / "certify.tsv").exists()
    shard = tmp_path / "overflow" / "certify.rank0.tsv"
    assert not shard.exists() or shard.read_text().count("\n") == 1  # the header only


@pytest.mark.slow  # ~7 s: a fresh python certify.py (torch + Lightning imports)
def test_missing_weights_is_one_line_from_the_script(tmp_path):
    log = tmp_path / "out.log"
    proc = script(log, f"paths.log_dir={tmp_path}", "n0=0")
    output = finish(proc, log, 120)
    assert proc.returncode == 1
    assert output.strip().splitlines()[-1] == "error: weights is required: python certify.py weights=PATH ..."


def test_the_classifier_file_is_read_once(ckpt, tmp_path, monkeypatch):
    """Issue 23: the certify job read the checkpoint with torch.load twice (architecture, then weights)."""
    import dmae_lightning.jobs.certify.job as job_mod
    import dmae_lightning.models.weights as weights_mod

    reads = []
    real = weights_mod.read_checkpoint

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(weights_mod, "read_checkpoint", counting)
    monkeypatch.setattr(job_mod, "read_checkpoint", counting)
    cfg = compose_cfg(tmp_path / "once", ckpt)
    model, info = job_mod.load_classifier(cfg, Path(ckpt), 10, "digits")
    assert reads == [Path(ckpt)] and info.model_name == "vit_micro_patch8"


def test_noise_comes_from_the_checkpoint_and_another_is_refused_unless_overridden(ckpt, tmp_path):
    """Issue 23: the checkpoint records its training noise (sigma 0.25): certify.py takes it when no noise is
    chosen; another noise is refused in one line before anything is written, unless noise_override=true, which
    summary.json records with the training noise."""
    from dmae_lightning.jobs.certify.job import prepare

    cfg = compose_cfg(tmp_path / "own", ckpt)
    assert validate(cfg).noise == GaussianNoise(SIGMA) and cfg.run_name.endswith("sigma0.25")
    other = compose_cfg(tmp_path / "other", ckpt, "noise=sigma_0.5")
    with pytest.raises(
        ConfigError, match=r"was trained with noise sigma0.25, not sigma0.5: .*noise_override=true"
    ):
        prepare(other)
    assert not (tmp_path / "other").exists()
    summary = run(tmp_path / "override", ckpt, "noise=sigma_0.5", "noise_override=true", "max=2")
    assert summary["sigma"] == 0.5 and summary["trained_noise"] == GaussianNoise(SIGMA).config()


def test_a_file_without_its_noise_needs_one(ckpt, tmp_path):
    """An official or plain file records no noise: one line asks for it (a missing file is named as missing)."""
    plain = tmp_path / "plain.pth"
    torch.save({"model": classifier(ckpt).state_dict()}, plain)
    with pytest.raises(
        ConfigError, match=r"does not record the noise it was trained with .*noise=sigma_0.25"
    ):
        validate(compose_cfg(tmp_path / "a", plain))
    with pytest.raises(ConfigError, match=r"weights=\S*missing.pth does not exist"):
        validate(compose_cfg(tmp_path / "b", tmp_path / "missing.pth"))
    assert validate(compose_cfg(tmp_path / "c", plain, "noise=sigma_0.5")).noise == GaussianNoise(0.5)
