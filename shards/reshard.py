"""Pool + decisions → train shards of uniform size, mixed across pool shards.

The driver counts the kept samples of every pool shard (decisions only), builds the
plan (``shards/plan.py``: which global position goes to which train shard) and hands
ranges of train shards to ``core.executor`` as units (local processes, Ray tasks, or
inline). A unit opens the pool shards its
positions come from, streams each tar once — skipping the kept samples that belong to
earlier train shards — and copies the members of its samples byte for byte (images
are not re-encoded; nothing is unpickled) into train shards written by the same
``ShardWriter`` as the pool, so train shards have the pool's layout and keys: any
train sample traces back to its input row.

Resumable: a train shard is committed by its ``_stats.json`` (written last, holding its
files' bytes and sha256), and the plan with its inputs' fingerprints is stored in
``_reshard_plan.json``. A rerun with the same plan rewrites only the missing shards;
a rerun whose plan differs (other pool, decisions or settings) stops and says so,
unless ``--overwrite`` is given. ``manifest.json`` is written last, from the markers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.config import to_dict
from core.errors import DataError
from core.executor import Executor
from core.layout import (
    POOL_SCHEMA,
    STATS_SUFFIX,
    committed_shards,
    folder_fingerprint,
    image_member,
    shard_id_of,
    shard_name,
)
from core.shard_writer import ShardWriter, clean_stale_staging
from core.tarreader import TarStreamError, iter_tar_samples
from shards.config import ShardsConfig
from shards.manifest import FILTER_STATS, MANIFEST, PLAN_FILE, build_manifest, pool_inputs
from shards.plan import ReshardPlan

ROW_BATCH = 512  # pool rows turned into Python dicts at a time


class DamagedPool(RuntimeError):
    """The pool's tar and parquet disagree: a kept sample's image is missing."""


@dataclass
class PoolSample:
    key: str
    image: bytes
    image_ext: str


def iter_pool_images(path: str) -> Iterator[PoolSample]:
    """The image of each sample of a shard tar, in tar order; samples without one are skipped."""
    with storage.open_file(path) as handle:
        for sample in iter_tar_samples(handle, reopen=lambda: storage.open_file(path)):
            image = image_member(sample.members)
            if image is not None:
                yield PoolSample(sample.key, image[1], image[0])


# -- reading the pool -----------------------------------------------------------------------


def _kept_count(decisions: str, shard_id: int) -> int:
    path = storage.join(decisions, f"{shard_name(shard_id)}.parquet")
    if not storage.exists(path):
        raise SystemExit(f"shards: {path} not found: the decisions do not cover pool shard {shard_name(shard_id)} "
                         "(run the filter on this pool)")
    with storage.open_file(path) as handle, storage.parquet_errors(
            path, "decisions must be the folder `python -m filter` wrote"):
        keep = pq.read_table(handle, columns=["keep"])["keep"]
    return int(pc.sum(pc.fill_null(keep, False)).as_py() or 0)


def iter_kept(pool: str, decisions: str, shard_id: int) -> Iterator[tuple[dict[str, Any], PoolSample]]:
    """(metadata row, image) of each kept sample of a pool shard, in key order."""
    name = shard_name(shard_id)
    with storage.open_file(storage.join(decisions, f"{name}.parquet")) as handle:
        decided = pq.read_table(handle, columns=["key", "keep"])
    kept = decided.filter(pc.fill_null(decided["keep"], False))["key"]
    with storage.open_file(storage.join(pool, f"{name}.parquet")) as handle:
        table = pq.read_table(handle)
    table = table.filter(pc.is_in(table["key"], value_set=kept.combine_chunks()))
    table = table.take(pc.sort_indices(table["key"]))
    rows = _row_batches(table)
    expected = next(rows, None)
    tar = storage.join(pool, f"{name}.tar")
    try:
        for sample in iter_pool_images(tar):
            if expected is None:
                return
            if sample.key == expected["key"]:
                yield expected, sample
                expected = next(rows, None)
            elif sample.key > expected["key"]:
                break
    except TarStreamError as exc:
        raise DamagedPool(f"{tar}: {exc}; run `python -m shards.verify --folder {pool}`") from None
    if expected is not None:
        raise DamagedPool(f"{tar}: kept sample {expected['key']} has no image in the tar (the tar and "
                          f"{name}.parquet disagree); run `python -m shards.verify --folder {pool}`")


def _row_batches(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=ROW_BATCH):
        yield from batch.to_pylist()


# -- one task: a range of train shards -------------------------------------------------------


def write_train_shards(cfg: ShardsConfig, plan: ReshardPlan, first: int, last: int, done: set[int],
                       extra_columns: list[str]) -> list[int]:
    """Write train shards ``first .. last - 1`` (except those in ``done``); return the ones written."""
    fingerprint = plan.fingerprint()
    t, in_shard, writer = first, 0, None
    size = plan.shard_size(t)
    written: list[int] = []
    for segment in plan.segments(first, last):
        streams = [iter_kept(cfg.pool, cfg.decisions, p) for p in segment.pool_shards]
        for stream, skip in zip(streams, segment.skip):
            for _ in range(skip):
                _next(stream, segment)
        for label in segment.labels.tolist():
            row, sample = _next(streams[label], segment)
            if t not in done:
                if writer is None:
                    writer = ShardWriter(cfg.output_folder, t, sample.image_ext, extra_columns)
                writer.add(row, sample.image, sample.image_ext)
            in_shard += 1
            if in_shard == size:
                if writer is not None:
                    writer.commit({"shard": shard_name(t), "count": in_shard, "successes": in_shard,
                                   "failed_to_download": 0, "failed_to_resize": 0,
                                   "plan": fingerprint})
                    written.append(t)
                t, in_shard, writer = t + 1, 0, None
                size = plan.shard_size(t)
        for stream in streams:
            stream.close()
    if writer is not None:  # the plan and the streams disagree: never commit a short shard
        writer.close()
        raise DamagedPool(f"train shard {shard_name(t)}: the pool ran out of kept samples")
    return written


def write_unit(cfg: ShardsConfig, plan: ReshardPlan, done: set[int], extra_columns: list[str],
               unit: tuple[int, int]) -> list[int]:
    """One unit of the executor: the train shards ``unit = (first, last)``."""
    return write_train_shards(cfg, plan, *unit, done, extra_columns)


def _next(stream: Iterator, segment) -> tuple[dict[str, Any], PoolSample]:
    try:
        return next(stream)
    except StopIteration:
        raise DamagedPool(f"pool shards {[shard_name(p) for p in segment.pool_shards]}: fewer kept samples "
                          "in the tars than the decisions say") from None


# -- the driver --------------------------------------------------------------------------------


def _check_pool(cfg: ShardsConfig, pool_ids: list[int]) -> list[str]:
    """Refuse what cannot be resharded, up front; return the pool's extra columns."""
    if not pool_ids:
        raise SystemExit(f"shards: no committed pool shards in {cfg.pool!r} (run ingest first)")
    present = {p.rsplit("/", 1)[-1] for p in storage.list_files(cfg.pool)}
    missing = [f"{shard_name(i)}.{ext}" for i in pool_ids for ext in ("tar", "parquet")
               if f"{shard_name(i)}.{ext}" not in present]
    if f"{shard_name(pool_ids[0])}.tar" in missing:
        raise SystemExit(
            f"shards: {storage.join(cfg.pool, shard_name(pool_ids[0]) + '.tar')} not found: shards/ reads webdataset "
            "pools (tar + parquet per shard); ingest with --output_format webdataset (parquet and files pools are "
            "not supported here yet)"
        )
    if missing:
        raise SystemExit(f"shards: the pool is damaged: committed shards without their files: "
                         f"{', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} "
                         f"(`python -m shards.verify --folder {cfg.pool}` lists everything)")
    first = storage.join(cfg.pool, f"{shard_name(pool_ids[0])}.parquet")
    with storage.open_file(first) as handle, storage.parquet_errors(first):
        names = pq.ParquetFile(handle).schema_arrow.names
    return [c for c in names if c not in POOL_SCHEMA.names]


