"""Checkpoint loading: every layout, built here in tmp_path (no downloads), compared on numbers; and files
that must be refused without running any of their code.

One test (at least) per layout that load_weights reads: official pre-training ``{'model': ...}``
(test_official_pretrain_reproduces_loss), official fine-tuned (test_official_finetuned_identical_logits), this
project's Lightning checkpoints (test_lightning_layout_identical_logits), bare state dicts (the DMAE authors'
issue #3: test_authors_bare_state_dict_issue_3, test_plain_state_dict_with_wrapper_prefixes), exported
directories (test_exported_directory_identical_logits_without_pickle; jobs/export.py writes them, tests/
test_export.py exports a real run) and plain safetensors files (test_plain_safetensors_file)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from dmae_lightning.models import create_model
from dmae_lightning.models.weights import (
    EXPORT_FORMAT,
    checkpoint_noise,
    load_weights,
    read_checkpoint,
)
from dmae_lightning.noise import GaussianNoise

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, 3, S, S]


def scramble(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every tensor differ from any fresh initialisation (as a trained model's would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def official_pretrain_ckpt(model) -> dict:
    sd = model.state_dict()
    return {
        "model": sd,
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
            },
            "param_groups": [{"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "params": [0]}],
        },
        "epoch": 5,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
        "args": argparse.Namespace(
            batch_size=64,
            model="mae_vit_base_patch16",
            mask_ratio=0.75,
            norm_pix_loss=True,
            blr=1.5e-4,
            lr=None,
            output_dir="./output_dir",
            resume="",
            sigma=0.25,
        ),
    }


def timm_names(model) -> list[str]:
    return sorted(model.state_dict())


# --- official pre-training layout --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(1)
    src = scramble(create_model("dmae_vit_micro_patch4"), seed=11)
    path = tmp_path_factory.mktemp("ckpt") / "dmae-pretrain.pth"
    torch.save(official_pretrain_ckpt(src), path)
    return src, path


def test_official_pretrain_reproduces_loss(pretrained):
    src, path = pretrained
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 5 and isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].sigma == 0.25

    torch.manual_seed(2)
    dst = create_model("dmae_vit_micro_patch4").eval()
    imgs = images(3)
    with torch.no_grad():
        before, _, _ = dst(imgs, generator=torch.Generator().manual_seed(0))
        report = load_weights(dst, path)
        after, pred, mask = dst(imgs, generator=torch.Generator().manual_seed(0))
        ref, ref_pred, ref_mask = src(imgs, generator=torch.Generator().manual_seed(0))
    assert report.layout == "official"
    assert report.dropped == [] and report.reinitialised == [] and report.interpolated == []
    assert torch.equal(after, ref) and torch.equal(pred, ref_pred) and torch.equal(mask, ref_mask)
    assert abs(float(before) - float(ref)) > 1e-3
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_official_pretrain_into_classifier_keeps_encoder_only(pretrained):
    src, path = pretrained
    torch.manual_seed(3)
    clf = create_model("vit_micro_patch4", num_classes=10).eval()
    fresh_head = clf.head.weight.detach().clone()
    report = load_weights(clf, path)

    assert report.reinitialised == ["fc_norm", "head"]
    assert all(k.startswith(("decoder_", "mask_token", "norm.")) for k in report.dropped)
    assert {"mask_token", "decoder_pred.weight", "decoder_pos_embed", "norm.weight", "norm.bias"} <= set(
        report.dropped
    )
    assert torch.equal(clf.head.weight, fresh_head)
    assert abs(float(clf.head.weight.detach().std()) / 2e-5 - 1) < 0.5
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert torch.equal(clf.state_dict()[key], src.state_dict()[key]), key

    # The classifier's block outputs are the source encoder's (no masking: mask_ratio 0 keeps every token,
    # shuffled, which attention does not see; undo the shuffle to compare).
    imgs = images(2)
    captured = []
    hook = clf.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        feats = clf.forward_features(imgs)
        latent, mask, ids_restore = src.forward_encoder(
            src.pixel_input(imgs), 0.0, torch.Generator().manual_seed(0)
        )
    hook.remove()
    assert mask.sum() == 0
    tokens = captured[0]  # [B, 1+L, D]
    src_patches = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    torch.testing.assert_close(src.norm(tokens)[:, 1:], src_patches, rtol=0, atol=1e-4)
    torch.testing.assert_close(src.norm(tokens)[:, 0], latent[:, 0], rtol=0, atol=1e-4)
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (64,), eps=1e-6)  # fresh fc_norm: weight 1, bias 0
    torch.testing.assert_close(feats, pooled, rtol=0, atol=1e-5)


# --- official fine-tuned layout (timm names) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_finetuned():
    """A fine-tuned classifier saved by timm's own VisionTransformer (global_pool avg -> fc_norm, no norm)."""
    torch.manual_seed(4)
    ref = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        global_pool="avg",
        fc_norm=True,
        qkv_bias=True,
    )
    return scramble(ref, seed=12)


