"""What a local Ray instance costs before any work is done: start, first task, idle daemons, stop.

    .venv/bin/python -m bench.ray_fixed_cost [--num_cpus 2] [--idle_s 5]

Starts Ray the way every stage does (``core.executor.init_ray``, no address: a local
instance) in a fresh process and measures, as a user pays it: the wall time of
``ray.init``, of the first task (a worker process started and a result returned), the
CPU the daemons (GCS, raylet, workers) burn while idle for ``--idle_s`` seconds, their
summed resident memory, and the wall time of ``ray.shutdown``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.measure import tree_rss_bytes


def _tree_cpu() -> float:
    cpu: dict[int, float] = {}
    tree_rss_bytes(os.getpid(), cpu)
    return sum(cpu.values())


def _noop() -> int:
    return 1


def measure(num_cpus: int, idle_s: float) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    import ray

    from core.executor import init_ray

    imported = time.perf_counter()
    init_ray(None, num_cpus)
    started = time.perf_counter()
    ray.get(ray.remote(_noop).remote())
    first_task = time.perf_counter()
    cpu_before, idle_start = _tree_cpu(), time.perf_counter()
    time.sleep(idle_s)
    cpu: dict[int, float] = {}
    rss = tree_rss_bytes(os.getpid(), cpu)
    tree_cpu = sum(cpu.values())  # the driver, the daemons and the workers, from the start
    idle_cpu = tree_cpu - cpu_before
    idle_wall = time.perf_counter() - idle_start
    stop = time.perf_counter()
    ray.shutdown()
    stopped = time.perf_counter()
    return {
        "import_s": round(imported - start, 2),
        "init_s": round(started - imported, 2),
        "first_task_s": round(first_task - started, 2),
        "shutdown_s": round(stopped - stop, 2),
        "fixed_wall_s": round(stopped - start - idle_wall, 2),  # all of the above
        "idle_cpu_share": round(idle_cpu / idle_wall, 3),  # CPUs busy while nothing runs
        "tree_rss_mib": round(rss / 2**20),
        "tree_cpu_s": round(tree_cpu, 1),  # CPU of the whole tree up to the end of the idle wait
        "num_cpus": num_cpus,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_fixed_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_cpus", type=int, default=2)
    p.add_argument("--idle_s", type=float, default=5.0)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.num_cpus, args.idle_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
