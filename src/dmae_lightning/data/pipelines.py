"""Faster ImageNet training pipelines: the same RandomResizedCrop + flip, decoded and resized more cheaply.

``pipeline`` option of the ImageNet data module (training split only; val/test keep the reference PIL
eval transform, so certification inputs do not change):

- ``pil``: the reference, torchvision's v1 transforms on full-size PIL images.
- ``tensor``: JPEGs decoded at 1/2, 1/4 or 1/8 size when the drawn crop is still at least the output
  size there (PIL's ``draft``, libjpeg's DCT scaling: the skipped resolution would only be averaged away),
  then the crop and resize as ``torchvision.transforms.v2`` on uint8 tensors.
- ``device``: workers only read file bytes; decoding (``torchvision.io.decode_jpeg``, nvJPEG on a GPU),
  crop, resize and flip run on the training device when the batch is transferred, so CPU cores stop
  being the limit. On a CPU device the same code runs on the CPU (the fallback the tests exercise).

Every path draws its crop box and flip the way torchvision's RandomResizedCrop and RandomHorizontalFlip
do (same generator calls, same order) and returns [0,1] float images [3, 224, 224].
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

PIPELINES = ("pil", "tensor", "device")
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
DRAFT_FACTORS = (8, 4, 2)  # the reductions libjpeg can decode at directly


def read_file(path: str | Path) -> bytes:
    """An ImageFolder loader that decodes nothing: the training decoders below take the encoded bytes,
    so the folder and the streaming shards (which store the same bytes) share them."""
    return Path(path).read_bytes()


def open_lazy(data: bytes) -> Image.Image:
    """The image header only: pixels are decoded on first use, so ``draft`` can still shrink them."""
    return Image.open(io.BytesIO(data))


def open_rgb(data: bytes) -> Image.Image:
    return open_lazy(data).convert("RGB")


def bytes_tensor(data: bytes) -> torch.Tensor:
    """The encoded file as uint8 [N], what the device pipeline ships to the training device. An empty file is
    an OSError, as PIL's for a file it cannot read (torch.frombuffer would raise a ValueError)."""
    if not data:
        raise OSError("empty file: nothing to decode")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def draw_crop_flip(image, scale: tuple[float, float]) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) drawn exactly as RandomResizedCrop then RandomHorizontalFlip do.

    ``image`` is anything torchvision reads a size from without decoding (a lazy PIL image, a tensor).
    """
    top, left, height, width = transforms.RandomResizedCrop.get_params(image, list(scale), list(RATIO))
    flip = bool(torch.rand(1) < 0.5)
    return top, left, height, width, flip


def draft_factor(height: int, width: int, size: int) -> int:
    """The largest JPEG reduction at which a height x width crop still has at least ``size`` pixels a side."""
    return next((f for f in DRAFT_FACTORS if min(height, width) >= f * size), 1)


class DraftResizedCropFlip:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip of an encoded image -> uint8 [3, S, S].

    Only the header is read to draw the box. A box of at least 2x the output size a side is decoded by
    PIL at 1/2, 1/4 or 1/8 scale (``draft``); otherwise a JPEG goes through torchvision's libjpeg-turbo
    decoder straight into a CHW tensor (faster than PIL plus a copy); other formats through PIL.
    """

    def __init__(self, size: int, scale: tuple[float, float]):
        low, high = scale  # any pair: a tuple or a list
        self.size, self.scale = size, (low, high)

    def __call__(self, data: bytes) -> torch.Tensor:
        img = open_lazy(data)
        top, left, height, width, flip = draw_crop_flip(img, self.scale)
        factor = draft_factor(height, width, self.size)
        if factor > 1:
            # Pixel k of the reduced image covers full-size pixels [k*f, (k+1)*f): a box on multiples of f
            # (moved and shrunk by under f pixels, against >= 2*224 a side) is exact at the reduced size.
            img.draft("RGB", (math.ceil(img.size[0] / factor), math.ceil(img.size[1] / factor)))
            top, left, height, width = (v // factor for v in (top, left, height, width))
            pixels = TF.pil_to_tensor(img.convert("RGB"))  # uint8 [3, H/f, W/f]
        elif img.format == "JPEG":
            pixels = decode_jpeg(bytes_tensor(data), mode=ImageReadMode.RGB)  # uint8 [3, H, W]
        else:
            pixels = TF.pil_to_tensor(img.convert("RGB"))  # uint8 [3, H, W]
        crop = TF.resized_crop(
            pixels,
            top,
            left,
            height,
            width,
            [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )  # uint8 [3, S, S]
        return TF.horizontal_flip(crop) if flip else crop


def tensor_train_transform(size: int, scale: tuple[float, float], randaug=None) -> v2.Compose:
    """The ``tensor`` pipeline on encoded bytes: reduced-size or libjpeg-turbo decoding, uint8
    crop/resize/flip, optional (PIL) RandAugment, [0,1] float."""
    steps = [DraftResizedCropFlip(size, scale)]
    if randaug is not None:  # timm's RandAugment works on PIL images: 224x224 round trips are cheap
        steps += [v2.ToPILImage(), randaug, v2.PILToTensor()]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])  # float [3, S, S] in [0,1]


def collate_bytes(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batches of encoded files differ in length: keep them as a list (default_collate would stack)."""
    return [data for data, _ in samples], torch.tensor([label for _, label in samples])


def decode_crop_flip(
    encoded: list[torch.Tensor], device: torch.device | str, size: int, scale: tuple[float, float]
) -> torch.Tensor:
    """The ``device`` pipeline: decode a batch of JPEG files on ``device`` and crop, resize, flip there.

    Returns float [B, 3, size, size] in [0,1]. The resize is torchvision's on uint8 (bicubic, antialiased,
    rounded and clamped as the tensor pipeline's), which runs in float internally on a GPU.
    """
    device = torch.device(device)
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # B x uint8 [3, H_i, W_i]
    except RuntimeError:  # a file that is not a baseline JPEG (ImageNet's train set holds a PNG): one by one
        images = [decode_image(data, mode=ImageReadMode.RGB).to(device) for data in encoded]
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)  # [B, 3, S, S]
    for k, image in enumerate(images):
        top, left, height, width, flip = draw_crop_flip(image, scale)
        crop = TF.resized_crop(
            image,
            top,
            left,
            height,
            width,
            [size, size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )  # uint8 [3, S, S]
        out[k] = TF.horizontal_flip(crop) if flip else crop
    return out.float().div_(255)
