"""Issue 26 item 4: the device pipeline decodes batch t+1 on a side stream while the step on batch t runs.

The ordering logic (DecodePrefetcher) runs here with fake streams and events that record every call: the
producer launches decode t+1 inside its stream before the consumer receives batch t, the consumer's stream
waits on batch t's event before batch t is used and the images are recorded on the consumer's stream; the
last batch, an empty source and failures in fetching or decoding are handled; results equal the serial
pipeline's. The CPU fallback (no streams) decodes each batch when it is received, bit for bit today's path.
Then the data module: under a trainer its loader goes through the prefetcher (Lightning fit included), keeps
its class for Lightning's distributed sampler and, streamed, reports the position of the batches handed over.
The tests with real CUDA streams skip without a GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers.imagenet import write_imagenet
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from dmae_lightning.data import ImageNetDataModule
from dmae_lightning.data.pipelines import (
    DecodedImages,
    DecodePrefetcher,
    StreamApi,
    bytes_tensor,
    decode_crop_flip,
    prefetching_loader,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SCALE = (0.2, 1.0)  # the device pipeline's crop scale (augment="flip")


# --- fakes that record the order of stream operations ----------------------------------------------------
class FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event.name))


class FakeEvent:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", self.name, stream.name))


class FakeImages:
    """What the fake decode returns: notes the stream it is recorded on."""

    def __init__(self, log: list, batch: int):
        self.log, self.batch = log, batch

    def record_stream(self, stream: FakeStream) -> None:
        self.log.append(("record_stream", self.batch, stream.name))


class Recorded(torch.Tensor):
    """A real (CPU) tensor whose record_stream, CUDA's only, accepts a fake stream."""

    def record_stream(self, stream) -> None:
        pass


def fake_streams(log: list) -> StreamApi:
    """Events are named e0, e1, ... in the order they are made (one per launched batch)."""
    consumer, numbers = FakeStream(log, "consumer"), itertools.count()

    def new_stream() -> FakeStream:
        log.append(("new_stream", "side"))
        return FakeStream(log, "side")

    @contextmanager
    def use_stream(stream: FakeStream) -> Iterator[None]:
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    return StreamApi(
        new_stream=new_stream,
        new_event=lambda: FakeEvent(log, f"e{next(numbers)}"),
        current_stream=lambda: consumer,
        use_stream=use_stream,
    )


def logging_decode(log: list, fail_at: int | None = None):
    def decode(batch: int) -> FakeImages:
        if batch == fail_at:
            raise OSError(f"cannot decode batch {batch}")
        log.append(("decode", batch))
        return FakeImages(log, batch)

    return decode


def consume(log: list, batches) -> None:
    """The consumer: what the training loop and transfer_batch_to_device do with each batch."""
    for images, label in batches:
        log.append(("got", label))
        received = images.receive()
        log.append(("use", received.batch))


def launch(batch: int) -> list:
    return [("enter", "side"), ("decode", batch), ("record", f"e{batch}", "side"), ("exit", "side")]


def receive(batch: int) -> list:
    return [
        ("got", f"y{batch}"),
        ("wait", "consumer", f"e{batch}"),
        ("record_stream", batch, "consumer"),
        ("use", batch),
    ]


# --- the ordering logic ---------------------------------------------------------------------------------
def test_producer_decodes_one_batch_ahead_and_the_consumer_waits_on_its_event():
    log: list = []
    prefetcher = DecodePrefetcher(logging_decode(log), fake_streams(log))
    consume(log, prefetcher([(t, f"y{t}") for t in range(3)]))
    assert log == [
        ("new_stream", "side"),
        *launch(0),
        *launch(1),  # decode of batch 1 is queued before the consumer gets batch 0
        *receive(0),  # the consumer's stream waits on e0, then records batch 0 on itself, then uses it
        *launch(2),
        *receive(1),
        *receive(2),  # the last batch: the source is exhausted, nothing more to launch
    ]
    for t in range(2):
        assert log.index(("decode", t + 1)) < log.index(("got", f"y{t}"))
        assert log.index(("wait", "consumer", f"e{t}")) < log.index(("use", t))


