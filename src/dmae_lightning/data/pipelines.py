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
  During training on a GPU, :class:`DecodePrefetcher` decodes the next batch on a side stream while the
  training step runs on the current stream (:func:`prefetching_loader`).

Every path draws its crop box and flip the way torchvision's RandomResizedCrop and RandomHorizontalFlip
do (same generator calls, same order) and returns [0,1] float images [3, 224, 224].
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
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


# --- decode of batch t+1 overlapped with the training step on batch t ----------------------------------------


@dataclass(frozen=True)
class StreamApi:
    """The stream operations of :class:`DecodePrefetcher`: ``torch.cuda``'s on a GPU (:meth:`cuda`), fakes that
    record the calls in the tests.

    ``new_stream()``: the producer's side stream. ``new_event()``: an event with ``record(stream)``.
    ``current_stream()``: the consumer's stream when it receives a batch (it has ``wait_event(event)``).
    ``use_stream(stream)``: a context in which launched work is queued on ``stream``.
    """

    new_stream: Callable[[], Any]
    new_event: Callable[[], Any]
    current_stream: Callable[[], Any]
    use_stream: Callable[[Any], AbstractContextManager[Any]]

    @classmethod
    def cuda(cls, device: torch.device) -> StreamApi:
        return cls(
            new_stream=lambda: torch.cuda.Stream(device),
            new_event=torch.cuda.Event,
            current_stream=lambda: torch.cuda.current_stream(device),
            use_stream=torch.cuda.stream,
        )


class DecodedImages:
    """One batch of the device pipeline on its way to the consumer; ``receive()`` returns its images (float
    [B, 3, S, S]) on the consumer's side (the data module's ``transfer_batch_to_device``).

    Launched on a side stream: ``receive`` makes the consumer's current stream wait on the producer's event
    (queued on the device, the host does not block) and records the images on that stream, so the caching
    allocator does not give their memory back to the producer stream before the consumer's work on them has
    run. Deferred (the synchronous fallback): the decode runs in ``receive``, where the serial pipeline runs it.
    """

    __slots__ = ("_decode", "_encoded", "_event", "_images", "_streams")

    def __init__(
        self,
        images: torch.Tensor | None = None,
        event: Any = None,
        streams: StreamApi | None = None,
        decode: Callable[[Any], torch.Tensor] | None = None,
        encoded: Any = None,
    ):
        self._images, self._event, self._streams = images, event, streams
        self._decode, self._encoded = decode, encoded

    def receive(self) -> torch.Tensor:
        if self._images is None:  # deferred: decode now, once
            assert self._decode is not None
            self._images, self._decode, self._encoded = self._decode(self._encoded), None, None
        if self._event is not None:
            assert self._streams is not None
            consumer = self._streams.current_stream()
            consumer.wait_event(self._event)  # the consumer's later work runs after the decode
            self._images.record_stream(consumer)  # freed: reused only after the consumer's work on it
        return self._images


