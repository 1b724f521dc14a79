"""GPU time not wasted (issue 26 items 1, 2, 3, 6), checked on the CPU: no host synchronisation per training
step, no graph break in the compiled networks, AdamW fused/foreach equal to the plain loop, grouped fsyncs of the
certification shards."""

from __future__ import annotations

import collections
import gc
import os
import traceback
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from dmae_lightning.certification.records import ABSTAIN, CertifyRecord, ShardWriter, read_records
from dmae_lightning.rng import seeded_generator
from dmae_lightning.training.base import FiniteLossGuard
from dmae_lightning.training.finetune import BaseClassifierModule
from dmae_lightning.training.optim import adamw_implementation, trainer_adamw_implementation
from dmae_lightning.training.pretrain import DMAEPretrainModule
from dmae_lightning.training.progress import ProgressLog

pytestmark = pytest.mark.usefixtures("single_thread")
OPT = dict(name="adamw", base_lr=1e-3, weight_decay=0.05, warmup_epochs=0, min_lr=0.0)


# --------------------------------------------------------------------------------------------------
# 1. Host synchronisations of a training run
# --------------------------------------------------------------------------------------------------
# What reads a tensor back to the host (on a GPU: waits until the device has finished the work queued so far).
READ_BACKS = {"item", "__bool__", "__float__", "__int__", "__format__", "tolist", "cpu", "numpy"}


class ReadBacks(TorchFunctionMode):
    """Counts the read-backs per training batch (``where``, set by :class:`Where`), with the caller's line.
    Not counted: torch.optim's, which read its step counters (CPU tensors, also on a GPU; fused AdamW has none)."""

    def __init__(self):
        super().__init__()
        self.where: int | str | None = None  # None: outside the training loop (set-up, teardown)
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_BACKS and self.where is not None:
            caller = traceback.extract_stack(limit=2)[0]
            if "/torch/optim/" not in caller.filename:
                self.calls[(self.where, name, f"{os.path.basename(caller.filename)}:{caller.lineno}")] += 1
        return func(*args, **(kwargs or {}))


class Where(pl.Callback):
    def __init__(self, mode: ReadBacks):
        self.mode = mode

    def on_train_start(self, trainer, pl_module):
        self.mode.where = "start"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.where = batch_idx

    def on_train_epoch_end(self, trainer, pl_module):  # runs before the module's and ProgressLog's
        self.mode.where = "epoch end"

    def on_train_end(self, trainer, pl_module):
        self.mode.where = None


class Images(pl.LightningDataModule):
    def __init__(self, n: int, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        )

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


@pytest.mark.parametrize(
    "build, logged",
    [
        (lambda: DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=dict(OPT)), 1),
        (
            lambda: BaseClassifierModule(
                "vit_micro_patch4", num_classes=10, objective=dict(name="consistency"), optimizer=dict(OPT)
            ),
            4,  # loss, ce, consistency_kl, consistency_entropy
        ),
    ],
    ids=["pretrain", "finetune"],
)
def test_training_reads_back_only_at_the_logging_interval(make_trainer, build, logged):
    steps, every = 12, 4
    mode = ReadBacks()
    torch.manual_seed(0)
    trainer = make_trainer(
        [Where(mode), ProgressLog(every_s=3600)],
        csv=True,
        max_epochs=1,
        log_every_n_steps=every,
        limit_val_batches=0,
    )
    with mode:
        trainer.fit(build(), datamodule=Images(2 * steps, batch_size=2))
    by_where = collections.Counter()
    for (where, _, _), n in mode.calls.items():
        by_where[where] += n
    print(f"{steps} steps, log_every_n_steps={every}: {sum(mode.calls.values())} read-backs")
    for key, n in sorted(mode.calls.items(), key=str):
        print(f"  {n} x {key}")
    # Only at the steps where Lightning writes its logs (and the guard checks), and at the epoch's end.
    assert set(by_where) <= {every - 1, 2 * every - 1, 3 * every - 1, "start", "epoch end"}, by_where
    # At each: one for the non-finite guard, one per logged metric (Lightning's CSV logger).
    assert all(by_where[k * every - 1] <= 1 + logged for k in (1, 2, 3)), by_where
    # At the start the DataLoader's seed (a CPU tensor); at the end the epoch means and the progress line.
    assert by_where["start"] <= 1 and by_where["epoch end"] <= logged + 2, by_where
    assert sum(by_where.values()) <= steps // every * (1 + logged) + logged + 3


