"""Everything the trainer knows about processes: who am I, how many are we, which device.

Set up from torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); without
it the run is a single process and no process group is created. gloo on CPU, nccl on
GPU. Several nodes work through torchrun's usual rendezvous (``--nnodes``,
``--rdzv_endpoint``): ranks are global, devices are chosen by ``LOCAL_RANK``. Nothing
else in ``train/`` touches ``torch.distributed`` except the loss's gather and DDP
wrapping in the loop.
"""

from __future__ import annotations

import gc
import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core.device import resolve_device


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment {name}={value!r}: must be an integer") from None


def init(device: str = "auto") -> World:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    chosen = resolve_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return World(rank, local_rank, world_size, local_world_size, chosen)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over ranks (identity for one process)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj`` (tensors, numbers, strings, lists, dicts), in rank order, on every rank.

    Serialised with ``torch.save`` and read back with ``weights_only=True``: tensors travel
    intact (``all_gather_object``'s own pickling of tensors fails on some torch builds)
    and nothing a peer sends is unpickled as code.
    """
    if not world.distributed:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), map_location="cpu", weights_only=True) for data in gathered]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, then collect garbage at once.

    A process group still referenced (by a finished work object or an autograd node of a
    gathered tensor) would otherwise be destroyed during interpreter finalization, with its
    worker threads still joinable: gloo then aborts at teardown ("terminate called without
    an active exception", exit -6), rarely, after all the work is done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
