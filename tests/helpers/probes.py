"""Test-only Lightning callback, loaded into training subprocesses with
``+callbacks.probe._target_=helpers.probes.NoiseProbe`` (the tests put ``tests/`` on ``PYTHONPATH``; it is not
part of the package).

It observes, on every rank, the noise the training step really drew (not a recomputation) and the cluster
environment Lightning chose, and writes them to ``$DMAE_PROBE_DIR/probe-rank<R>-restart<N>.json``; it also prints
one ``probe ...`` line per rank at the start and, on rank 0, one per step (the SLURM test waits for those).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

NUM_VALUES = 16  # first values of the flattened noise tensor kept per step


class NoiseProbe(pl.Callback):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.in_step = False
        self.step = (0, 0)
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.step_sleep = float(os.environ.get("DMAE_PROBE_STEP_SLEEP", "0"))

    def record(self, noise: torch.Tensor) -> None:
        if self.in_step:
            flat = noise.detach().flatten().float().cpu()
            self.records.append(
                {
                    "global_step": self.step[0],
                    "batch_idx": self.step[1],
                    "shape": list(noise.shape),
                    "values": flat[:NUM_VALUES].tolist(),
                }
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        env = trainer.strategy.cluster_environment
        print(
            f"probe setup global_rank={trainer.global_rank} world_size={trainer.world_size} "
            f"env={type(env).__name__} slurm_procid={os.environ.get('SLURM_PROCID', '-')} "
            f"restart={self.restart} pid={os.getpid()}",
            flush=True,
        )
        # Through the root logger, as every module's log does: only rank 0's Hydra file handler is the run's
        # <job>.log; the others write to /dev/null (conf/hydra/default.yaml).
        logging.getLogger("probes").info("probe log global_rank=%d", trainer.global_rank)
        model = pl_module.model
        if hasattr(model, "add_noise"):  # pre-training: DMAEViT.add_noise(imgs, generator)
            add_noise = model.add_noise

            def probed_add_noise(imgs, generator=None):
                noisy = add_noise(imgs, generator)
                self.record((noisy - imgs) / model.noise.sigma)
                return noisy

            model.add_noise = probed_add_noise
        else:  # fine-tuning: the objective draws its noisy copies with noise.perturb(clean copies, generator)
            noise = pl_module.noise
            perturb = noise.perturb

            def probed_perturb(imgs, generator=None):
                noisy = perturb(imgs, generator)
                self.record((noisy - imgs) / noise.sigma)  # (in training steps only)
                return noisy

            object.__setattr__(noise, "perturb", probed_perturb)  # the frozen noise object the module holds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(
            f"probe start global_rank={trainer.global_rank} global_step={trainer.global_step} "
            f"epoch={trainer.current_epoch} restart={self.restart}",
            flush=True,
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.in_step, self.step = True, (trainer.global_step, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.in_step = False
        time.sleep(self.step_sleep)  # paces training so that a signal can arrive mid-run
        if trainer.is_global_zero:
            print(f"probe step global_step={trainer.global_step}", flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(os.environ.get("DMAE_PROBE_DIR", trainer.default_root_dir))
        out.mkdir(parents=True, exist_ok=True)
        info = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "env": type(trainer.strategy.cluster_environment).__name__,
            "restart": self.restart,
            "pid": os.getpid(),
            "final_global_step": trainer.global_step,
            "records": self.records,
        }
        path = out / f"probe-rank{trainer.global_rank}-restart{self.restart}.json"
        path.write_text(json.dumps(info))


# ------------------------------------------------------------------------------------ helpers for the tests
def load_probes(probe_dir: str | Path) -> dict[tuple[int, int], dict]:
    """{(global_rank, restart): probe record} of every probe file written."""
    out = {}
    for path in Path(probe_dir).glob("probe-rank*-restart*.json"):
        info = json.loads(path.read_text())
        out[(info["global_rank"], info["restart"])] = info
    return out


def expected_noise(seed: int, rank: int, global_step: int, batch_idx: int, shape) -> list[float]:
    """The design: training noise of (rank, step, micro-batch) from seeded_generator(seed, TRAIN_STREAM, ...)."""
    from dmae_lightning.rng import TRAIN_STREAM, seeded_generator

    generator = seeded_generator(seed, TRAIN_STREAM, rank, global_step, batch_idx)
    return torch.randn(shape, generator=generator).flatten()[:NUM_VALUES].tolist()


def check_noise_per_rank(probes: dict[tuple[int, int], dict], seed: int = 0, restart: int = 0) -> int:
    """Every recorded draw equals the design's, and the ranks' draws differ at every step; returns #steps."""
    ranks = sorted(rank for rank, rs in probes if rs == restart)
    assert len(ranks) >= 2, f"probe files of ranks {ranks} only"
    steps = [
        {(r["global_step"], r["batch_idx"]): r for r in probes[(rank, restart)]["records"]} for rank in ranks
    ]
    assert steps[0] and all(s.keys() == steps[0].keys() for s in steps), [sorted(s) for s in steps]
    for (global_step, batch_idx), _ in steps[0].items():
        drawn = [s[(global_step, batch_idx)]["values"] for s in steps]
        for rank, values in zip(ranks, drawn):
            want = expected_noise(
                seed, rank, global_step, batch_idx, steps[0][(global_step, batch_idx)]["shape"]
            )
            assert torch.allclose(torch.tensor(values), torch.tensor(want), atol=1e-5), (rank, global_step)
        for i in range(len(drawn)):
            for j in range(i + 1, len(drawn)):
                assert not torch.allclose(torch.tensor(drawn[i]), torch.tensor(drawn[j])), (
                    f"ranks {ranks[i]} and {ranks[j]} drew the same noise at step {global_step}"
                )
    return len(steps[0])
