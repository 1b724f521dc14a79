"""The Lightning side of the job: each rank runs its share of the images through one Sampler.

``predict_step`` hands one image to the sampler and runs the forward batches that the images in flight
fill completely; ``on_predict_epoch_end`` finishes the rest. Every finished image's record is appended
to this rank's shard at once (written at once, fsynced in groups: ShardWriter), so a killed job loses only the
images in flight (a crashed machine at most the last group). After a SIGTERM the job
stops at the next image boundary (Lightning's predict loop, unlike its fit loop, never looks at the flag its
handler sets): ``SIGTERMException``, which ``rundir.run_in_dir`` turns into one line and exit status 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from dmae_lightning.certification.procedures import Procedure
from dmae_lightning.certification.records import Record, ShardWriter
from dmae_lightning.certification.sampler import Sampler
from dmae_lightning.data import DataError
from dmae_lightning.training.progress import duration

log = logging.getLogger(__name__)


class IndexedImages(Dataset):
    """``(idx, image [C,H,W], label, error)`` for the given dataset indices; None gives a placeholder
    ``(-1, [], -1, "")``. An image that cannot be read comes back as its one-line ``error`` instead of
    raising here: in a DataLoader worker an exception would reach the job as a multi-line traceback."""

    def __init__(self, dataset: Dataset, indices: Sequence[int | None]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        idx = self.indices[i]
        if idx is None:
            return -1, torch.zeros(0), -1, ""
        try:
            image, label = self.dataset[idx]
        except DataError as err:
            return idx, torch.zeros(0), -1, str(err)
        return idx, image, int(label), ""


class SmoothingPredictor(pl.LightningModule):
    """Runs ``procedure`` on this rank's images ``todo[rank::world]`` and appends each record to its shard."""

    def __init__(
        self,
        classifier: torch.nn.Module,
        num_classes: int,
        procedure: Procedure,
        params,
        dataset: Dataset,
        todo: list[int],
        run_dir: Path,
        num_workers: int = 0,
    ):
        super().__init__()
        self.model = classifier
        self.num_classes, self.procedure, self.params = num_classes, procedure, params
        self.dataset, self.todo, self.run_dir, self.num_workers = dataset, todo, run_dir, num_workers
        self.strict_loading = False  # a SLURM requeue checkpoint holds no weights (see on_save_checkpoint)
        self.writer: ShardWriter | None = None
        self.sampler: Sampler | None = None
        self.share: list[int] = []
        self._done = 0
        self._started = self._last_log = 0.0

    def predict_dataloader(self) -> DataLoader:
        # Rank 0's list: every rank splits the same list even if another rank read the files at another time.
        todo = self.trainer.strategy.broadcast(self.todo, src=0)
        return self.loader(todo, self.global_rank, self.trainer.world_size)

    def loader(self, todo: list[int], rank: int, world_size: int) -> DataLoader:
        """Rank ``rank``'s images ``todo[rank::world_size]``, one per step, unpadded."""
        self.share = todo[rank::world_size]
        # Lightning refuses a rank without batches while others have some: such a rank gets a placeholder.
        items: Sequence[int | None] = self.share or ([None] if todo else [])
        return DataLoader(
            IndexedImages(self.dataset, items), batch_size=None, shuffle=False, num_workers=self.num_workers
        )

    def on_predict_start(self) -> None:
        self.model.eval()
        p = self.params
        self.sampler = Sampler(
            self.model, self.num_classes, p.noise, p.seed, p.batch_size, p.precision, p.compile, self.device
        )
        self.writer = ShardWriter(
            self.run_dir / f"{self.procedure.name}.rank{self.global_rank}.tsv", self.procedure.record_type
        )
        self._started = self._last_log = time.perf_counter()

    def predict_step(self, batch, batch_idx: int) -> None:
        self._stop_if_terminated()
        idx, image, label, error = batch  # int, [C,H,W], int, str
        if error:  # finish and keep the images in flight first: a rerun resumes after the fix
            self._write(self._sampler().drain())
            raise DataError(f"certification stopped at idx {idx}: {error}")
        if idx < 0:  # the placeholder of a rank with nothing to do
            return
        self._write(self._sampler().submit(idx, image, label, self.procedure))

    def on_predict_epoch_end(self) -> None:
        self._write(self._sampler().drain())

    def _sampler(self) -> Sampler:
        if self.sampler is None:
            raise RuntimeError("SmoothingPredictor: no sampler before on_predict_start")
        return self.sampler

    def _write(self, finished: Iterable[tuple[int, Record]]) -> None:
        """Append each record the moment its image is finished (``finished`` may be a lazy iterator)."""
        for _, record in finished:
            if self.writer is None:
                raise RuntimeError("SmoothingPredictor: the shard is not open (opened by on_predict_start)")
            self.writer.write(record)
            self._done += 1
            self._log_progress()
            self._stop_if_terminated()  # between two images (the drain at the end may finish many)

    def _stop_if_terminated(self) -> None:
        """After a SIGTERM (``trainer.received_sigterm``, set by Lightning's handler on every rank that got
        it): close the shard, every record in it already on disk, and stop. The images in flight are dropped;
        a rerun certifies them again with the same noise (seeded per image). No rank waits for another:
        the predict loop has no collective per step."""
        if self._trainer is not None and self.trainer.received_sigterm:
            self.teardown("predict")
            raise SIGTERMException

    def _log_progress(self) -> None:
        """Periodic progress lines from rank 0 when there is no progress bar (batch logs)."""
        now = time.perf_counter()
        if self.trainer.progress_bar_callback is not None or not self.trainer.is_global_zero:
            return
        if now - self._last_log < self.params.log_every_s and self._done < len(self.share):
            return
        self._last_log = now
        rate = self._done / max(now - self._started, 1e-9)
        eta = (len(self.share) - self._done) / rate if rate > 0 else float("inf")
        log.info(
            "rank 0: %d/%d images, %.3g images/s, ETA %s (world size %d)",
            self._done,
            len(self.share),
            rate,
            duration(eta),
            self.trainer.world_size,
        )

    def on_predict_end(self) -> None:
        self.teardown("predict")

    def teardown(self, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves an "hpc" checkpoint on a SLURM requeue signal; the weights are in ckpt_path and
        # the progress in the shards, so it need not hold a copy of the model.
        checkpoint["state_dict"] = {}


class ImageProgressBar(TQDMProgressBar):
    """Lightning's bar with images as the unit: images/s and the ETA of this rank's share (rank 0 shows)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    @property
    def predict_description(self) -> str:
        return self.description

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_description(self.description, refresh=False)  # no "DataLoader 0"