class DecodePrefetcher:
    """Decodes batch t+1 while the consumer works on batch t.

    ``prefetcher(batches)`` turns ``(encoded, *rest)`` batches into ``(DecodedImages, *rest)``. With
    ``streams`` (a GPU), before it hands batch t over it fetches batch t+1 and launches ``decode`` of it on a
    side stream, recording an event there; the consumer receives batch t after its stream waits on batch t's
    event, so decode t+1 (side stream) runs on the device while the step on batch t (consumer stream) does.
    The input stays in host memory (decode_jpeg copies it), so the side stream waits on nothing.
    Without streams (the CPU fallback) nothing runs ahead: each batch is decoded when it is received,
    exactly the serial pipeline (same work, same random draws at the same point).

    A failure while fetching or decoding batch t+1 is raised after batch t has been handed over, where the
    serial pipeline would have raised it; the last batch is handed over when the source runs out.
    """

    def __init__(self, decode: Callable[[Any], torch.Tensor], streams: StreamApi | None = None):
        self.decode, self.streams = decode, streams

    @classmethod
    def for_device(
        cls, decode: Callable[[Any], torch.Tensor], device: torch.device | str
    ) -> DecodePrefetcher:
        """Side-stream decoding on a CUDA device, the synchronous fallback on any other."""
        device = torch.device(device)
        return cls(decode, StreamApi.cuda(device) if device.type == "cuda" else None)

    def __call__(self, batches: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        if self.streams is None:
            return ((DecodedImages(decode=self.decode, encoded=encoded), *rest) for encoded, *rest in batches)
        return self._ahead(iter(batches), self.streams)

    def _launch(self, producer: Any, streams: StreamApi, encoded: Any) -> DecodedImages:
        with streams.use_stream(producer):
            images = self.decode(encoded)
            event = streams.new_event()
            event.record(producer)
        return DecodedImages(images, event, streams)

    def _ahead(self, batches: Iterator[tuple[Any, ...]], streams: StreamApi) -> Iterator[tuple[Any, ...]]:
        producer = streams.new_stream()
        try:
            encoded, *rest = next(batches)
        except StopIteration:
            return
        pending = (self._launch(producer, streams, encoded), *rest)  # a failure here: nothing to hand over
        while True:
            try:
                encoded, *rest = next(batches)
            except StopIteration:
                yield pending  # the last batch
                return
            except Exception:
                yield pending  # batch t is good: hand it over, then fail where the serial pipeline would
                raise
            try:
                upcoming = (self._launch(producer, streams, encoded), *rest)
            except Exception:
                yield pending
                raise
            yield pending
            pending = upcoming


class _PrefetchingLoader(DataLoader):
    """What :func:`prefetching_loader` adds to a loader's class: iteration through the prefetcher that its
    ``decode_prefetcher()`` returns when an epoch starts (None: the plain batches)."""

    decode_prefetcher: Callable[[], DecodePrefetcher | None] | None = None
    _delivered_state: dict | None = None  # the loader's position after the last batch handed over

    def __iter__(self):  # the loader's iterator, or a generator over the prefetcher's batches
        make = self.decode_prefetcher
        prefetcher = make() if make is not None else None
        if prefetcher is None:
            return super().__iter__()
        return self._through(prefetcher)

    def _position(self) -> dict | None:
        return None

    def _through(self, prefetcher: DecodePrefetcher) -> Iterator[tuple[Any, ...]]:
        self._delivered_state = None
        batches = super().__iter__()
        source = ((*batch, self._position()) for batch in batches)  # the position right after each fetch
        for *batch, position in prefetcher(source):
            self._delivered_state = position
            yield tuple(batch)


class _StatefulPrefetchingLoader(_PrefetchingLoader):
    """For a loader with a position (litdata's): running one batch ahead, it has fetched one batch more than it
    has handed over; ``state_dict`` gives the position after the last batch handed over, so a checkpoint
    resumes at the batch the step did not see."""

    def _position(self) -> dict | None:
        return copy.deepcopy(super().state_dict())  # type: ignore[misc]  # litdata updates its dict in place

    def state_dict(self) -> dict:
        if self._delivered_state is not None:
            return copy.deepcopy(self._delivered_state)
        return super().state_dict()  # type: ignore[misc]


_PREFETCHING_CLASSES: dict[type, type[DataLoader]] = {}  # one subclass per loader class


def _prefetching_class(base: type[DataLoader]) -> type[DataLoader]:
    if base not in _PREFETCHING_CLASSES:
        mixin = _StatefulPrefetchingLoader if hasattr(base, "state_dict") else _PrefetchingLoader
        _PREFETCHING_CLASSES[base] = type(f"Prefetching{base.__name__}", (mixin, base), {})
    return _PREFETCHING_CLASSES[base]


def prefetching_loader(
    loader: DataLoader, decode_prefetcher: Callable[[], DecodePrefetcher | None]
) -> DataLoader:
    """``loader`` (of ``(encoded, labels)`` batches) iterating through ``decode_prefetcher()``, called when
    each epoch starts (None: the plain batches, as before).

    The loader's class becomes a subclass of its own with that iteration, so it stays the same kind of
    loader for Lightning (its length, its distributed sampler, which Lightning adds by building the loader
    again with the same class and attributes, and litdata's position, see _StatefulPrefetchingLoader).
    """
    loader.__class__ = _prefetching_class(type(loader))
    loader.decode_prefetcher = decode_prefetcher
    return loader
