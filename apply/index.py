"""A faiss index over an embeddings folder, so images can be searched by text or by image.

Input: an embeddings folder (``python -m apply.embed``; clip-retrieval's layout,
committed by ``embeddings.json``). Output, a folder of its own (local or ``s3://``)::

    {output_folder}/index.faiss   the faiss index of the image embeddings (inner product:
                                  they are L2-normalised, so a score is a cosine)
    {output_folder}/rows.parquet  index row i -> key, url, caption, shard (the tar it was read
                                  from), image_width/height when known, emb_shard, emb_row
    {output_folder}/index.json    written last (the commit marker): the kind of index, why it
                                  was chosen, its search parameters, its recall@10 against
                                  exact search, and the checkpoint/model of the embeddings

Which index (``--index_type auto``, the default):

* ``flat`` (exact, ``IndexFlatIP``) up to ``--exact_max_rows`` rows (100,000 by default:
  an exact single query then costs about 9 ms on one core of the benchmark machine);
* ``ivf`` beyond it: ``IVF{nlist},SQfp16`` — k-means lists (nlist: the power of two nearest
  4·sqrt(rows)), vectors stored as float16 like the embeddings themselves, so nothing is
  lost by the storage; ``nprobe`` (lists visited per query) is tuned at build time: the
  smallest power of two whose recall@10 reaches ``--target_recall`` on tuning queries;
* ``hnsw`` on request (``HNSW32``; ``efSearch`` tuned the same way).

Recall@10 against exact search is then measured on other queries (held out from tuning)
and recorded. Queries are caption embeddings of rows drawn at random (seeded): text →
image search is what the index is for. The vectors are read shard by shard, and exact
answers for the queries are computed on the way, so nothing but the index is held whole.

Run ``python -m apply.index --help``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.config import ConfigError, DataError, at_least, one_of, option, parse_config, problem, require
from core.executor import Progress, progress_enabled

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
MARKER = "index.json"
EMBEDDINGS_MARKER = "embeddings.json"
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
ROW_COLUMNS = ("key", "url", "caption", "shard", "image_width", "image_height")
RECALL_K = 10
SEARCH_PARAMETER = {"ivf": "nprobe", "hnsw": "efSearch"}


@dataclass
class IndexConfig:
    embeddings: str = option("", "embeddings folder written by python -m apply.embed (local or s3://)")
    output_folder: str = option("", "where index.faiss, rows.parquet and index.json go (local or s3://)")
    index_type: str = option(
        "auto", "auto (flat up to exact_max_rows, else ivf), flat (exact), ivf (IVF lists, float16 vectors) "
        "or hnsw (a graph)")  # fmt: skip
    exact_max_rows: int = option(100_000, "auto: the largest index kept exact (a flat index)")
    target_recall: float = option(0.95, "ivf/hnsw: the recall@10 against exact that nprobe/efSearch is tuned to")
    recall_queries: int = option(1000, "queries drawn to tune (half) and to measure (half) recall@10")
    nlist: int = option(0, "ivf: number of lists; 0 = the power of two nearest 4*sqrt(rows)")
    seed: int = option(0, "seed of the query sample and of k-means: the same inputs give the same index")
    threads: int = option(0, "faiss threads; 0 = every CPU")
    progress: bool | None = option(None, "progress bar on stderr (none: only when stderr is a terminal)")

    def __post_init__(self) -> None:
        require(self, "embeddings", "output_folder")
        one_of(self, "index_type", INDEX_TYPES)
        at_least(self, 1, "exact_max_rows", "recall_queries")
        at_least(self, 0, "nlist", "threads")
        if not 0 < self.target_recall <= 1:
            problem(f"target_recall={self.target_recall}: must be within (0, 1]")


# -- reading an embeddings folder -------------------------------------------------------------


@dataclass(frozen=True)
class Embeddings:
    """An embeddings folder's committed contents: its marker, and its shards in order."""

    folder: str
    info: dict[str, Any]
    shards: list[tuple[int, int]]  # (n, rows), by n

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.shards)

    def image_path(self, n: int) -> str:
        return storage.join(self.folder, "img_emb", f"img_emb_{n}.npy")

    def text_path(self, n: int) -> str:
        return storage.join(self.folder, "text_emb", f"text_emb_{n}.npy")

    def metadata_path(self, n: int) -> str:
        return storage.join(self.folder, "metadata", f"metadata_{n}.parquet")


