"""Joining Ray, and running a stage's tasks: one place for how every stage finds its cluster."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def init_ray(address: str | None, num_cpus: int = 0) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local instance.

    Returns whether this call started Ray (the caller then shuts it down); a Ray
    already initialised in this process is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    return True


# -- running a list of tasks: in this process, or as Ray tasks ------------------------------


class InlineRunner:
    """Every task in this process, one after the other (debugging, tests, tiny inputs)."""

    workers = 1

    def map(self, fn: Callable, args: list[tuple], desc: str, progress: bool) -> list:
        return [fn(*a) for a in tqdm(args, desc=desc, unit="task", disable=not progress)]

    def put(self, value):
        return value

    def close(self) -> None:
        pass


class RayRunner:
    """Ray tasks with at most ``2 x workers`` in flight; results come back in input order.

    A task that dies with its worker (node lost, OOM kill) is retried twice by Ray, so
    task bodies must be idempotent: every stage's task writes whole files atomically.
    """

    def __init__(self, address: str | None, workers: int = 0):
        import ray

        self._ray = ray
        self._started = init_ray(address or None)
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def put(self, value):
        return self._ray.put(value)

    def map(self, fn: Callable, args: list[tuple], desc: str, progress: bool) -> list:
        task = self._ray.remote(num_cpus=1, max_retries=2)(fn)
        results: list[Any] = [None] * len(args)
        pending: dict[Any, int] = {}
        bar = tqdm(total=len(args), desc=desc, unit="task", disable=not progress)
        try:
            for index, a in enumerate(args):
                pending[task.remote(*a)] = index
                while len(pending) >= 2 * self.workers:
                    self._collect(pending, results, bar)
            while pending:
                self._collect(pending, results, bar)
        finally:
            bar.close()
        return results

    def _collect(self, pending: dict, results: list, bar) -> None:
        ready, _ = self._ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = self._ray.get(ref)
            bar.update(1)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


DISTRIBUTORS = ("ray", "inline")


def open_runner(distributor: str, address: str | None = None, workers: int = 0) -> InlineRunner | RayRunner:
    """``ray``: tasks on a local Ray instance or the cluster at ``address``; ``inline``: here."""
    if distributor == "ray":
        return RayRunner(address, workers)
    if distributor == "inline":
        return InlineRunner()
    raise ValueError(f"distributor={distributor!r}: choose one of {', '.join(DISTRIBUTORS)}")


def map_processes(fn: Callable, tasks: list[tuple], workers: int, desc: str, progress: bool) -> Iterator[Any]:
    """``fn(*task)`` for each task, in local processes, results yielded in task order.

    For work that reads storage and wants no cluster (verify, report): ``workers`` 0
    means one per CPU; one worker (or one task) runs here, without a pool. Processes
    are spawned, not forked, so no S3 session or thread is copied into a child. Every
    task is submitted at once: results that finish early wait their turn in memory.
    """
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", disable=not progress)
    try:
        if workers == 1:
            for task in tasks:
                yield fn(*task)
                bar.update(1)
            return
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(fn, *zip(*tasks)):
                yield result
                bar.update(1)
    finally:
        bar.close()

