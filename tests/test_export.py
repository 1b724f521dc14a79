"""jobs/export.py (issue 25.4): a real fine-tuning run's checkpoint exported as model.safetensors + config.json +
a model card; reloaded without pickle to identical logits; the card's table from a summary.json; the card's
certify command on the export gives the certification of the original checkpoint; bad input in one line."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from helpers.certify import run as certify_run
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub
from safetensors import safe_open

from dmae_lightning.certification.records import CertifyRecord, read_records
from dmae_lightning.errors import ConfigError
from dmae_lightning.jobs.certify.job import load_classifier
from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.export import export, main
from dmae_lightning.jobs.rundir import file_digest
from dmae_lightning.models import create_model
from dmae_lightning.models.layers import IMAGENET_MEAN, IMAGENET_STD
from dmae_lightning.models.weights import checkpoint_noise, load_weights, read_checkpoint
from dmae_lightning.noise import GaussianNoise
from dmae_lightning.training.pretrain import DMAEPretrainModule

pytestmark = pytest.mark.usefixtures("single_thread")

ARCH = "vit_micro_patch8"


@pytest.fixture
def run_dir(ckpt, tmp_path) -> Path:
    """A fine-tuning run directory holding the session's real Lightning checkpoint as checkpoints/last.ckpt."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) called on an exported model")

    monkeypatch.setattr(torch, "load", refuse)


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # [B, 3, 32, 32]


