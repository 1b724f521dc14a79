"""The fast ImageNet training pipelines ("tensor": reduced-size decoding + transforms.v2 on uint8; "device":
decoding and augmentation on the training device, here its CPU fallback) against the reference PIL pipeline:
same crop boxes and flips from the same seed, and the same pixels up to resampling differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dmae_lightning.data import ImageNetDataModule
from dmae_lightning.data.pipelines import DraftResizedCropFlip, draft_factor


def smooth_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random RGB picture (noise upsampled): resampling methods agree on it to a few levels."""
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def write_folder(root: Path, sizes: list[tuple[int, int]], per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(smooth_photo(rng, w, h)).save(
                    root / split / f"n{c:08d}" / f"{i}.JPEG", quality=95
                )
    return root


def first_batch(root: Path, pipeline: str, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    dm = ImageNetDataModule(root, batch_size=8, pipeline=pipeline, **kwargs)
    torch.manual_seed(seed)
    batch = next(iter(dm.train_dataloader()))
    return dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)


@pytest.mark.parametrize("pipeline", ["tensor", "device"])
def test_fast_pipelines_match_the_pil_pipeline(tmp_path: Path, pipeline: str):
    """Images under 448 pixels a side: no reduced decoding, so only the resampling code differs."""
    root = write_folder(tmp_path, [(300, 260), (257, 400), (500, 375)])
    ref_images, ref_labels = first_batch(root, "pil")
    images, labels = first_batch(root, pipeline)
    assert images.shape == ref_images.shape == (8, 3, 224, 224) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert torch.equal(labels, ref_labels)
    diff = (images - ref_images).abs()
    print(f"{pipeline}: mean |diff| {diff.mean() * 255:.3f}/255, max {diff.max() * 255:.1f}/255")
    assert diff.mean() < 1.0 / 255  # same boxes and flips: a wrong box or flip would differ by tens of levels
    assert diff.max() < 24.0 / 255
    other_seed, _ = first_batch(root, "pil", seed=1)
    assert (other_seed - ref_images).abs().mean() > 10.0 / 255  # the tolerance does separate different crops


def test_tensor_pipeline_decodes_large_crops_at_reduced_size(tmp_path: Path):
    """Against an independent computation: torchvision's box drawn from the same seed, snapped to the
    reduction's grid by hand, cut from the full-size decode and resized by PIL (bicubic)."""
    path = tmp_path / "big.JPEG"
    Image.fromarray(smooth_photo(np.random.default_rng(0), 1200, 1000)).save(path, quality=95)
    transform = DraftResizedCropFlip(224, (0.2, 1.0))
    factors = []
    for seed in range(6):
        torch.manual_seed(seed)
        got = transform(path.read_bytes()).float() / 255  # [3, 224, 224]
        full = Image.open(path).convert("RGB")
        torch.manual_seed(seed)
        top, left, h, w = transforms.RandomResizedCrop.get_params(full, [0.2, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        f = next((f for f in (8, 4, 2) if min(h, w) >= f * 224), 1)
        factors.append(f)
        top, left, h, w = (v // f * f for v in (top, left, h, w))
        ref = full.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        ref = torch.from_numpy(np.asarray(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ref))
        diff = (got - ref.permute(2, 0, 1).float() / 255).abs()
        print(
            f"seed {seed}: factor {f}, mean |diff| {diff.mean() * 255:.3f}/255, max {diff.max() * 255:.1f}/255"
        )
        assert diff.mean() < 1.5 / 255
    assert max(factors) >= 2  # scale 0.2-1 of 1200x1000: most boxes are >= 448 a side


def test_draft_factor():
    assert draft_factor(447, 2000, 224) == 1
    assert draft_factor(448, 900, 224) == 2
    assert draft_factor(900, 1000, 224) == 4
    assert draft_factor(1792, 1800, 224) == 8
    assert draft_factor(5000, 5000, 224) == 8  # libjpeg's smallest scale


def test_device_pipeline_reads_non_jpeg_files_too(tmp_path: Path):
    """ImageNet's train set holds a PNG named .JPEG: the batched JPEG decoder fails, the fallback decodes it."""
    root = write_folder(tmp_path, [(300, 260)], per_class=4)
    png = root / "train" / "n00000000" / "0.JPEG"
    Image.open(png).convert("RGB").save(png, format="PNG")
    images, _ = first_batch(root, "device")
    ref_images, _ = first_batch(root, "pil")
    assert (images - ref_images).abs().mean() < 1.0 / 255


def test_val_split_is_the_reference_eval_transform_for_every_pipeline(tmp_path: Path):
    root = write_folder(tmp_path, [(300, 260)], per_class=2)
    ref = ImageNetDataModule(root, pipeline="pil").dataset("val")
    for pipeline in ("tensor", "device"):
        val = ImageNetDataModule(root, pipeline=pipeline).dataset("val")
        assert all(torch.equal(val[i][0], ref[i][0]) for i in range(len(ref)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pipeline="dali"), "unknown pipeline 'dali' for imagenet"),
        (dict(pipeline="device", augment="randaug"), "pipeline='device' does augment='flip' only"),
    ],
)
def test_bad_pipeline_options(tmp_path: Path, kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        ImageNetDataModule(tmp_path, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG decoding)")
def test_device_pipeline_on_the_gpu_matches_its_cpu_fallback(tmp_path: Path):
    root = write_folder(tmp_path, [(300, 260), (500, 375)])
    dm = ImageNetDataModule(root, batch_size=8, pipeline="device")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    cpu_rng = torch.get_rng_state()
    on_cpu, _ = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    torch.set_rng_state(cpu_rng)
    on_gpu, labels = dm.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    assert on_gpu.is_cuda and labels.is_cuda
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 2.0 / 255  # nvJPEG's IDCT differs slightly from libjpeg's
