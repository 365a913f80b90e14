"""Run shard downloads somewhere: on Ray (local or a cluster), in a process pool, or inline.

Distributors are plain functions of one signature: they take an iterator of
``ShardInput``, the config, ``on_done`` (called with each shard's stats, in the
driver) and ``on_progress`` (None, or called in the driver with a shard's running
counts while it is in flight). All of them keep a bounded number of shards in
flight, so a huge URL list is never materialised, and all of them may run a shard
again after a failure: shard commits are idempotent (stats marker last, same keys,
same bytes), so a lost worker costs one shard's rework, nothing more.

* ``ray``: one Ray task per shard (``max_retries``: Ray reruns the shard of a dead
  worker), on a local instance or the cluster at ``ray_address`` / ``RAY_ADDRESS``;
  progress flows through one tiny actor (no CPU reserved, on the driver's node), polled
  twice a second.
* ``multiprocessing``: a pool of ``processes_count`` local processes, img2dataset's
  default distributor and the cheapest to start on one machine; progress flows
  through a queue. A failed shard is resubmitted up to ``max_shard_retry`` times; a
  process killed outright breaks the pool, the run stops, and rerunning the same
  command resumes it.
* ``inline``: this process, one shard at a time (debugging, tests).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from core.cluster import init_ray
from ingest.config import IngestConfig
from ingest.reader import ShardInput
from ingest.shard_worker import Report, download_shard

OnDone = Callable[[dict[str, Any]], None]
POLL_S = 0.5


def inline_distributor(
    shards: Iterator[ShardInput], cfg: IngestConfig, on_done: OnDone, on_progress: Report | None
) -> None:
    for shard in shards:
        on_done(download_shard(shard, cfg, on_progress))


# -- Ray ----------------------------------------------------------------------------


def _ray_task(shard: ShardInput, cfg: IngestConfig, board) -> dict[str, Any]:
    report = (lambda *counts: board.report.remote(*counts)) if board is not None else None
    return download_shard(shard, cfg, report)


class _ProgressBoard:
    """Latest running counts per shard, written by tasks, taken by the driver."""

    def __init__(self) -> None:
        self._latest: dict[int, tuple[int, int]] = {}

    def report(self, shard_id: int, count: int, successes: int) -> None:
        self._latest[shard_id] = (count, successes)

    def take(self) -> dict[int, tuple[int, int]]:
        latest, self._latest = self._latest, {}
        return latest


def ray_distributor(
    shards: Iterator[ShardInput], cfg: IngestConfig, on_done: OnDone, on_progress: Report | None
) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(cfg.ray_address, cfg.processes_count)
    try:
        slots = cfg.processes_count or max(1, int(ray.cluster_resources().get("CPU", 1)))
        limit = cfg.max_shards_in_flight or 2 * slots
        task = ray.remote(num_cpus=1, max_retries=cfg.max_shard_retry, retry_exceptions=True)(_ray_task)
        board = _progress_board_on_this_node() if on_progress is not None else None

        def collect(in_flight: list, wait_for_all: bool) -> list:
            while in_flight and (wait_for_all or len(in_flight) >= limit):
                ready, in_flight = ray.wait(in_flight, num_returns=1, timeout=POLL_S if board else None)
                if board is not None:
                    for shard_id, counts in ray.get(board.take.remote()).items():
                        on_progress(shard_id, *counts)
                for ref in ready:
                    on_done(ray.get(ref))
            return in_flight

        in_flight: list = []
        for shard in shards:
            in_flight = collect(in_flight, wait_for_all=False)
            in_flight.append(task.remote(shard, cfg, board))
        collect(in_flight, wait_for_all=True)
    finally:
        if started_here:
            ray.shutdown()


def _progress_board_on_this_node():
    """The progress actor, pinned to the driver's node: on a cluster, Ray could place it on
    any node, and the loss of that node would then end the whole job, not just cost the
    shards running there. The driver's node cannot be lost without losing the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(_ProgressBoard).remote()


# -- a local process pool -------------------------------------------------------------

_progress_queue = None  # set in each pool process by _init_pool_process


def _init_pool_process(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _pool_task(shard: ShardInput, cfg: IngestConfig) -> dict[str, Any]:
    q = _progress_queue
    report = (lambda *counts: q.put_nowait(counts)) if q is not None else None
    return download_shard(shard, cfg, report)


def multiprocessing_distributor(
    shards: Iterator[ShardInput], cfg: IngestConfig, on_done: OnDone, on_progress: Report | None
) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a driver that holds threads
    slots = cfg.processes_count or os.cpu_count() or 1
    limit = cfg.max_shards_in_flight or 2 * slots
    progress_queue = context.Queue() if on_progress is not None else None

    def drain() -> None:
        while progress_queue is not None:
            try:
                on_progress(*progress_queue.get_nowait())
            except queue_module.Empty:
                return

    with ProcessPoolExecutor(slots, mp_context=context, initializer=_init_pool_process,
                             initargs=(progress_queue,)) as pool:
        in_flight: dict[Future, tuple[ShardInput, int]] = {}

        def collect(wait_for_all: bool) -> None:
            while in_flight and (wait_for_all or len(in_flight) >= limit):
                done, _ = wait(in_flight, timeout=POLL_S, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    shard, attempt = in_flight.pop(future)
                    try:
                        stats = future.result()
                    except BrokenProcessPool:
                        raise RuntimeError(
                            "a worker process died (out of memory?); rerun the same command to resume"
                        ) from None
                    except Exception:
                        if attempt >= cfg.max_shard_retry:
                            raise
                        in_flight[pool.submit(_pool_task, shard, cfg)] = (shard, attempt + 1)
                        continue
                    on_done(stats)

        for shard in shards:
            collect(wait_for_all=False)
            in_flight[pool.submit(_pool_task, shard, cfg)] = (shard, 0)
        collect(wait_for_all=True)
        drain()


Distributor = Callable[[Iterator[ShardInput], IngestConfig, OnDone, "Report | None"], None]
DISTRIBUTORS: dict[str, Distributor] = {
    "ray": ray_distributor,
    "multiprocessing": multiprocessing_distributor,
    "inline": inline_distributor,
}
