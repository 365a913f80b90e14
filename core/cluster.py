"""Joining Ray: one place for how every stage starts or finds its cluster."""

from __future__ import annotations

import logging
import os
from typing import Any


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
