"""What crawl/ and filter/ still use until they run on ``core.executor``; then this module goes.

``init_ray`` lives in ``core.executor`` (re-exported here); the runners below are the
filter's until it moves onto the executor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from core.executor import init_ray

__all__ = ["init_ray", "open_runner", "InlineRunner", "RayRunner", "DISTRIBUTORS"]


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
