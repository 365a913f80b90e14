"""Pass 1 of the filter, one pool shard at a time: every row's facts and per-row verdict.

A *fact table* has one row per pool row: its ``row_id`` (``shard << 32 | row``:
ordered like keys), the first per-row rule it fails (``pre_reason``), and the
numbers the global passes need — URL fingerprint, the 128-bit image digest, the
pHash, the CLIP score (from score files, or the cosine of the
sample's embeddings) — plus the scores the decisions file reports (language,
luma spread). Per-row rules look at one row only, so this pass runs anywhere, in
any order; everything that compares rows happens later, in ``filter.dedupe``.

The per-row rules themselves live in ``filter.rules`` (with the order that names a
row's reason); contamination with the evaluation set is checked here, a shard at a
time, because it compares against the evaluation hashes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apply.embeddings import shard_scores
from core import storage
from core.errors import DataError
from core.layout import shard_name
from core.reasons import Reason
from core.urls import normalize_url
from filter.config import FilterConfig
from filter.dedupe import hamming_to_set
from filter.rules import row_reason

FACT_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("pre_reason", pa.string()),  # first failing per-row rule, null if none
        ("url_fp", pa.uint64()),  # of the normalised URL; 0 for rows that did not download
        ("sha_hi", pa.uint64()),
        ("sha_lo", pa.uint64()),
        ("phash", pa.uint64()),
        ("clip_score", pa.float32()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("luma_std", pa.float32()),
        ("log_aspect", pa.float32()),  # log(original width / height), for the near-duplicate guard
    ]
)
POOL_COLUMNS = ["key", "url", "caption", "status", "reason", "width", "height", "original_width",
                "original_height", "sha256", "phash", "luma_std"]


class PoolReadError(DataError):
    """A pool parquet that cannot be read: the message names the file."""


def row_id(shard_id: int, index: int) -> int:
    return (shard_id << 32) | index


def read_pool_rows(pool: str, shard_id: int) -> tuple[list[dict], set[str]]:
    """The shard's rows in key order, and the optional columns the pool lacks."""
    path = storage.join(pool, f"{shard_name(shard_id)}.parquet")
    try:
        with storage.open_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            missing_required = [c for c in ("key", "status") if c not in present]
            if missing_required:
                raise PoolReadError(f"{path}: not a pool parquet (no column {', '.join(missing_required)})")
            table = parquet.read(columns=[c for c in POOL_COLUMNS if c in present])
    except PoolReadError:
        raise
    except Exception as exc:  # truncated, not parquet, unreadable
        raise PoolReadError(f"{path}: cannot read this pool parquet ({type(exc).__name__}: {exc})") from exc
    return table.sort_by("key").to_pylist(), set(POOL_COLUMNS) - present


def read_clip_scores(folder: str, shard_id: int) -> dict[str, float]:
    """key → CLIP score for one shard (empty if the scorer wrote no file for it)."""
    path = storage.join(folder, f"{shard_name(shard_id)}.parquet")
    if not storage.exists(path):
        return {}
    with storage.open_file(path) as handle, storage.parquet_errors(
            path, "clip_scores must be the folder `python -m filter.clipscore` wrote"):
        table = pq.read_table(handle, columns=["key", "clip_score"])
    return {k: v for k, v in zip(table.column("key").to_pylist(), table.column("clip_score").to_pylist())
            if v is not None}


def _hex64(text: str | None) -> int | None:
    try:
        return int(text, 16) if text and len(text) == 16 else None
    except ValueError:
        return None


def _digest(text: str | None) -> tuple[int, int] | None:
    try:
        raw = bytes.fromhex(text) if text else b""
    except ValueError:
        return None
    if len(raw) < 16:
        return None
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big")


def _fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def shard_facts(pool: str, shard_id: int, cfg: FilterConfig, eval_hashes: np.ndarray | None) -> tuple[pa.Table, dict]:
    """The fact table of one pool shard, and notes for the stats (skipped checks)."""
    rows, missing = read_pool_rows(pool, shard_id)
    if cfg.clip_scores:
        scores = read_clip_scores(cfg.clip_scores, shard_id)
    else:
        scores = shard_scores(cfg.embeddings, shard_id) if cfg.embeddings else {}
    columns: dict[str, list] = {name: [] for name in FACT_SCHEMA.names}
    for index, row in enumerate(rows):
        key = row["key"]
        success = row["status"] == "success"
        phash = _hex64(row.get("phash")) if success else None
        digest = _digest(row.get("sha256")) if success else None
        reason, language, language_score = row_reason(row, cfg, phash is not None and digest is not None)
        columns["row_id"].append(row_id(shard_id, _row_index(key, index)))
        columns["key"].append(key)
        columns["pre_reason"].append(reason.value if reason else None)
        columns["url_fp"].append(_fingerprint(_normalised(row.get("url"))) if success and row.get("url") else 0)
        columns["sha_hi"].append(digest[0] if digest else 0)
        columns["sha_lo"].append(digest[1] if digest else 0)
        columns["phash"].append(phash or 0)
        columns["clip_score"].append(scores.get(key))
        columns["language"].append(language)
        columns["language_score"].append(language_score)
        columns["luma_std"].append(row.get("luma_std"))
        columns["log_aspect"].append(_log_aspect(row))
    table = pa.table(columns, schema=FACT_SCHEMA)
    if eval_hashes is not None and len(eval_hashes) and table.num_rows:
        table = _decontaminate(table, eval_hashes, cfg.decontaminate_threshold)
    notes = {"skipped_checks": sorted(f"{c} (column absent)" for c in missing if c in ("luma_std",))}
    return table, notes


def _decontaminate(table: pa.Table, eval_hashes: np.ndarray, threshold: int) -> pa.Table:
    """Rows still acceptable whose pHash is within ``threshold`` of an eval image."""
    reasons = table.column("pre_reason").to_pylist()
    open_rows = np.array([r is None for r in reasons])
    hashes = table.column("phash").to_numpy()
    distance = np.full(len(reasons), 64)
    distance[open_rows] = hamming_to_set(hashes[open_rows], eval_hashes)
    for index in np.flatnonzero(open_rows & (distance <= threshold)):
        reasons[index] = Reason.EVAL_CONTAMINATED.value
    return table.set_column(table.schema.get_field_index("pre_reason"), "pre_reason", pa.array(reasons, pa.string()))


def _log_aspect(row: dict) -> float | None:
    width = row.get("original_width") or row.get("width")
    height = row.get("original_height") or row.get("height")
    return math.log(width / height) if width and height else None


def _normalised(url: str) -> str:
    try:
        return normalize_url(url)
    except ValueError:
        return url


def _row_index(key: str, fallback: int) -> int:
    """The row index inside the shard, from the key's digits after the 5-digit shard."""
    try:
        return int(key[5:])
    except (TypeError, ValueError):
        return fallback