def test_the_guard_names_the_first_non_finite_step_on_any_rank_and_every_rank_stops():
    guard = FiniteLossGuard()
    reduced = []

    def reduce(tensor, reduce_op):  # the other rank went non-finite at global step 5, batch 1
        reduced.append(reduce_op)
        return torch.minimum(tensor, torch.tensor([5.0, 1.0], dtype=tensor.dtype))

    strategy = SimpleNamespace(reduce=reduce)
    trainer = SimpleNamespace(world_size=1, strategy=strategy)
    module = SimpleNamespace(_trainer=trainer, global_step=4, device=torch.device("cpu"))
    for step in range(4):
        guard.update(torch.tensor(float(step)), step, step, epoch=0)
    assert guard.check(module) == pytest.approx(1.5)  # this rank's mean loss of the window
    assert guard.check(module) is None and not reduced  # nothing since the last check: nothing read back
    trainer.world_size = 2
    assert guard.check(module) is None and not reduced
    # A checkpoint save: every rank joins the all-reduce, also one without a batch since its last check.
    with pytest.raises(FloatingPointError, match=r"global step 5 \(epoch 0, batch 1\)"):
        FiniteLossGuard().check(module, every_rank=True)
    assert reduced == ["min"]
    module.global_step = 8
    for step in range(4, 8):  # this rank: non-finite at step 6 (batch 2 of epoch 1)
        loss = float("nan") if step == 6 else float("inf") if step == 7 else 1.0
        guard.update(torch.tensor(loss), step, step - 4, epoch=1)
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss at global step 5 \(epoch 1, batch 1\)"
    ):
        guard.check(module)
    assert reduced == ["min", "min"]
    strategy.reduce = lambda tensor, reduce_op: tensor  # only this rank
    guard.update(torch.tensor([1.0, float("inf")]), 9, 3, epoch=2)
    with pytest.raises(FloatingPointError, match=r"global step 9 \(epoch 2, batch 3\)"):
        guard.check(module)


# --------------------------------------------------------------------------------------------------
# 2. Graph breaks under compile=true
# --------------------------------------------------------------------------------------------------
def compiled_graphs(run) -> tuple[int, dict]:
    """(graphs compiled, graph-break reasons) of ``run()`` through dynamo (backend eager: no inductor build)."""
    torch._dynamo.reset()
    counters.clear()
    run()
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def test_compiled_pretraining_forward_has_no_graph_break_and_draws_the_eager_noise():
    imgs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    module = DMAEPretrainModule("dmae_vit_micro_patch4", compile={"backend": "eager"})
    graphs, breaks = compiled_graphs(lambda: module(imgs, seeded_generator(0, 1))[0].backward())
    assert (graphs, breaks) == (1, {})
    # The noise and masks drawn outside the network are those the network draws itself (eager, same seed).
    loss, pred, mask = module(imgs, seeded_generator(0, 2))
    model = module.model
    model._compiled_call_impl = None  # the plain forward, drawing from the generator inside
    loss_inside, pred_inside, mask_inside = model(imgs, 0.75, seeded_generator(0, 2))
    assert torch.equal(mask, mask_inside)
    torch.testing.assert_close(pred, pred_inside)
    torch.testing.assert_close(loss, loss_inside)


def test_compiled_classifier_has_no_graph_break():
    """Fine-tuning draws its noise in the objective, outside the compiled network."""
    imgs = torch.rand(2, 3, 32, 32)
    module = BaseClassifierModule(
        "vit_micro_patch4", num_classes=10, objective=dict(name="consistency"), compile={"backend": "eager"}
    )
    targets = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()

    def step():
        loss, _ = module.objective.loss(module.model, imgs, targets, module.noise, seeded_generator(0, 1))
        loss.backward()

    assert compiled_graphs(step) == (1, {})


