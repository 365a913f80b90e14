"""The job-wide (URL, caption) dedupe, as a sort/partition pass that no process outgrows.

Rule (``ingest.plan``): of the rows with equal ``fingerprint(url, caption)``, the first in
job order is kept and every later one is ``dup_url``; rows the reader flagged and rows
without a URL take no part. A row's *position* is ``shard_id * rows_per_shard + row``,
which orders the job. Three steps, before any download:

1. **Fingerprints** (``spill_chunk``, executor units, in parallel): the driver streams the
   input once and hands out chunks of ``CHUNK_ROWS`` eligible rows (their positions, URLs
   and captions); a unit normalises and hashes them and writes their (fingerprint,
   position) records to ``{output_folder}/_plan/chunks/{chunk}.bin``.
   **Runs** (``merge_chunks``): every ``MERGE_CHUNKS`` chunk files become one run file,
   ``_plan/runs/{run}.bin``, sorted by fingerprint behind an index of where each of
   ``BUCKETS`` fingerprint ranges starts (chunks stay small for the driver's sake; runs
   keep the next step's reads few and large, which object storage wants).
2. **Duplicates** (``find_duplicates``, one unit per partition, in parallel): a partition is
   a range of whole buckets, as many as hold at most ``plan_rows_per_partition`` records
   (fingerprints are uniform). A unit reads its slice of every run, keeps
   the first position of each fingerprint (``core.groups.first_of_groups``: the filter's
   rule for its own repeats, one implementation) and writes the others, sorted, to
   ``_plan/dups/{partition}.bin``, behind an index of where each block of ``block_rows``
   positions starts (``BLOCK_PARTITIONS`` partitions' worth).
3. **Marks** (``DuplicateMarks``, in the driver, as shards are read again for download):
   a block's duplicate positions are gathered from every partition's file, and each shard
   takes its own.

Memory: a unit holds its chunk, run or partition (about 60 bytes a record); the driver the
chunks in flight and one block's duplicate positions (8 bytes each), whatever the job's
size, up to ``BUCKETS`` times ``plan_rows_per_partition`` rows (17 billion by default).
The spill takes 16 bytes per eligible row, on the output folder (so it works on ``s3://`` and
on a cluster whose workers share that folder). Why a sort rather than a shared hash set:
nothing is held job-wide anywhere, every step is a pure function of the input (the same
marks with 1 or 1,000 partitions, on any distributor, on a rerun), and each step is
ordinary executor units that retry as any unit does. Why runs indexed by fingerprint
bucket rather than one spill file per partition: the partition count is chosen after
the rows are counted (a text list has no row count up front), and the files stay few
(a run per 4M rows, not a file per chunk and partition) on object storage.

The plan is a scratch record: recomputed on every run, resumed ones included (the reread
costs a fraction of the job's download: BENCHMARKS.md), and ``_plan/`` removed when the run
ends (a failed one too); a killed run's leftover is removed when the next run starts planning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from core import storage
from core.executor import Executor, report
from core.groups import first_of_groups
from ingest.plan import eligible_rows, fingerprint
from ingest.reader import ShardInput

PLAN_FOLDER = "_plan"
ROWS_PER_PARTITION = 1 << 22  # default: ~0.3 GiB in a duplicates unit (~60 bytes a record + imports)
BLOCK_PARTITIONS = 4  # positions per block of marks, in partitions: fewer reads, at most 32 bytes a partition row
CHUNK_ROWS = 1 << 14  # eligible rows per fingerprint unit (~5 MiB in the driver): 2 x workers in flight
MERGE_CHUNKS = 256  # chunk files per run (4M rows, 64 MiB): the partitions read 256 times fewer, larger slices
BUCKET_BITS = 12
BUCKETS = 1 << BUCKET_BITS  # fingerprint ranges indexed in each run; the most partitions a job gets
RECORD = np.dtype([("fp", "<u8"), ("pos", "<u8")])
INDEX = np.dtype("<u8")
READ_THREADS = 16  # concurrent range reads of one unit (object storage: latency, not bandwidth)


@dataclass(frozen=True)
class Chunk:
    """Eligible rows, in job order, for one fingerprint unit."""

    index: int
    positions: np.ndarray
    urls: list[str]
    captions: list[str | None]


@dataclass(frozen=True)
class Partition:
    """One duplicates unit: fingerprint buckets ``[first, last)`` of ``runs`` run files."""

    index: int
    first: int
    last: int
    runs: int
    block_rows: int
    blocks: int


def _path(folder: str, kind: str, n: int) -> str:
    """``_plan/chunks/``, ``runs/`` or ``dups/`` (a partition's) file number ``n``."""
    return storage.join(folder, kind, f"{n:07d}.bin")


def _write(path: str, index: np.ndarray, payload: np.ndarray) -> None:
    """``index`` (uint64 offsets into ``payload``, in items), then ``payload``: one object."""
    with storage.atomic_write(path, size=index.nbytes + payload.nbytes) as handle:
        handle.write(index.astype(INDEX).tobytes())
        handle.write(payload.tobytes())


def _read(path: str, entries: int, dtype: np.dtype, start: int, stop: int | None) -> np.ndarray:
    """Items ``[start, stop)`` of ``dtype`` (``stop`` None: to the end) after an ``entries``-long index."""
    if stop is not None and stop <= start:
        return np.empty(0, dtype)
    with storage.open_file(path) as handle:
        handle.seek(entries * INDEX.itemsize + start * dtype.itemsize)
        return np.frombuffer(handle.read(-1 if stop is None else (stop - start) * dtype.itemsize), dtype)


def _read_into(path: str, entries: int, start: int, out: np.ndarray) -> None:
    """Fill ``out`` with the items from ``start`` on, after an ``entries``-long index."""
    view = memoryview(out.view(np.uint8))
    with storage.open_file(path) as handle:
        handle.seek(entries * INDEX.itemsize + start * out.dtype.itemsize)
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise EOFError(f"{path}: ends {len(view) - done} bytes early")
            done += got


# -- the units ------------------------------------------------------------------------------------


def spill_chunk(folder: str, chunk: Chunk) -> int:
    """Step 1: a chunk's (fingerprint, position) records, in job order; returns its row count."""
    digests = b"".join(fingerprint(url, caption) for url, caption in zip(chunk.urls, chunk.captions))
    records = np.empty(len(chunk.urls), RECORD)
    records["fp"] = np.frombuffer(digests, "<u8")
    records["pos"] = chunk.positions
    _write(_path(folder, "chunks", chunk.index), np.empty(0, INDEX), records)
    report(len(records))
    return len(records)


def merge_chunks(folder: str, run: tuple[int, range]) -> None:
    """Step 1b: chunk files as one run, sorted by fingerprint behind its bucket index."""
    index, chunks = run
    path = _path(folder, "runs", index)
    if not storage.exists(path):  # else a retry after the run was written: only the removal is left
        records = np.concatenate([_read(_path(folder, "chunks", c), 0, RECORD, 0, None) for c in chunks])
        records = records[np.argsort(records["fp"])]  # the order among equal fingerprints never matters: first_of_groups sorts by position
        starts = np.searchsorted(records["fp"], np.arange(BUCKETS, dtype=np.uint64) << np.uint64(64 - BUCKET_BITS))
        _write(path, np.append(starts, len(records)), records)
        report(len(records))
    for c in chunks:
        storage.remove(_path(folder, "chunks", c))


def find_duplicates(folder: str, part: Partition) -> int:
    """Step 2: the positions of all but the first of each fingerprint in a partition; returns their count."""
    paths = [_path(folder, "runs", r) for r in range(part.runs)]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # each run's slice read straight into one array
        bounds = list(pool.map(lambda path: _read(path, 0, INDEX, part.first, part.last + 1)[[0, -1]], paths))
        ends = np.cumsum([0] + [int(stop - start) for start, stop in bounds])
        records = np.empty(ends[-1], RECORD)
        list(pool.map(lambda r: _read_into(paths[r], BUCKETS + 1, int(bounds[r][0]), records[ends[r]:ends[r + 1]]),
                      range(len(paths))))
    total = len(records)
    dups = np.sort(first_of_groups(records["fp"], records["pos"])[0])  # the rule of every dedupe here: the first position wins
    del records
    starts = np.searchsorted(dups, np.arange(part.blocks + 1, dtype=np.uint64) * np.uint64(part.block_rows))
    starts[-1] = dups.size
    _write(_path(folder, "dups", part.index), starts, dups.astype("<u8"))
    report(int(total))
    return int(dups.size)


# -- the driver's side ----------------------------------------------------------------------------


class DuplicateMarks:
    """Step 3: each shard's duplicate rows, gathered a block of positions at a time (shards in order)."""

    def __init__(self, folder: str, partitions: int, rows_per_shard: int, block_rows: int, blocks: int):
        self.folder, self.partitions, self.rows_per_shard = folder, partitions, rows_per_shard
        self.block_rows, self.blocks = block_rows, blocks
        self._block, self._positions = -1, np.empty(0, np.uint64)
        self._indexes: list[np.ndarray] | None = None

    def rows(self, shard: ShardInput) -> np.ndarray:
        """Row indices of ``shard`` marked ``dup_url``, ascending."""
        first = shard.shard_id * self.rows_per_shard
        block = first // self.block_rows  # block_rows is a multiple of rows_per_shard: one block per shard
        if block != self._block:
            self._load(block)
        positions = self._positions
        lo, hi = np.searchsorted(positions, [first, first + len(shard)])
        return (positions[lo:hi] - np.uint64(first)).astype(np.int64)

    def _load(self, block: int) -> None:
        self._block, self._positions = block, np.empty(0, np.uint64)
        if block >= self.blocks or not self.partitions:
            return
        paths = [_path(self.folder, "dups", p) for p in range(self.partitions)]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            if self._indexes is None:
                self._indexes = list(pool.map(lambda p: _read(p, 0, INDEX, 0, self.blocks + 1), paths))
            parts = pool.map(lambda pi: _read(pi[0], self.blocks + 1, INDEX, int(pi[1][block]), int(pi[1][block + 1])),
                             zip(paths, self._indexes))
            self._positions = np.sort(np.concatenate(list(parts)))


def _chunks(shards: Iterable[ShardInput], rows_per_shard: int, tally: dict) -> Iterator[Chunk]:
    """Chunks of ``CHUNK_ROWS`` eligible rows from the shards; ``tally``: the rows and positions seen."""
    positions: list[int] = []
    urls: list[str] = []
    captions: list[str | None] = []
    index = 0
    for shard in shards:
        base = shard.shard_id * rows_per_shard
        for i in eligible_rows(shard):
            positions.append(base + i)
            urls.append(shard.urls[i])
            captions.append(shard.captions[i])
            if len(urls) == CHUNK_ROWS:
                yield Chunk(index, np.asarray(positions, np.uint64), urls, captions)
                index, positions, urls, captions = index + 1, [], [], []
        tally["positions"] = base + len(shard)
    if urls:
        yield Chunk(index, np.asarray(positions, np.uint64), urls, captions)


def plan_duplicates(executor: Executor, output_folder: str, shards: Iterable[ShardInput], rows_per_shard: int,
                    rows_per_partition: int) -> DuplicateMarks:
    """Steps 1, 1b and 2 over ``shards`` (every shard of the job, in order) on ``executor``'s workers."""
    folder = storage.join(output_folder, PLAN_FOLDER)
    storage.remove(folder)  # a crashed run's leftover: its chunks may not match this run's
    tally = {"positions": 0}
    spilled = list(executor.map(partial(spill_chunk, folder), _chunks(shards, rows_per_shard, tally),
                                desc="plan: fingerprints"))
    rows, chunks = sum(spilled), len(spilled)
    runs = [(r, range(c, min(c + MERGE_CHUNKS, chunks))) for r, c in enumerate(range(0, chunks, MERGE_CHUNKS))]
    for _ in executor.map(partial(merge_chunks, folder), runs, desc="plan: runs"):
        pass
    # Whole buckets per partition, at most rows_per_partition rows (fingerprints are uniform).
    per_partition = max(1, rows_per_partition * BUCKETS // max(rows, 1))
    partitions = math.ceil(BUCKETS / per_partition) if rows else 0
    block_rows = rows_per_shard * max(1, BLOCK_PARTITIONS * rows_per_partition // rows_per_shard)
    blocks = math.ceil(tally["positions"] / block_rows)
    units = [Partition(p, p * per_partition, min(BUCKETS, (p + 1) * per_partition), len(runs), block_rows, blocks)
             for p in range(partitions)]
    for _ in executor.map(partial(find_duplicates, folder), units, desc="plan: duplicates"):
        pass
    return DuplicateMarks(folder, partitions, rows_per_shard, block_rows, blocks)