@pytest.mark.parametrize("count", [0, 1])
def test_empty_source_and_a_single_batch(count: int):
    log: list = []
    prefetcher = DecodePrefetcher(logging_decode(log), fake_streams(log))
    consume(log, prefetcher([(t, f"y{t}") for t in range(count)]))
    assert log == [("new_stream", "side"), *(launch(0) + receive(0) if count else [])]


def test_a_decode_failure_is_raised_after_the_batch_before_it():
    log: list = []
    prefetcher = DecodePrefetcher(logging_decode(log, fail_at=2), fake_streams(log))
    with pytest.raises(OSError, match="cannot decode batch 2"):
        consume(log, prefetcher([(t, f"y{t}") for t in range(4)]))
    assert log == [
        ("new_stream", "side"),
        *launch(0),
        *launch(1),
        *receive(0),
        ("enter", "side"),
        *receive(1),
    ]


def test_a_failure_on_the_first_batch_hands_nothing_over():
    log: list = []
    prefetcher = DecodePrefetcher(logging_decode(log, fail_at=0), fake_streams(log))
    with pytest.raises(OSError, match="cannot decode batch 0"):
        consume(log, prefetcher([(t, f"y{t}") for t in range(3)]))
    assert ("got", "y0") not in log


def test_a_fetch_failure_is_raised_after_the_batch_before_it():
    """A broken file raises in the loader (BrokenImageError) while batch t+1 is fetched: batch t still goes."""
    log: list = []

    def source():
        yield 0, "y0"
        yield 1, "y1"
        raise OSError("image 9 cannot be decoded")

    prefetcher = DecodePrefetcher(logging_decode(log), fake_streams(log))
    with pytest.raises(OSError, match="image 9"):
        consume(log, prefetcher(source()))
    assert log == [("new_stream", "side"), *launch(0), *launch(1), *receive(0), *receive(1)]


def test_the_cpu_fallback_decodes_each_batch_when_it_is_received():
    log: list = []
    prefetcher = DecodePrefetcher.for_device(logging_decode(log), "cpu")
    assert prefetcher.streams is None
    consume(log, prefetcher([(t, f"y{t}") for t in range(3)]))
    assert log == [entry for t in range(3) for entry in [("got", f"y{t}"), ("decode", t), ("use", t)]]


# --- results equal the serial pipeline's -----------------------------------------------------------------
def encoded_batches(tmp_path: Path, batches: int = 3, size: int = 2) -> list[list[torch.Tensor]]:
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(300, 260), (257, 400), (500, 375)] * batches * size):
        pixels = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC).save(
            tmp_path / f"{i}.jpg", quality=90
        )
        files.append(bytes_tensor((tmp_path / f"{i}.jpg").read_bytes()))
    return [files[k * size : (k + 1) * size] for k in range(batches)]


def serial(batches, step_draws: bool) -> list[torch.Tensor]:
    """Today's path: batch t decoded when the step reaches it (transfer_batch_to_device)."""
    torch.manual_seed(0)
    out = []
    for encoded in batches:
        out.append(decode_crop_flip(encoded, "cpu", 224, SCALE))
        if step_draws:
            torch.rand(3)  # a training step that draws from the global generator (dropout on the CPU)
    return out


def through(prefetcher: DecodePrefetcher, batches, step_draws: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    out = []
    for images, _ in prefetcher((encoded, None) for encoded in batches):
        out.append(images.receive())
        if step_draws:
            torch.rand(3)
    return out


def test_results_equal_the_serial_pipeline(tmp_path: Path):
    batches = encoded_batches(tmp_path)
    decode = partial(decode_crop_flip, device="cpu", size=224, scale=SCALE)
    ahead = DecodePrefetcher(lambda encoded: decode(encoded).as_subclass(Recorded), fake_streams([]))
    fallback = DecodePrefetcher.for_device(decode, "cpu")
    reference = serial(batches, step_draws=False)
    assert all(torch.equal(a, b) for a, b in zip(through(ahead, batches, False), reference, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(through(fallback, batches, False), reference, strict=True))
    # The CPU fallback stays bit-identical when the step draws from the global generator between batches
    # (running ahead, the crops of batch t+1 are drawn before step t's draws: on a GPU the step draws
    # from the device's generator).
    reference = serial(batches, step_draws=True)
    assert all(torch.equal(a, b) for a, b in zip(through(fallback, batches, True), reference, strict=True))


# --- the data module ----------------------------------------------------------------------------------
def attach_cpu_trainer(dm: ImageNetDataModule) -> None:
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))  # type: ignore[assignment]