def test_our_classifier_uses_timm_names(timm_finetuned):
    ours = create_model("vit_micro_patch4", num_classes=10)
    assert timm_names(ours) == timm_names(timm_finetuned)


@pytest.mark.parametrize("wrapped", [True, False], ids=["model-dict", "plain-state-dict"])
def test_official_finetuned_identical_logits(tmp_path, timm_finetuned, wrapped):
    sd = timm_finetuned.state_dict()
    assert "fc_norm.weight" in sd and not any(k.startswith("norm.") for k in sd)
    path = tmp_path / "finetuned.pth"
    torch.save({"model": sd, "epoch": 99, "args": argparse.Namespace(nb_classes=10)} if wrapped else sd, path)

    torch.manual_seed(5)
    clf = create_model("vit_micro_patch4", num_classes=10).eval()
    report = load_weights(clf, path)
    assert report.layout == ("official" if wrapped else "state_dict")
    assert report.reinitialised == [] and report.dropped == [] and report.interpolated == []
    imgs = images(4)
    with torch.no_grad():
        ours = clf(imgs)
        theirs = timm_finetuned((imgs - MEAN) / STD)  # timm's model takes normalised pixels
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_classifier_round_trip_identical_logits(tmp_path):
    torch.manual_seed(6)
    src = scramble(create_model("vit_micro_patch8", num_classes=3), seed=13)
    path = tmp_path / "clf.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = create_model("vit_micro_patch8", num_classes=3).eval()
    load_weights(dst, path)
    imgs = images(3)
    with torch.no_grad():
        assert torch.equal(dst(imgs), src(imgs))


# --- this project's Lightning layout and wrapper prefixes -------------------------------------------------


def lightning_ckpt(model, prefix: str = "model.") -> dict:
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)  # another submodule of the LightningModule: ignored
    return {
        "state_dict": state,
        "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": {
            "model": {"name": "vit_micro_patch4", "num_classes": 10},
            "lr": 5e-4,
            "sigma": 0.25,
            "betas": (0.9, 0.999),
            "tags": ["a", "b"],
            "ckpt": None,
        },
        "epoch": 1,
        "global_step": 10,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 10, "_step_count": 11}],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": {"best_model_score": torch.tensor(0.5)}},
    }


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod.", "model.module."])
def test_lightning_layout_identical_logits(tmp_path, prefix):
    torch.manual_seed(7)
    src = scramble(create_model("vit_micro_patch4", num_classes=10), seed=14)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(src, prefix), path)
    dst = create_model("vit_micro_patch4", num_classes=10).eval()
    report = load_weights(dst, path)
    assert report.layout == "lightning" and report.reinitialised == [] and report.dropped == []
    imgs = images(2)
    with torch.no_grad():
        assert torch.equal(dst(imgs), src(imgs))


