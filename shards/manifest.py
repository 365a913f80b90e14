"""manifest.json: what the train shards are, and what made them.

Every shard's name, sample count, bytes and sha256 (tar and parquet), the dataset's
totals, the config and code version of the run, and fingerprints of its inputs: the
pool (its parquet and commit markers), the decisions and the URL lists the pool was
downloaded from (recorded by ingest in ``_ingest_summary.json``). ``python -m
shards.verify`` checks a folder against it.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from core import __version__, storage
from core.layout import STATS_SUFFIX, folder_fingerprint, shard_name  # noqa: F401 (folder_fingerprint: re-exported)

MANIFEST = "manifest.json"
PLAN_FILE = "_reshard_plan.json"
INGEST_SUMMARY = "_ingest_summary.json"
FILTER_STATS = "_filter_stats.json"


def code_version() -> str:
    """git describe of the source tree when there is one, else the package version."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=5, cwd=__file__.rsplit("/", 2)[0],
        )
        if described.returncode == 0 and described.stdout.strip():
            return f"{__version__}+git.{described.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def pool_inputs(pool: str, decisions: str, pool_ids: list[int], pool_fingerprint: str | None = None) -> dict[str, Any]:
    """The inputs section: pool, decisions, and the URL lists behind the pool."""
    ingest_summary = storage.join(pool, INGEST_SUMMARY)
    input_lists = None
    if storage.exists(ingest_summary):
        input_lists = storage.read_json(ingest_summary).get("inputs")
    filter_stats = storage.join(decisions, FILTER_STATS)
    filter_config = storage.read_json(filter_stats).get("config") if storage.exists(filter_stats) else None
    return {
        "pool": {"path": pool, "shards": len(pool_ids),
                 "fingerprint": pool_fingerprint or folder_fingerprint(pool, pool_ids, (".parquet", STATS_SUFFIX))},
        "decisions": {"path": decisions, "fingerprint": folder_fingerprint(decisions, pool_ids, (".parquet",)),
                      "filter_config": filter_config},
        # None: the pool has no _ingest_summary.json (not made by our ingest, or its run never finished)
        "input_lists": input_lists,
    }


def build_manifest(entries: list[dict[str, Any]], inputs: dict[str, Any], plan: dict[str, Any],
                   config: dict[str, Any], duration: float) -> dict[str, Any]:
    return {
        "format": "webdataset",
        "layout": "{shard}.tar holding {key}.jpg|webp|png, {key}.txt, {key}.json per sample; "
                  "{shard}.parquet (one row per sample); {shard}" + STATS_SUFFIX + " (commit marker)",
        "shards": entries,
        "shard_count": len(entries),
        "total_samples": sum(e["count"] for e in entries),
        "total_bytes": sum(e["bytes"] + e["metadata"]["bytes"] for e in entries),
        "inputs": inputs,
        "plan": plan,
        "config": config,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration": duration,
    }
