"""The state of a run: what changes as it goes, saved with every checkpoint and restored by a resume.

``step`` and ``samples_seen`` are the run's; ``data`` is this rank's data cursor
(``train.data.Cursor``: epoch, batches taken, readers' positions, skipped counts). Saved,
every rank hands in its cursor and RNG state and rank 0 writes them all beside the
weights (``train/checkpoint.py``); restored, each rank takes its own back, exactly, when
the world size and the data workers are the same, else only the step and epoch (with a
warning: the data stream then restarts at that epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from train import checkpoint as ckpt
from train import distributed
from train import model as model_mod
from train.data import Cursor

log = logging.getLogger("train")


@dataclass
class RunState:
    step: int = 0
    samples_seen: int = 0
    data: Cursor = field(default_factory=Cursor)
    rng: dict[str, Any] | None = None  # restored RNG states, set by ``restore_rng`` once set-up is done

    @classmethod
    def restore(cls, saved: dict[str, Any], world: distributed.World, data_workers: int) -> RunState:
        """This rank's state from a checkpoint's training state (``ckpt.load_checkpoint``)."""
        progress = saved["progress"]
        ranks = saved.get("ranks") or []
        if len(ranks) == world.world_size and saved.get("data_workers") == data_workers:
            mine = ranks[world.rank]
            return cls(progress["step"], progress["samples_seen"], Cursor.from_state(mine, progress["epoch"]),
                       mine["rng"])  # fmt: skip
        if world.is_main:
            log.warning(
                "checkpoint was written by %d rank(s) x %s data worker(s), this run has %d x %d: the data "
                "stream restarts at the checkpoint's epoch, so this resume is not exact",
                len(ranks), saved.get("data_workers"), world.world_size, data_workers,
            )  # fmt: skip
        return cls(progress["step"], progress["samples_seen"], Cursor(epoch=progress["epoch"]))

    def restore_rng(self) -> None:
        """Put the saved RNG states back: last in set-up, so nothing after draws differently."""
        if self.rng is not None:
            ckpt.set_rng_state(self.rng)

    def save(self, config, world: distributed.World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, total_steps: int) -> str | None:  # fmt: skip
        """All ranks call this together; rank 0 writes the checkpoint (returns its path, None elsewhere)."""
        ranks = distributed.all_gather_objects({**self.data.state_dict(), "rng": ckpt.rng_state()}, world)
        path = None
        if world.is_main:
            state = {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "schedule": {"total_steps": total_steps, "warmup_steps": config.optim.warmup_steps,
                             "base_lr": config.optim.lr},  # fmt: skip
                "world_size": world.world_size,
                "data_workers": config.data.workers,
                "ranks": ranks,
                "config": config.to_dict(),
            }
            progress = ckpt.TrainProgress(step=self.step, samples_seen=self.samples_seen, epoch=self.data.epoch)
            path = ckpt.save_checkpoint(config.checkpoint_dir, model, progress, config.model.name,
                                        model_mod.image_size_of(model), state)  # fmt: skip
            log.info("checkpoint: %s", path)
        distributed.barrier(world)
        return path