def open_embeddings(folder: str) -> Embeddings:
    """The folder's ``embeddings.json`` and shard list; a DataError says what is missing."""
    marker = storage.join(folder, EMBEDDINGS_MARKER)
    if not storage.exists(folder):
        raise DataError(f"--embeddings {folder}: no such folder")
    if not storage.exists(marker):
        raise DataError(f"--embeddings {folder}: no {EMBEDDINGS_MARKER} (not an embeddings folder, or its "
                        "python -m apply.embed run has not finished: rerun it)")  # fmt: skip
    info = storage.read_json(marker)
    try:
        shards = sorted((int(n), int(entry["rows"])) for n, entry in info["shards"].items())
        int(info["dim"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{marker}: not an embeddings marker ({type(exc).__name__}: {exc})") from None
    shards = [(n, rows) for n, rows in shards if rows > 0]
    if not shards:
        raise DataError(f"--embeddings {folder}: no embeddings in it (every shard has 0 rows)")
    return Embeddings(folder, info, shards)


def read_npy(path: str) -> np.ndarray:
    if not storage.exists(path):
        raise DataError(f"{path}: missing, though the embeddings folder is committed")
    with storage.open_file(path, "rb") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def read_vectors(path: str, rows: int, dim: int) -> np.ndarray:
    """One shard's embeddings as float32 (rows, dim), checked against the marker."""
    array = read_npy(path)
    if array.shape != (rows, dim):
        raise DataError(f"{path}: shape {array.shape}, but {EMBEDDINGS_MARKER} says ({rows}, {dim})")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_rows(emb: Embeddings, n: int, rows: int) -> pa.Table:
    """One shard's metadata in the index's row schema (the columns it lacks are null)."""
    path = emb.metadata_path(n)
    if not storage.exists(path):
        raise DataError(f"{path}: missing, though the embeddings folder is committed")
    with storage.open_file(path, "rb") as handle:
        table = pq.read_table(handle)
    if table.num_rows != rows or "key" not in table.column_names:
        raise DataError(f"{path}: {table.num_rows} rows{'' if 'key' in table.column_names else ' and no key column'}"
                        f"; {EMBEDDINGS_MARKER} says {rows}")  # fmt: skip
    columns = {}
    for name in ROW_COLUMNS:
        kind = pa.int32() if name.startswith("image_") else pa.string()
        columns[name] = table[name].cast(kind) if name in table.column_names else pa.nulls(rows, kind)
    columns["emb_shard"] = pa.array(np.full(rows, n, dtype=np.int32))
    columns["emb_row"] = pa.array(np.arange(rows, dtype=np.int32))
    return pa.table(columns)


# -- exact answers, kept while the vectors stream by ------------------------------------------------


class ExactTopK:
    """The exact top-k inner products of fixed queries over vectors seen in batches."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, vectors: np.ndarray, first_id: int) -> None:
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        ids = np.concatenate([self.ids, np.broadcast_to(np.arange(first_id, first_id + len(vectors)),
                                                        (len(self.queries), len(vectors)))], axis=1)  # fmt: skip
        if scores.shape[1] > self.k:
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        self.scores, self.ids = scores, ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k ids that the search found (ids < 0 are none)."""
    k = exact.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found[:, :k], exact))
    return hits / exact.size


# -- building ---------------------------------------------------------------------------------------