def epoch(dm: ImageNetDataModule, step_draws: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for batch in dm.train_dataloader():
        out.append(dm.transfer_batch_to_device(batch, torch.device("cpu"), 0))
        if step_draws:
            torch.rand(3)
    return out


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    write_imagenet(tmp_path, per_class=4)  # 12 training images: 3 batches of 4
    return tmp_path


def test_data_module_under_a_cpu_trainer_gives_todays_batches(imagenet_root: Path):
    plain = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    loader = plain.train_dataloader()
    assert isinstance(loader, DataLoader) and len(loader) == 3
    assert isinstance(next(iter(loader))[0], list)  # no trainer: the plain encoded batches, as before
    trained = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    attach_cpu_trainer(trained)
    assert isinstance(next(iter(trained.train_dataloader()))[0], DecodedImages)
    for got, expected in zip(epoch(trained, True), epoch(plain, True), strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_running_ahead_in_the_data_module_gives_the_serial_batches(imagenet_root: Path, monkeypatch):
    log: list = []
    plain = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    ahead = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    attach_cpu_trainer(ahead)
    decode = partial(decode_crop_flip, device="cpu", size=224, scale=SCALE)
    monkeypatch.setattr(  # what the data module gets on a GPU, with fake streams
        ahead,
        "_decode_prefetcher",
        lambda: DecodePrefetcher(lambda encoded: decode(encoded).as_subclass(Recorded), fake_streams(log)),
    )
    for got, expected in zip(epoch(ahead), epoch(plain), strict=True):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert [entry for entry in log if entry[0] == "wait"] == [("wait", "consumer", f"e{t}") for t in range(3)]


def test_lightning_rebuilds_the_loader_with_its_prefetcher(imagenet_root: Path):
    """For DDP Lightning builds the folder loader again with a DistributedSampler, from the recorded
    constructor arguments and attributes: the copy still iterates through the prefetcher."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader

    dm = ImageNetDataModule(imagenet_root, batch_size=2, pipeline="device")
    with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning calls train_dataloader()
        loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=0)
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert rebuilt is not loader and type(rebuilt) is type(loader)
    assert rebuilt.decode_prefetcher == dm._decode_prefetcher and len(rebuilt) == 3
    attach_cpu_trainer(dm)
    assert isinstance(next(iter(rebuilt))[0], DecodedImages)


class Probe(pl.LightningModule):
    """Keeps the images each training step receives."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append(images.detach().clone())
        return (images.mean() - labels.float().mean()) * self.weight

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_runs_ahead_with_the_serial_batches(imagenet_root: Path, make_trainer, monkeypatch):
    """A CPU fit through the fallback, then through the running-ahead path with fake streams: the steps see
    the same images, all received on the consumer's side (transfer_batch_to_device)."""

    def fit() -> list[torch.Tensor]:
        torch.manual_seed(0)
        dm, probe = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device"), Probe()
        make_trainer(max_epochs=1).fit(probe, datamodule=dm)
        return probe.seen

    received = []
    original = DecodedImages.receive
    monkeypatch.setattr(DecodedImages, "receive", lambda self: received.append(1) or original(self))
    fallback = fit()
    log: list = []
    decode = partial(decode_crop_flip, device="cpu", size=224, scale=SCALE)
    monkeypatch.setattr(
        DecodePrefetcher,
        "for_device",
        classmethod(
            lambda cls, _decode, device: cls(
                lambda encoded: decode(encoded).as_subclass(Recorded), fake_streams(log)
            )
        ),
    )
    ahead = fit()
    assert len(fallback) == len(ahead) == 3 and len(received) == 6
    assert all(torch.equal(a, b) for a, b in zip(ahead, fallback, strict=True))
    assert fallback[0].shape == (4, 3, 224, 224) and fallback[0].dtype == torch.float32
    assert [entry[0] for entry in log].count("wait") == 3


class CountingLoader(DataLoader):
    """A loader with a position (as litdata's): the number of batches it has yielded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetched = 0

    def __iter__(self):
        self.fetched = 0
        for batch in super().__iter__():
            self.fetched += 1
            yield batch

    def state_dict(self) -> dict:
        return {"fetched": self.fetched}

    def load_state_dict(self, state: dict) -> None:
        self.fetched = state["fetched"]


def test_a_loader_with_a_position_reports_the_batches_handed_over():
    log: list = []
    loader = CountingLoader(list(range(4)), batch_size=1, collate_fn=lambda items: (items[0], f"y{items[0]}"))
    prefetching_loader(loader, lambda: DecodePrefetcher(logging_decode(log), fake_streams(log)))
    assert type(loader).__name__ == "PrefetchingCountingLoader" and isinstance(loader, CountingLoader)
    positions = []
    for images, _ in loader:
        assert loader.fetched == min(images.receive().batch + 2, 4)  # it has fetched the next batch
        positions.append(loader.state_dict()["fetched"])
    assert positions == [1, 2, 3, 4]  # the position after each batch handed over, as without prefetching


@pytest.mark.slow  # ~10 s: prepare.py's worker process imports torch
def test_streamed_loader_reports_the_position_of_the_batches_handed_over(imagenet_root: Path, monkeypatch):
    """Running ahead, the loader has fetched batch t+1 when the step on batch t ends: a checkpoint taken then
    must resume at batch t+1, as without the prefetcher."""
    from dmae_lightning.data.prepare import main as prepare_main

    out = imagenet_root.parent / "shards"
    prepare_main(["imagenet", "--root", str(imagenet_root), "--out", str(out), "--workers", "1"])

    def positions(dm: ImageNetDataModule) -> list[dict]:
        loader, states = dm.train_dataloader(), []
        for _ in loader:
            states.append(dm.state_dict()["stream_loader"])
        return states

    plain = positions(ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device", streaming=str(out)))
    ahead = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device", streaming=str(out))
    attach_cpu_trainer(ahead)
    decode = partial(decode_crop_flip, device="cpu", size=224, scale=SCALE)
    monkeypatch.setattr(
        ahead,
        "_decode_prefetcher",
        lambda: DecodePrefetcher(lambda encoded: decode(encoded).as_subclass(Recorded), fake_streams([])),
    )
    assert [s["num_samples_yielded"] for s in plain] == [4, 8, 12]
    assert positions(ahead) == plain


# --- real CUDA streams --------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side streams)")


@needs_cuda
def test_side_stream_decode_on_the_gpu_equals_the_serial_decode(tmp_path: Path):
    batches = encoded_batches(tmp_path)
    device = torch.device("cuda")
    streams_seen = []

    def decode(encoded):
        streams_seen.append(torch.cuda.current_stream(device))
        return decode_crop_flip(encoded, device, 224, SCALE)

    torch.manual_seed(0)
    reference = [decode_crop_flip(encoded, device, 224, SCALE) for encoded in batches]
    prefetcher = DecodePrefetcher.for_device(decode, device)
    assert prefetcher.streams is not None
    torch.manual_seed(0)
    got = [images.receive().clone() for images, _ in prefetcher((encoded, None) for encoded in batches)]
    torch.cuda.synchronize()  # (the clones ran on the default stream, each after its batch's event)
    assert streams_seen and all(s != torch.cuda.default_stream(device) for s in streams_seen)
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


@needs_cuda
def test_data_module_on_the_gpu_runs_ahead_and_matches_the_serial_path(imagenet_root: Path):
    device = torch.device("cuda")
    plain = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    ahead = ImageNetDataModule(imagenet_root, batch_size=4, pipeline="device")
    ahead.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device))  # type: ignore[assignment]

    def run(dm: ImageNetDataModule) -> list[torch.Tensor]:
        torch.manual_seed(0)
        return [dm.transfer_batch_to_device(b, device, 0)[0].cpu() for b in dm.train_dataloader()]

    for a, b in zip(run(ahead), run(plain), strict=True):
        assert torch.equal(a, b)
