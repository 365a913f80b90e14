"""The shard layout every stage reads and writes (img2dataset-compatible).

A shard ``N`` in a folder is three objects:

* ``{N:05d}.tar``        — members ``{key}.jpg|webp|png``, ``{key}.txt``, ``{key}.json``
                           for each successful sample, in key order;
* ``{N:05d}.parquet``    — one row per input row, failures included;
* ``{N:05d}_stats.json`` — written last: its presence commits the shard.

Keys are ``{shard:05d}{row:0Nd}`` from the shard id and the row's index in the
shard — never from completion order — so a rerun produces the same keys.
"""

from __future__ import annotations

import hashlib
import math
import re

import pyarrow as pa

from core import storage

STATS_SUFFIX = "_stats.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members a reader takes, in order of preference
_SHARD_FILE = re.compile(r"(\d+)(?:\.tar|\.parquet|_stats\.json)$")

# Columns of a pool parquet, in order; extra input columns follow them.
POOL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),  # success | failed_to_download | failed_to_resize
        ("reason", pa.string()),  # a core.reasons.Reason value, null on success
        ("error_message", pa.string()),  # human detail for the reason
        ("http_status", pa.int32()),
        ("download_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),  # of the bytes as downloaded
        ("phash", pa.string()),  # 64-bit DCT hash of the resized content (before any border), hex
        ("luma_std", pa.float32()),  # grey-level std of that content: ~0 for a blank image
        ("content_type", pa.string()),  # as the server announced it, parameters dropped
        ("final_url", pa.string()),  # after redirects (equals url when there were none)
    ]
)


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """A sample's image as (extension, bytes): the first of ``IMAGE_EXTENSIONS`` it holds, or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext, members[ext]
    return None


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def shard_id_of(path: str) -> int | None:
    match = _SHARD_FILE.search(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def committed_shards(folder: str) -> set[int]:
    """Ids of the shards in ``folder`` whose ``_stats.json`` commit marker exists."""
    ids = {shard_id_of(p) for p in storage.list_files(folder, STATS_SUFFIX)}
    return {i for i in ids if i is not None}


def key_digits(samples_per_shard: int) -> int:
    return max(1, math.ceil(math.log10(max(samples_per_shard, 2))))


def sample_key(shard_id: int, row: int, samples_per_shard: int) -> str:
    return f"{shard_id:05d}{row:0{key_digits(samples_per_shard)}d}"


def folder_fingerprint(folder: str, shard_ids: list[int], suffixes: tuple[str, ...]) -> str:
    """sha256 over the named files of each shard, in shard order (metadata files: small)."""
    digest = hashlib.sha256()
    for shard_id in shard_ids:
        for suffix in suffixes:
            path = storage.join(folder, shard_name(shard_id) + suffix)
            sha, size = storage.sha256_of(path)
            digest.update(f"{shard_name(shard_id)}{suffix} {size} {sha}\n".encode())
    return digest.hexdigest()


def uncommitted_shards(folder: str) -> list[str]:
    """Names of shards with files in ``folder`` but no commit marker (a killed or running writer)."""
    names = {shard_id_of(p) for p in storage.list_files(folder) if not p.endswith(STATS_SUFFIX)}
    return [shard_name(i) for i in sorted(names - {None} - committed_shards(folder))]