def check_decisions(pool: str, decisions: str, pool_fingerprint: str) -> None:
    """Decisions whose filter run did not finish, or that were made from another pool, are refused."""
    stats_path = storage.join(decisions, FILTER_STATS)
    if not storage.exists(stats_path):
        raise DataError(f"decisions={decisions!r}: no {FILTER_STATS} there, so the filter run that wrote them did not "
                        f"finish (or this is not a decisions folder); rerun `python -m filter --pool {pool} "
                        f"--output_folder {decisions}`")
    made_from = storage.read_json(stats_path).get("pool_fingerprint")
    if made_from is not None and made_from != pool_fingerprint:
        raise DataError(f"decisions={decisions!r} were made from another pool than pool={pool!r} (or the pool changed "
                        f"since: its fingerprint differs); rerun `python -m filter --pool {pool}` into a new folder "
                        "and pass that as --decisions")


def _prepare_output(cfg: ShardsConfig, identity: dict[str, Any]) -> set[int]:
    """Check a previous run's plan; return the train shards already committed under it."""
    storage.makedirs(cfg.output_folder)
    clean_stale_staging(cfg.output_folder)  # what a killed run was still writing
    plan_path = storage.join(cfg.output_folder, PLAN_FILE)
    previous = storage.read_json(plan_path) if storage.exists(plan_path) else None
    leftovers = [p for p in storage.list_files(cfg.output_folder) if shard_id_of(p) is not None]
    if previous != identity and (previous is not None or leftovers):
        if not cfg.overwrite:
            what = ("train shards of another plan" if previous is not None else "shards of unknown origin")
            differs = sorted(k for k in identity if (previous or {}).get(k) != identity[k])
            raise SystemExit(f"shards: {cfg.output_folder!r} holds {what} (differs in: {', '.join(differs)}); "
                             "choose another output_folder or rerun with --overwrite true to replace them")
        print(f"shards: overwrite: deleting {len(leftovers)} files of {len({shard_id_of(p) for p in leftovers})} "
              f"train shards of another plan in {cfg.output_folder}", file=sys.stderr)
        for path in leftovers + [storage.join(cfg.output_folder, MANIFEST)]:
            storage.remove(path)
    if previous != identity:
        storage.write_json(plan_path, identity)
        return set()
    return committed_shards(cfg.output_folder)