def choose(cfg: IndexConfig, rows: int) -> tuple[str, str]:
    """(index type, why) for ``rows`` vectors."""
    if cfg.index_type != "auto":
        return cfg.index_type, f"--index_type {cfg.index_type}"
    if rows <= cfg.exact_max_rows:
        return "flat", f"auto: {rows:,} rows <= exact_max_rows {cfg.exact_max_rows:,}: exact search"
    return "ivf", f"auto: {rows:,} rows > exact_max_rows {cfg.exact_max_rows:,}: approximate search (IVF)"


def ivf_lists(rows: int, requested: int = 0) -> int:
    """nlist: as requested, else the power of two nearest 4*sqrt(rows), with >= 39 training rows per list."""
    if requested:
        return requested
    lists = 2 ** round(math.log2(max(4 * math.sqrt(rows), 1)))
    while lists > 1 and lists > rows / 39:
        lists //= 2
    return lists


def factory_string(kind: str, nlist: int) -> str:
    return {"flat": "Flat", "ivf": f"IVF{nlist},SQfp16", "hnsw": "HNSW32"}[kind]


def set_search_parameter(index: faiss.Index, kind: str, value: int | None) -> None:
    if kind in SEARCH_PARAMETER and value:
        faiss.ParameterSpace().set_index_parameter(index, SEARCH_PARAMETER[kind], value)


def tune(index: faiss.Index, kind: str, queries: np.ndarray, exact: np.ndarray, target: float,
         limit: int) -> tuple[int | None, list[dict[str, float]]]:
    """The smallest power-of-two search parameter reaching ``target`` recall@10 (else the largest tried)."""
    if kind not in SEARCH_PARAMETER:
        return None, []
    tried, value = [], 1 if kind == "ivf" else 16
    while True:
        set_search_parameter(index, kind, value)
        _, found = index.search(queries, RECALL_K)
        recall = recall_at_k(found, exact)
        tried.append({SEARCH_PARAMETER[kind]: value, "recall_at_10": round(recall, 4)})
        if recall >= target or value >= limit:
            return value, tried
        value *= 2