def test_export_reloads_to_identical_logits_without_pickle(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    assert main([str(run_dir), str(out)]) == 0
    names = [hub.REPOCARD_NAME, hub.CONFIG_NAME, hub.SAFETENSORS_SINGLE_FILE]  # PyTorchModelHubMixin's layout
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    original = create_model(ARCH, num_classes=10).eval()
    assert load_weights(original, run_dir / "checkpoints" / "last.ckpt").layout == "lightning"

    no_torch_load(monkeypatch)
    loaded = create_model(ARCH, num_classes=10).eval()
    report = load_weights(loaded, out)
    assert report.layout == "exported" and str(report) == "every tensor loaded as is"
    built = create_model(ARCH, pretrained=out).eval()  # architecture and class count from config.json
    assert checkpoint_noise(out) == GaussianNoise(0.25)
    ckpt = read_checkpoint(out)  # a Lightning checkpoint's shape: what the certification job reads
    assert ckpt["hyper_parameters"]["model_name"] == ARCH and ckpt["hyper_parameters"]["num_classes"] == 10
    assert all(key.startswith("model.") for key in ckpt["state_dict"])
    with torch.no_grad():
        ref = original(images())
        assert ref.abs().max() > 0.1
        assert torch.equal(loaded(images()), ref) and torch.equal(built(images()), ref)

    # model.safetensors: exactly the network's state dict, plain tensors, Hugging Face's "pt" format
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(original.state_dict())
        assert f.metadata()["format"] == "pt" and f.metadata()["architecture"] == ARCH
        for key, value in original.state_dict().items():
            assert torch.equal(f.get_tensor(key), value), key


def test_config_json_fields(run_dir, tmp_path):
    out = tmp_path / "exported"
    config = export(run_dir, out)
    assert json.loads((out / "config.json").read_text()) == config
    assert config["format"] == "dmae-lightning-export" and config["format_version"] == 1
    assert config["architecture"] == ARCH and config["model_kwargs"] == {"img_size": 32}
    assert config["num_classes"] == 10
    assert config["noise"] == {"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": 0.25}
    norm = config["normalization"]
    assert norm["mean"] == list(IMAGENET_MEAN) and norm["std"] == list(IMAGENET_STD)
    assert (
        norm["input_size"] == [3, 32, 32] and norm["applied_by_model"] is True and "[0, 1]" in norm["input"]
    )
    assert config["objective"] == {"name": "gaussian", "copies": 1}
    assert config["training"]["label_smoothing"] == 0.0 and "model_name" not in config["training"]
    assert config["code_version"] == {
        "package": "dmae-lightning",
        "version": importlib.metadata.version("dmae-lightning"),
    }
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    assert config["source"]["checkpoint_sha256"] == file_digest(str(ckpt_path)).removeprefix("sha256:")
    assert config["source"]["epoch"] == 1 and config["source"]["checkpoint"] == "last.ckpt"


def written_summary(tmp_path: Path, sha256: str, **changes) -> Path:
    """A certification run directory with a summary.json written here, with recognisable numbers."""
    cert = tmp_path / "cert"
    cert.mkdir(exist_ok=True)
    summary = {
        "procedure": "certify",
        "n0": 100,
        "n": 100000,
        "alpha": 0.001,
        "skip_wrong_guess": False,
        "noise": {"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": 0.25},
        "trained_noise": None,
        "sigma": 0.25,
        "seed": 0,
        "precision": "32-true",
        "dataset": "digits",
        "split": "test",
        "data_subset": {"subset_every": 1, "subset_first": None},
        "checkpoint_sha256": sha256,
        "model_name": ARCH,
        "subset": {"skip": 20, "max": None, "num_images": None, "indices": "range(0, 360, 20)[:None]"},
        "radii": [0.0, 0.25, 0.5, 1.0],
        "num_images": 18,
        "certified_accuracy": {"0": 0.6172, "0.25": 0.4833, "0.5": 0.3011, "1": None},
        "abstain_rate": 0.05,
        "max_certifiable_radius": 0.9,
        "samples": 1801800,
        "average_certified_radius": 0.4321,
        "rho": 0.001,
        "false_certificates_allowed": 2,
        "certified_accuracy_lower_bound": {"0": 0.5924, "0.25": 0.4417, "0.5": 0.2786, "1": None},
        **changes,
    }
    (cert / "summary.json").write_text(json.dumps(summary))
    return cert


def test_model_card_holds_the_summary_numbers(run_dir, tmp_path):
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    cert = written_summary(tmp_path, file_digest(str(ckpt_path)).removeprefix("sha256:"))
    out = tmp_path / "my-model"
    export(run_dir, out, [cert])
    text = (out / "README.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| sigma0.25")]
    assert table == [
        "| sigma0.25, certify, n=100000, alpha=0.001 | 61.7 | 48.3 | 30.1 | n/c | 0.432 |",
        "| sigma0.25, certify, n=100000, alpha=0.001, lower bound | 59.2 | 44.2 | 27.9 | n/c |  |",
    ]
    for expected in (
        "n0=100, n=100000, alpha=0.001",
        "digits test split",
        "18 images range(0, 360, 20)[:None]",
        "1 - rho = 0.999 (at most 2 of the 18 certificates false)",
        "python certify.py weights=my-model model=vit_micro_patch8 data=digits split=test n0=100 n=100000 "
        "alpha=0.001 skip=20 seed=0 precision=32-true",
        f"dmae-lightning {importlib.metadata.version('dmae-lightning')}",
        'create_model("vit_micro_patch8", pretrained="my-model")',
    ):
        assert expected in text, expected
    card = ModelCard.load(out / "README.md")  # huggingface_hub's reader: metadata and model-index, no network
    meta = card.data.to_dict()
    assert meta["library_name"] == "dmae-lightning" and meta["pipeline_tag"] == "image-classification"
    assert "randomized-smoothing" in meta["tags"]
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["certified accuracy (%) at r=0.25, sigma0.25, certify, n=100000, alpha=0.001"] == 48.33
    assert values["ACR, sigma0.25, certify, n=100000, alpha=0.001"] == 0.4321
    assert not any("r=1," in name for name in values)  # beyond the reach: no number


def test_certify_command_of_the_card_repeats_the_certification(run_dir, tmp_path, monkeypatch):
    """Certify the run's checkpoint, export with that run, then run the card's command on the export (in this
    process): the same per-image records."""
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    first = certify_run(tmp_path / "cert", ckpt_path, "max=4")
    out = tmp_path / "exported"
    assert main([str(run_dir), str(out), "--certification", str(tmp_path / "cert")]) == 0
    text = (out / "README.md").read_text()
    assert f"| {100 * first['certified_accuracy']['0']:.1f} |" in text
    (command,) = [line for line in text.splitlines() if line.startswith("python certify.py ")]
    args = shlex.split(command)[2:]
    assert args[0] == "weights=exported"
    no_torch_load(monkeypatch)
    second = certify_run(tmp_path / "cert2", out, *args[1:])
    records = [
        [dataclasses.replace(r, time=0.0) for r in read_records(path / "certify.tsv", CertifyRecord)]
        for path in (tmp_path / "cert", tmp_path / "cert2")
    ]
    assert len(records[0]) == 4 and records[0] == records[1]
    for key in ("certified_accuracy", "certified_accuracy_lower_bound", "noise", "n", "alpha", "model_name"):
        assert second[key] == first[key], key


