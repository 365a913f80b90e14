"""Pool + decisions → train shards of a fixed size, and their manifest.

Streams each pool tar once, in shard order, copying the members of kept samples
byte for byte (images are not re-encoded; nothing is unpickled) into train shards
written by the same ``ShardWriter`` as the pool, so train shards have the same
layout. Keys stay the pool keys, so any train sample traces back to its input row.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from core import __version__, storage
from core.config import to_dict
from core.layout import IMAGE_EXTENSIONS, POOL_SCHEMA, STATS_SUFFIX, committed_shards, shard_id_of, shard_name
from core.tarreader import iter_tar_files
from core.shard_writer import ShardWriter
from filter.run import load_decisions
from shards.config import ShardsConfig

MANIFEST = "manifest.json"


@dataclass
class PoolSample:
    key: str
    image: bytes
    image_ext: str


def iter_tar_samples(path: str) -> Iterator[PoolSample]:
    """Images of a shard tar, grouped by key; other members and odd entries are skipped."""
    with storage.open_file(path) as handle:
        for name, data in iter_tar_files(handle, reopen=lambda: storage.open_file(path)):
            key, _, ext = name.rpartition("/")[2].partition(".")
            if ext.lower() in IMAGE_EXTENSIONS:
                yield PoolSample(key, data, ext.lower())


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


def _remove_old_outputs(folder: str) -> None:
    """A rerun replaces earlier train shards (and only those files)."""
    for path in storage.list_files(folder):
        name = path.rsplit("/", 1)[-1]
        if shard_id_of(name) is not None or name == MANIFEST:
            storage.remove(path)


class _TrainShardSink:
    """Rolls over to a new train shard every ``samples_per_shard`` samples."""

    def __init__(self, cfg: ShardsConfig, extra_columns: list[str]):
        self.cfg = cfg
        self.extra_columns = extra_columns
        self.entries: list[dict[str, Any]] = []
        self._writer: ShardWriter | None = None
        self._count = 0

    def add(self, row: dict[str, Any], sample: PoolSample) -> None:
        if self._writer is None:
            self._writer = ShardWriter(self.cfg.output_folder, len(self.entries), sample.image_ext, self.extra_columns)
        self._writer.add(row, sample.image)
        self._count += 1
        if self._count == self.cfg.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if self._writer is None:
            return
        stats = {"count": self._count, "successes": self._count, "failed_to_download": 0, "failed_to_resize": 0}
        entry = self._writer.commit({"shard": self._writer.name, **stats})
        self.entries.append({**entry, "count": self._count})
        self._writer, self._count = None, 0


def reshard(cfg: ShardsConfig) -> dict[str, Any]:
    """Write the train shards and manifest.json; return the manifest."""
    start = time.time()
    pool_ids = sorted(committed_shards(cfg.pool))
    if not pool_ids:
        raise SystemExit(f"shards: no committed pool shards in {cfg.pool!r} (run ingest first)")
    first_tar = storage.join(cfg.pool, f"{shard_name(pool_ids[0])}.tar")
    if not storage.exists(first_tar):
        raise SystemExit(
            f"shards: {first_tar} not found: shards/ reads webdataset pools (tar + parquet per shard); "
            "ingest with --output_format webdataset (parquet and files pools are not supported here yet)"
        )
    storage.makedirs(cfg.output_folder)
    _remove_old_outputs(cfg.output_folder)
    sink: _TrainShardSink | None = None
    missing_images = 0
    for shard_id in tqdm(pool_ids, desc="shards", unit="pool shard", disable=not cfg.progress):
        name = shard_name(shard_id)
        keep = load_decisions(cfg.decisions, shard_id)
        with storage.open_file(storage.join(cfg.pool, f"{name}.parquet")) as handle:
            table = pq.read_table(handle)
        if sink is None:
            sink = _TrainShardSink(cfg, [c for c in table.column_names if c not in POOL_SCHEMA.names])
        rows = {row["key"]: row for row in table.to_pylist() if keep.get(row["key"])}
        for sample in iter_tar_samples(storage.join(cfg.pool, f"{name}.tar")):
            row = rows.pop(sample.key, None)
            if row is not None:
                sink.add(row, sample)
        missing_images += len(rows)  # kept in metadata but absent from the tar: a damaged pool
    assert sink is not None
    sink.flush()
    manifest = {
        "format": "webdataset",
        "layout": "{key}.jpg|webp|png, {key}.txt, {key}.json per sample; {shard}.parquet; {shard}" + STATS_SUFFIX,
        "shards": sink.entries,
        "total_samples": sum(e["count"] for e in sink.entries),
        "total_bytes": sum(e["bytes"] for e in sink.entries),
        "missing_images": missing_images,
        "inputs": {
            "pool": cfg.pool,
            "pool_shards": len(pool_ids),
            "decisions": cfg.decisions,
        },
        "config": to_dict(cfg),
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration": time.time() - start,
    }
    storage.write_json(storage.join(cfg.output_folder, MANIFEST), manifest)
    return manifest
