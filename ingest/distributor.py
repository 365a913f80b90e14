"""Run shard downloads somewhere: on Ray (local or a cluster), or inline.

Distributors are plain functions of one signature: they take an iterator of
``ShardInput`` and the config, run ``download_shard`` on each, and call ``on_done``
with each shard's stats. The Ray one keeps a bounded number of shards in flight
(so a huge URL list is never materialised) and lets Ray retry a shard whose worker
died: shard commits are idempotent, so a lost worker costs one shard's rework.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from ingest.config import IngestConfig
from ingest.reader import ShardInput
from ingest.shard_worker import download_shard

OnDone = Callable[[dict[str, Any]], None]


def inline_distributor(shards: Iterator[ShardInput], cfg: IngestConfig, on_done: OnDone) -> None:
    for shard in shards:
        on_done(download_shard(shard, cfg))


def ray_distributor(shards: Iterator[ShardInput], cfg: IngestConfig, on_done: OnDone) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(cfg.ray_address, cfg.processes_count)
    try:
        slots = cfg.processes_count or max(1, int(ray.cluster_resources().get("CPU", 1)))
        limit = cfg.max_shards_in_flight or 2 * slots
        remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=True)(download_shard)
        in_flight: list = []
        for shard in shards:
            while len(in_flight) >= limit:
                ready, in_flight = ray.wait(in_flight, num_returns=1)
                on_done(ray.get(ready[0]))
            in_flight.append(remote.remote(shard, cfg))
        while in_flight:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            on_done(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


def init_ray(address: str | None, num_cpus: int = 0) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local instance."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)


DISTRIBUTORS: dict[str, Callable[[Iterator[ShardInput], IngestConfig, OnDone], None]] = {
    "ray": ray_distributor,
    "inline": inline_distributor,
}