def test_pretraining_run_exports_without_certification(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    module = DMAEPretrainModule(
        model_name=f"dmae_{ARCH}", model_kwargs={"img_size": 32}, noise=GaussianNoise(0.5)
    )
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 3}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    assert main([str(run), str(tmp_path / "cert-out"), "--certification", str(tmp_path)]) == 2
    assert (
        "holds the pre-training model dmae_vit_micro_patch8: it certifies nothing" in capsys.readouterr().err
    )

    out = tmp_path / "dmae"
    config = export(run, out)
    assert config["num_classes"] is None and config["objective"]["name"] == "dmae"
    assert config["noise"]["sigma"] == 0.5 and config["training"]["mask_ratio"] == 0.75
    assert "It is not a classifier" in (out / "README.md").read_text()
    no_torch_load(monkeypatch)
    dmae = create_model(f"dmae_{ARCH}", pretrained=out).eval()
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(
            dmae(images(), generator=gen())[0], module.model.eval()(images(), generator=gen())[0]
        )
    clf = create_model(ARCH, pretrained=out)  # its encoder, a fresh head of the default class count
    assert torch.equal(clf.blocks[0].attn.qkv.weight, module.model.blocks[0].attn.qkv.weight)
    cfg = compose(
        Path(__file__).parents[1] / "conf", "certify", [f"weights={out}", f"model={ARCH}"], tmp_path / "c"
    )
    with pytest.raises(ConfigError, match="holds the pre-training model dmae_vit_micro_patch8"):
        load_classifier(cfg, out, 10, "digits")


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"

    def error(*args: str) -> str:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("export: error: ") and err.count("\n") == 1, err
        return err

    assert "does not exist" in error(tmp_path / "missing", tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no checkpoints/last.ckpt: not a training run directory" in error(empty, tmp_path / "o2")

    official = tmp_path / "official" / "checkpoints"
    official.mkdir(parents=True)
    torch.save({"model": create_model(ARCH).state_dict()}, official / "last.ckpt")
    assert "records no architecture" in error(official.parent, tmp_path / "o3")

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["model.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    nan_run = tmp_path / "nan" / "checkpoints"
    nan_run.mkdir(parents=True)
    torch.save(ckpt, nan_run / "last.ckpt")
    assert "non-finite (NaN/Inf) weights in blocks.0.attn.qkv.weight" in error(
        nan_run.parent, tmp_path / "o4"
    )
    assert not (tmp_path / "o4").exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "cannot create" in error(run_dir, a_file / "sub")  # unwritable, even for root
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot create" in error(run_dir, locked / "out")
        assert "is not writable: choose another OUT_DIR" in error(run_dir, locked)
    with pytest.MonkeyPatch.context() as mp:  # a read-only OUT_DIR, as root too
        mp.setattr("dmae_lightning.jobs.export.os.access", lambda path, mode: False)
        assert "is not writable: choose another OUT_DIR" in error(run_dir, tmp_path / "read-only")
    assert not (tmp_path / "read-only").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "is not empty and holds no earlier export" in error(run_dir, other)

    cert = written_summary(tmp_path, "0" * 64)
    assert "certified another checkpoint (sha256 000000000000...)" in error(
        run_dir, tmp_path / "o5", "--certification", cert
    )
    predict = written_summary(tmp_path, "0" * 64, procedure="predict", accuracy=0.5)
    assert "procedure predict certifies no radius" in error(
        run_dir, tmp_path / "o6", "--certification", predict
    )
    assert "not a finished certification run (no summary.json)" in error(
        run_dir, tmp_path / "o7", "--certification", empty
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(5, 8))  # nothing written on bad input


def test_export_replaces_an_earlier_export(run_dir, tmp_path):
    out = tmp_path / "exported"
    export(run_dir, out)
    (out / "config.json").write_text((out / "config.json").read_text().replace('"epoch": 1', '"epoch": 0'))
    export(run_dir, out)
    assert json.loads((out / "config.json").read_text())["source"]["epoch"] == 1


def test_damaged_export_refused_in_one_line(run_dir, tmp_path):
    out = tmp_path / "exported"
    export(run_dir, out)
    model = create_model(ARCH, num_classes=10)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a loadable safetensors file") as err:
        load_weights(model, out)
    assert "\n" not in str(err.value)
    (out / "model.safetensors").write_bytes(data)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is damaged .*export the run again"):
        load_weights(model, out)