def reshard(cfg: ShardsConfig) -> dict[str, Any]:
    """Write the train shards and manifest.json; return the manifest (with the run's object-storage retries)."""
    start, retries = time.time(), storage.retry_counts()
    storage.refuse_overlap("output_folder", cfg.output_folder, {"pool": cfg.pool, "decisions": cfg.decisions})
    pool_ids = sorted(committed_shards(cfg.pool))
    extra_columns = _check_pool(cfg, pool_ids)
    pool_fingerprint = folder_fingerprint(cfg.pool, pool_ids, (".parquet", STATS_SUFFIX))
    check_decisions(cfg.pool, cfg.decisions, pool_fingerprint)  # before the decisions are read
    plan = ReshardPlan.build({i: _kept_count(cfg.decisions, i) for i in pool_ids},
                             cfg.samples_per_shard, cfg.mix_window, cfg.seed)
    inputs = pool_inputs(cfg.pool, cfg.decisions, pool_ids, pool_fingerprint)
    identity = {"plan": plan.describe(), "plan_fingerprint": plan.fingerprint(),
                "pool_fingerprint": inputs["pool"]["fingerprint"],
                "decisions_fingerprint": inputs["decisions"]["fingerprint"]}
    done = _prepare_output(cfg, identity)
    # Markers beyond the plan cannot exist (same plan); a marker without its files would be a bug.
    units = [(a, b) for a, b in plan.units(cfg.max_shards_per_task) if not set(range(a, b)) <= done]
    if units:
        with Executor(cfg, desc=f"shards: {plan.train_shards - len(done)} train shards", unit="task") as ex:
            for _ in ex.map(partial(write_unit, cfg, plan, done, extra_columns), units):
                pass
    entries = []
    for t in range(plan.train_shards):
        marker = storage.read_json(storage.join(cfg.output_folder, shard_name(t) + STATS_SUFFIX))
        tar, metadata = marker["files"]
        entries.append({**tar, "count": marker["count"], "metadata": metadata})
    manifest = build_manifest(entries, inputs, plan.describe(), to_dict(cfg), time.time() - start)
    manifest.update(storage.retries_since(retries))
    storage.write_json(storage.join(cfg.output_folder, MANIFEST), manifest)
    return manifest