def test_lightning_pretrain_layout_into_pretrain_model(tmp_path):
    torch.manual_seed(8)
    src = scramble(create_model("dmae_vit_micro_patch8"), seed=15)
    path = tmp_path / "pretrain.ckpt"
    torch.save(lightning_ckpt(src), path)
    dst = create_model("dmae_vit_micro_patch8").eval()
    load_weights(dst, path)
    imgs = images(2)
    with torch.no_grad():
        a = dst(imgs, generator=torch.Generator().manual_seed(1))[0]
        b = src(imgs, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_plain_state_dict_with_wrapper_prefixes(tmp_path, prefix):
    torch.manual_seed(9)
    src = scramble(create_model("vit_micro_patch4", num_classes=10), seed=16)
    path = tmp_path / "plain.pth"
    torch.save({f"{prefix}{k}": v for k, v in src.state_dict().items()}, path)
    dst = create_model("vit_micro_patch4", num_classes=10).eval()
    assert load_weights(dst, path).layout == "state_dict"
    imgs = images(2)
    with torch.no_grad():
        assert torch.equal(dst(imgs), src(imgs))


def test_authors_bare_state_dict_issue_3(tmp_path, pretrained):
    """The DMAE authors' issue #3: a bare state dict (``torch.save(model.state_dict())``, no 'model' entry) where
    their script expects ``checkpoint['model']``; read as it is, into the pre-training model and a classifier."""
    src, _ = pretrained
    path = tmp_path / "dmae_bare.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("dmae_vit_micro_patch4").eval()
    assert load_weights(dst, path).layout == "state_dict"
    imgs = images(2)
    with torch.no_grad():
        a = dst(imgs, generator=torch.Generator().manual_seed(1))
        b = src(imgs, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    clf = create_model("vit_micro_patch4", num_classes=10)
    report = load_weights(clf, path)
    assert report.layout == "state_dict" and report.reinitialised == ["fc_norm", "head"]
    assert torch.equal(clf.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


# --- exported directories (jobs/export.py) and safetensors files: no pickle ---------------------------------


def refuse_torch_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) called on a safetensors layout")

    monkeypatch.setattr(torch, "load", refuse)


def write_export(directory: Path, model, name: str, **config) -> Path:
    """An exported directory as jobs/export.py lays it out: model.safetensors and config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), directory / "model.safetensors", metadata={"format": "pt"})
    config = {"format": EXPORT_FORMAT, "format_version": 1, "architecture": name, **config}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_exported_directory_identical_logits_without_pickle(tmp_path, monkeypatch):
    torch.manual_seed(12)
    src = scramble(create_model("vit_micro_patch8", num_classes=3), seed=19)
    noise = GaussianNoise(0.5).config()
    out = write_export(
        tmp_path / "export",
        src,
        "vit_micro_patch8",
        model_kwargs={"img_size": 32},
        num_classes=3,
        noise=noise,
        objective={"name": "gaussian", "copies": 1},
        training={"label_smoothing": 0.1},
    )
    refuse_torch_load(monkeypatch)
    dst = create_model("vit_micro_patch8", num_classes=3).eval()
    report = load_weights(dst, out)
    assert report.layout == "exported" and str(report) == "every tensor loaded as is"
    built = create_model("vit_micro_patch8", pretrained=out).eval()  # num_classes=3 from config.json
    imgs = images(3)
    with torch.no_grad():
        assert torch.equal(dst(imgs), src(imgs)) and torch.equal(built(imgs), src(imgs))
    # the shape of a Lightning checkpoint, so that the readers of hyper_parameters need nothing else
    ckpt = read_checkpoint(out)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in src.state_dict()}
    assert ckpt["hyper_parameters"] == {
        "label_smoothing": 0.1,
        "model_name": "vit_micro_patch8",
        "model_kwargs": {"img_size": 32},
        "num_classes": 3,
        "noise": noise,
        "objective": {"name": "gaussian", "copies": 1},
    }
    assert checkpoint_noise(out) == GaussianNoise(0.5)
    with pytest.raises(ValueError, match="holds a vit_micro_patch8, not a vit_micro_patch4"):
        create_model("vit_micro_patch4", pretrained=out)
    assert create_model("vit_micro_patch8", pretrained=out, num_classes=5).head.out_features == 5  # overrides


def test_plain_safetensors_file(tmp_path, monkeypatch, timm_finetuned):
    """A .safetensors state dict (timm's Hugging Face releases), as a file or a snapshot directory whose
    config.json is not ours: a plain state dict."""
    path = tmp_path / "timm.safetensors"
    save_file(timm_finetuned.state_dict(), path)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    save_file(timm_finetuned.state_dict(), snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    refuse_torch_load(monkeypatch)
    for source in (path, snapshot):
        clf = create_model("vit_micro_patch4", num_classes=10).eval()
        assert load_weights(clf, source).layout == "state_dict"
        with torch.no_grad():
            torch.testing.assert_close(
                clf(images(2)), timm_finetuned((images(2) - MEAN) / STD), rtol=0, atol=1e-5
            )
        assert checkpoint_noise(source) is None


def test_damaged_safetensors_and_exports_refused(tmp_path):
    model = create_model("vit_micro_patch8")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(random.Random(0).randbytes(300))
    with pytest.raises(ValueError, match="is not a loadable safetensors file") as err:
        load_weights(model, bad)
    assert_one_line(err)
    out = write_export(tmp_path / "future", model, "vit_micro_patch8")
    (out / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99, this code reads up to 1"):
        load_weights(model, out)
    nan = create_model("vit_micro_patch8")
    with torch.no_grad():
        nan.head.weight[0, 0] = float("nan")
    out = write_export(tmp_path / "nan", nan, "vit_micro_patch8")
    with pytest.raises(ValueError, match=r"non-finite \(NaN/Inf\) weights in head.weight"):
        load_weights(model, out)


# --- position-embedding interpolation and head re-initialisation ------------------------------------------


def test_pos_embed_interpolated_to_a_larger_grid(tmp_path):
    torch.manual_seed(10)
    src = scramble(create_model("vit_micro_patch4", num_classes=10), seed=17)  # 32/4: 8x8 grid
    path = tmp_path / "small.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = create_model("vit_micro_patch4", num_classes=10, img_size=64).eval()  # 16x16 grid
    report = load_weights(dst, path)

    old = src.pos_embed.detach()  # [1, 65, 64]
    assert dst.pos_embed.shape == (1, 257, 64)
    assert report.interpolated == ["pos_embed 8x8->16x16"]
    torch.testing.assert_close(dst.pos_embed[:, :1], old[:, :1], rtol=0, atol=0)  # cls row unchanged
    expected = resample_abs_pos_embed(old, new_size=[16, 16], old_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=0)
    # The same by hand: bicubic on the 8x8 grid of D-channel vectors, row-major patch order. timm resamples
    # with antialias=True, whose cubic kernel (a=-0.5) differs from the plain one (a=-0.75) of MAE's
    # interpolate_pos_embed even when upsampling; the paper's recipes never change the grid.
    grid = old[:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)  # [1, D, 8, 8]
    by_hand = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    by_hand = by_hand.permute(0, 2, 3, 1).reshape(1, 256, 64)  # [1, 256, D]
    torch.testing.assert_close(dst.pos_embed[:, 1:].detach(), by_hand, rtol=0, atol=1e-6)
    # Everything else is copied as is, and the model runs at its new size.
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert dst(images(1, size=64)).shape == (1, 10)


def test_pretrain_pos_embeds_interpolated(pretrained):
    _, path = pretrained
    dst = create_model("dmae_vit_micro_patch4", img_size=64)
    report = load_weights(dst, path)
    assert report.interpolated == ["pos_embed 8x8->16x16", "decoder_pos_embed 8x8->16x16"]
    assert dst.decoder_pos_embed.shape == (1, 257, 64)


def test_head_reinitialised_when_class_count_differs(tmp_path):
    torch.manual_seed(11)
    src = scramble(create_model("vit_micro_patch4", num_classes=10), seed=18)
    path = tmp_path / "ten.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = create_model("vit_micro_patch4", num_classes=5)
    fresh_w, fresh_b = dst.head.weight.detach().clone(), dst.head.bias.detach().clone()
    report = load_weights(dst, path)
    assert report.reinitialised == ["head"]
    assert report.dropped == ["head.weight", "head.bias"]
    assert torch.equal(dst.head.weight, fresh_w) and torch.equal(dst.head.bias, fresh_b)
    assert dst.head.weight.shape == (5, 64)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for key in src_sd:
        if not key.startswith("head."):
            assert torch.equal(dst_sd[key], src_sd[key]), key


# --- files that must be refused ------------------------------------------------------------------------------


def write_marker(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    """Unpickling this object calls write_marker: it must never happen inside load_weights."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (write_marker, (self.marker,))


class TaggedDict(collections.OrderedDict):
    pass


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 400
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text
    return text


def test_payload_would_run_under_plain_pickle(tmp_path):
    """Sanity check of the test's own payload: ordinary unpickling does run it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["top", "args", "model"])
def test_code_in_checkpoint_is_never_run(tmp_path, where):
    marker = tmp_path / "ran"
    sd = create_model("vit_micro_patch8").state_dict()
    obj = {
        "top": Payload(marker),
        "args": {"model": sd, "args": Payload(marker)},
        "model": {"model": {**sd, "extra": Payload(marker)}},
    }[where]
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    with pytest.raises(
        ValueError, match=r"is not a loadable PyTorch checkpoint: it holds a pickled .*write_marker"
    ):
        load_weights(create_model("vit_micro_patch8"), path)
    assert not marker.exists()
    with pytest.raises(ValueError) as err:
        read_checkpoint(path)
    assert_one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [
        (datetime.datetime(2024, 1, 2, 3, 4, 5), "datetime.datetime"),
        (TaggedDict(w=torch.zeros(2)), "TaggedDict"),
        ({"model": {"w": torch.zeros(2)}, "when": datetime.date(2024, 1, 1)}, "datetime.date"),
    ],
    ids=["datetime", "ordereddict-subclass", "date-inside-dict"],
)
def test_arbitrary_objects_refused(tmp_path, obj, name):
    path = tmp_path / "obj.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="is not a loadable PyTorch checkpoint") as err:
        load_weights(create_model("vit_micro_patch8"), path)
    assert name in assert_one_line(err)


def test_not_a_checkpoint(tmp_path):
    model = create_model("vit_micro_patch8")
    noise = tmp_path / "random.bin"
    noise.write_bytes(random.Random(0).randbytes(4096))
    text = tmp_path / "notes.txt"
    text.write_text("epoch 5\nloss 0.3\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    zipped = tmp_path / "bad.zip"
    zipped.write_bytes(b"PK\x03\x04" + random.Random(1).randbytes(200))
    for path in (noise, text, empty, zipped):
        with pytest.raises(
            ValueError, match=r"is not a loadable PyTorch checkpoint: damaged or not in PyTorch's"
        ) as err:
            load_weights(model, path)
        assert str(path) in assert_one_line(err)

    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        load_weights(model, tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        load_weights(model, tmp_path)  # a directory

    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="is not a checkpoint: it holds a list, not a dict"):
        load_weights(model, listed)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    with pytest.raises(ValueError, match=r"is not a model checkpoint: .*found keys \['epoch', 'lr'\]"):
        load_weights(model, other)
    no_tensors = tmp_path / "no-tensors.pth"
    torch.save({"model": {"epoch": 3}}, no_tensors)
    with pytest.raises(ValueError, match="holds no model tensors"):
        load_weights(model, no_tensors)


# --- tensors that do not fit -----------------------------------------------------------------------------------


def test_mismatched_checkpoint_names_missing_unexpected_and_misshaped(tmp_path):
    src = create_model("dmae_vit_micro_patch4", depth=3, embed_dim=96, num_heads=2)
    sd = src.state_dict()
    del sd["norm.weight"]  # missing
    path = tmp_path / "other.pth"
    torch.save({"model": sd}, path)
    dst = create_model("dmae_vit_micro_patch4")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_weights(dst, path)
    text = str(err.value)
    assert "\n" not in text
    assert f"{path} does not fit DMAEViT (official layout)" in text
    assert "missing: norm.weight" in text
    assert "unexpected: blocks.2." in text
    assert "mis-shaped (file vs model): " in text and "blocks.0.attn.proj.weight (96, 96) vs (64, 64)" in text
    assert "and " in text and " more" in text  # long lists are shortened
    # Nothing was loaded.
    for key, value in dst.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(depth=1), "missing: blocks.1.attn.proj.bias"),
        (dict(depth=3), "unexpected: blocks.2.attn.proj.bias"),
        (dict(embed_dim=32), "mis-shaped (file vs model): blocks.0.attn.proj.bias (32,) vs (64,)"),
    ],
    ids=["shallower", "deeper", "narrower"],
)
def test_other_depth_or_width_refused(tmp_path, overrides, expected):
    path = tmp_path / "clf.pth"
    torch.save({"model": create_model("vit_micro_patch4", **overrides).state_dict()}, path)
    with pytest.raises(ValueError, match="does not fit VisionTransformerClassifier") as err:
        load_weights(create_model("vit_micro_patch4"), path)
    assert expected in str(err.value)


def test_pretrain_checkpoint_needs_its_decoder(tmp_path):
    """A classifier checkpoint has no decoder: a pre-training model must not silently keep a random one."""
    path = tmp_path / "clf.pth"
    torch.save(create_model("vit_micro_patch4").state_dict(), path)
    with pytest.raises(
        ValueError, match=r"missing: .*decoder_.*; unexpected: fc_norm.bias, fc_norm.weight, head"
    ):
        load_weights(create_model("dmae_vit_micro_patch4"), path)


def test_load_report_is_one_short_line():
    """An official pre-training file drops two dozen decoder keys: the log line counts them (issue 14.6)."""
    from dmae_lightning.models.weights import LoadReport

    dropped = [f"decoder_blocks.{i}.weight" for i in range(23)]
    report = LoadReport(layout="official", reinitialised=["head"], dropped=dropped)
    assert str(report) == (
        "fresh 1 (head); dropped 23 (decoder_blocks.0.weight, decoder_blocks.1.weight, "
        "decoder_blocks.2.weight and 20 more)"
    )
    assert str(LoadReport(layout="lightning")) == "every tensor loaded as is"