def _sample_rows(emb: Embeddings, count: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """``count`` distinct global rows drawn at random, as {shard n: sorted local rows}."""
    chosen = np.sort(rng.choice(emb.rows, size=min(count, emb.rows), replace=False))
    out, start = {}, 0
    for n, rows in emb.shards:
        local = chosen[(chosen >= start) & (chosen < start + rows)] - start
        if len(local):
            out[n] = local
        start += rows
    return out


def _gather(emb: Embeddings, picks: dict[int, np.ndarray], text: bool) -> np.ndarray:
    dim, rows = int(emb.info["dim"]), dict(emb.shards)
    parts = []
    for n, local in picks.items():
        path = emb.text_path(n) if text else emb.image_path(n)
        if text and not storage.exists(path):
            path = emb.image_path(n)  # a folder without text embeddings: image queries instead
        parts.append(read_vectors(path, rows[n], dim)[local])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


@dataclass
class BuildResult:
    index: faiss.Index
    info: dict[str, Any]  # what index.json records
    rows: pa.Table


def build(cfg: IndexConfig, emb: Embeddings) -> BuildResult:
    """The index of ``emb``'s image embeddings, its rows, and what index.json records."""
    start = time.time()
    faiss.omp_set_num_threads(cfg.threads or os.cpu_count() or 1)
    dim, total = int(emb.info["dim"]), emb.rows
    kind, why = choose(cfg, total)
    nlist = ivf_lists(total, cfg.nlist) if kind == "ivf" else 0
    if kind == "ivf" and nlist > total:
        raise ConfigError(f"nlist={nlist}: more lists than rows ({total})")
    rng = np.random.default_rng(cfg.seed)
    queries = _gather(emb, _sample_rows(emb, cfg.recall_queries, rng), text=True)
    rng.shuffle(queries)
    index = faiss.index_factory(dim, factory_string(kind, nlist), faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":  # k-means on a sample: 40 rows a list is plenty (faiss asks for >= 39)
        training = _gather(emb, _sample_rows(emb, 40 * nlist, rng), text=False)
        index.cp.seed = cfg.seed
        index.train(training)
        del training
    exact = ExactTopK(queries, RECALL_K)
    tables = []
    bar = Progress("index", unit="shard", item="vector", total=total, enabled=progress_enabled(cfg.progress))
    try:
        for n, rows in emb.shards:
            vectors = read_vectors(emb.image_path(n), rows, dim)
            tables.append(read_rows(emb, n, rows))
            exact.add(vectors, index.ntotal)
            index.add(vectors)
            bar.add({"items": rows})
    finally:
        bar.close()
    half = len(queries) // 2 if kind != "flat" else 0
    limit = nlist if kind == "ivf" else 1024
    value, tried = tune(index, kind, queries[:half], exact.ids[:half], cfg.target_recall, limit)
    set_search_parameter(index, kind, value)
    check, check_ids = queries[half:], exact.ids[half:]
    _, found = index.search(check, RECALL_K)
    recall = recall_at_k(found, check_ids)
    info = {
        "type": kind,
        "faiss": factory_string(kind, nlist),
        "metric": "inner_product",
        "choice": why,
        "rows": total,
        "dim": dim,
        "search": {SEARCH_PARAMETER[kind]: value} if value else {},
        "nlist": nlist or None,
        "recall_at_10": {
            "value": round(recall, 4),
            "queries": len(check),
            "against": "exact inner product (numpy, over every row)",
            "queries_from": "caption embeddings of rows drawn at random (seed %d)" % cfg.seed,
            "tuning": tried,
            "target": cfg.target_recall if kind != "flat" else None,
        },
        "build_seconds": round(time.time() - start, 3),
        "embeddings": emb.folder,
        **{k: emb.info.get(k) for k in ("checkpoint", "model", "model_config", "step", "image_size")},
        "files": {"index": INDEX_FILE, "rows": ROWS_FILE},
        "config": {k: getattr(cfg, k) for k in ("index_type", "exact_max_rows", "target_recall",
                                                "recall_queries", "nlist", "seed")},
    }  # fmt: skip
    return BuildResult(index, info, pa.concat_tables(tables))


def write(output_folder: str, result: BuildResult) -> dict[str, Any]:
    """Index, then rows, then the marker (with the index's size in bytes); returns the marker's content."""
    marker = storage.join(output_folder, MARKER)
    storage.makedirs(output_folder)
    if storage.exists(marker):
        storage.remove(marker)  # the folder is being rewritten: not an index until the end
    with tempfile.TemporaryDirectory() as tmp:  # written here first, then copied: local or s3:// alike
        faiss.write_index(result.index, os.path.join(tmp, INDEX_FILE))
        pq.write_table(result.rows, os.path.join(tmp, ROWS_FILE), compression="zstd")
        for name in (INDEX_FILE, ROWS_FILE):
            with open(os.path.join(tmp, name), "rb") as src, \
                    storage.atomic_write(storage.join(output_folder, name), "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    fs, path = storage.filesystem(storage.join(output_folder, INDEX_FILE))
    info = {**result.info, "index_bytes": int(fs.size(path))}
    storage.write_json(marker, info)
    return info


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build and write the index of ``cfg.embeddings``; returns what index.json records."""
    emb = open_embeddings(cfg.embeddings)
    return write(cfg.output_folder, build(cfg, emb))


# -- reading an index back ----------------------------------------------------------------------------


@dataclass
class SearchIndex:
    """A written index, ready to answer: ``search(vectors, k)`` -> (scores, index rows)."""

    folder: str
    index: faiss.Index
    rows: pa.Table
    info: dict[str, Any]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        return self.index.search(vectors, min(k, self.index.ntotal))

    def vector(self, row: int) -> np.ndarray:
        """The stored image embedding of index row ``row``."""
        return self.index.reconstruct(int(row))

    def row(self, row: int) -> dict[str, Any]:
        return {name: self.rows[name][int(row)].as_py() for name in self.rows.column_names}

    def row_of_key(self, key: str) -> int | None:
        if not hasattr(self, "_keys"):
            self._keys = {k: i for i, k in enumerate(self.rows["key"].to_pylist())}
        return self._keys.get(key)


def open_index(folder: str, threads: int = 1) -> SearchIndex:
    """The index committed in ``folder``; a DataError says what is missing.

    Searches run on ``threads`` faiss threads (a process-wide setting). One by default: a
    single query gains nothing from more, and on a machine whose cores are busy OpenMP's
    threads wait on each other (an exact query over 100,000 rows: 9 ms on one thread, 44 ms
    on two, on the benchmark machine under load); a server answers concurrent queries from
    its own threads instead.
    """
    faiss.omp_set_num_threads(threads)
    marker = storage.join(folder, MARKER)
    if not storage.exists(marker):
        raise DataError(f"--index {folder}: no {MARKER} (not an index folder, or its python -m apply.index "
                        "run has not finished: rerun it)")  # fmt: skip
    info = storage.read_json(marker)
    index_path, rows_path = storage.join(folder, INDEX_FILE), storage.join(folder, ROWS_FILE)
    for path in (index_path, rows_path):
        if not storage.exists(path):
            raise DataError(f"{path}: missing, though the index folder is committed; rebuild it")
    if storage.is_local(index_path):
        index = faiss.read_index(storage.filesystem(index_path)[1])
    else:
        with storage.open_file(index_path, "rb") as handle:
            index = faiss.deserialize_index(np.frombuffer(handle.read(), dtype=np.uint8))
    if info.get("type") == "ivf":
        index.make_direct_map()  # reconstruct(row): the vector of a key, for "more like this"
    set_search_parameter(index, info.get("type", ""), next(iter(info.get("search", {}).values()), None))
    with storage.open_file(rows_path, "rb") as handle:
        rows = pq.read_table(handle)
    if rows.num_rows != index.ntotal:
        raise DataError(f"{folder}: {rows.num_rows} rows in {ROWS_FILE}, {index.ntotal} in {INDEX_FILE}; rebuild it")
    return SearchIndex(folder, index, rows, info)


# -- command line -------------------------------------------------------------------------------------

DESCRIPTION = """\
Build a faiss index over an embeddings folder (python -m apply.embed): exact (flat) up
to --exact_max_rows rows, approximate (IVF lists, float16 vectors) beyond, its search
parameter tuned to --target_recall and its recall@10 against exact search measured on
held-out caption queries. Writes index.faiss, rows.parquet (row -> key, url, caption,
shard) and index.json (the choice and why, the recall, the checkpoint), the marker last.
Search it with python -m apply.search.

  python -m apply.index --embeddings data/demo/embeddings --output_folder data/demo/index
"""


def main(argv: list[str] | None = None) -> int:
    """The command; every error ends in one explained line (``core.cli.run``: exit codes 1, 2, 130)."""
    from core import cli

    return cli.run("python -m apply.index", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(IndexConfig, argv, prog="python -m apply.index", description=DESCRIPTION)
    from core import cli

    cli.hold_output(cfg.output_folder)
    info = run_index(cfg)
    search = ", ".join(f"{k} {v}" for k, v in info["search"].items())
    print(f"{info['rows']:,} vectors of dim {info['dim']}: {info['type']} index ({info['faiss']}"
          f"{', ' + search if search else ''}) in {info['build_seconds']:.1f}s, {info['index_bytes']:,} bytes")
    print(f"  {info['choice']}")
    print(f"  recall@10 against exact: {info['recall_at_10']['value']:.3f} "
          f"({info['recall_at_10']['queries']} queries)")
    print(f"written to {cfg.output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