# --------------------------------------------------------------------------------------------------
# 3. AdamW: fused on CUDA, foreach elsewhere
# --------------------------------------------------------------------------------------------------
def test_adamw_implementation_by_device():
    assert adamw_implementation("cuda") == adamw_implementation(torch.device("cuda", 1)) == {"fused": True}
    assert adamw_implementation("cpu") == adamw_implementation(torch.device("mps")) == {"foreach": True}
    # Lightning refuses gradient clipping with a fused optimizer under mixed precision.
    assert adamw_implementation("cuda", amp_clips_gradients=True) == {"foreach": True}
    amp = MixedPrecision("bf16-mixed", "cpu")
    clipping = SimpleNamespace(precision_plugin=amp, gradient_clip_val=1.0)
    assert trainer_adamw_implementation(clipping, torch.device("cuda")) == {"foreach": True}
    assert trainer_adamw_implementation(
        SimpleNamespace(precision_plugin=amp, gradient_clip_val=None), "cuda"
    ) == {"fused": True}


def test_foreach_adamw_equals_the_plain_loop_after_5_steps():
    def run(lr: float = 1e-2, **implementation) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        decay = [p for p in net.parameters() if p.ndim > 1]
        no_decay = [p for p in net.parameters() if p.ndim == 1]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **implementation)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    plain, foreach = run(foreach=False), run(**adamw_implementation("cpu"))
    assert any(not torch.equal(p, q) for p, q in zip(plain, run(foreach=False, lr=0)))  # they moved
    for p, q in zip(plain, foreach):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_resumed_adamw_takes_this_runs_implementation():
    """torch restores the param groups' flags: a GPU (fused) checkpoint resumed on a CPU gets foreach."""
    module = DMAEPretrainModule("dmae_vit_micro_patch4", optimizer=dict(OPT))
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    adamw = {"params": [0], "lr": 0.1, "fused": True, "foreach": None}
    lars = {"params": [1], "lr": 0.1, "always_adapt": True}
    checkpoint = {"optimizer_states": [{"state": {}, "param_groups": [adamw, lars]}]}
    module.on_load_checkpoint(checkpoint)
    assert (adamw["fused"], adamw["foreach"]) == (None, True) and "fused" not in lars


# --------------------------------------------------------------------------------------------------
# 6. Grouped fsyncs of the certification shards
# --------------------------------------------------------------------------------------------------
def records(n: int) -> list[CertifyRecord]:
    return [
        CertifyRecord(i, i % 10, ABSTAIN if i % 7 == 0 else i % 10, 0.25 * (i % 5), 1, 90, 100, 0.5)
        for i in range(n)
    ]


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_shard_writer_fsyncs_once_per_group(tmp_path, fsyncs):
    path, n, k = tmp_path / "certify.rank0.tsv", 100, 16
    with ShardWriter(path, CertifyRecord, fsync_every=k, fsync_after_s=3600) as writer:
        opened = len(fsyncs)  # the header and the directory entry of a new file
        for i, record in enumerate(records(n)):
            writer.write(record)
            # every record reaches the operating system at once (a killed process loses none)
            if i in (0, k - 2):
                assert read_records(path, CertifyRecord) == records(i + 1) and len(fsyncs) == opened
    print(f"{n} records, fsync_every={k}: {len(fsyncs) - opened} fsyncs (one per record before)")
    assert opened <= 2 and len(fsyncs) - opened <= n // k + 1
    assert read_records(path, CertifyRecord) == records(n)
    with ShardWriter(path, CertifyRecord, fsync_after_s=0) as writer:  # t = 0: one fsync per record
        before = len(fsyncs)
        for record in records(3):
            writer.write(record)
        assert len(fsyncs) - before == 3
    with pytest.raises(ValueError, match="fsync_every must be >= 1"):
        ShardWriter(path, CertifyRecord, fsync_every=0)


def test_shard_writer_syncs_the_last_group_on_close_exception_and_exit(tmp_path, fsyncs):
    path = tmp_path / "shard.tsv"
    with pytest.raises(RuntimeError), ShardWriter(path, CertifyRecord, fsync_every=100) as writer:
        writer.write(records(1)[0])
        before = len(fsyncs)
        raise RuntimeError("an error mid-run")
    assert len(fsyncs) == before + 1 and writer._file.closed
    writer.close()  # once only
    assert len(fsyncs) == before + 1
    # A writer that an exception skipped (never closed): fsynced and closed when collected, or at exit.
    writer = ShardWriter(path, CertifyRecord, fsync_every=100)
    writer.write(records(2)[1])
    file, before = writer._file, len(fsyncs)
    del writer
    gc.collect()
    assert file.closed and len(fsyncs) == before + 1
    assert read_records(path, CertifyRecord) == records(2)
