"""An embeddings folder: clip-retrieval's layout plus one JSON, written by ``apply.embed``.

Per input shard ``n`` (the number in its tar's name), row-aligned, rows in the tar's order::

    img_emb/img_emb_{n}.npy          float16 (rows, D), L2-normalised image embeddings
    text_emb/text_emb_{n}.npy        float16 (rows, D), L2-normalised caption embeddings
    metadata/metadata_{n}.parquet    key, url, caption, shard (the tar's path), image_width, image_height
    done/{n}.json                    written after those three: rows, tar, checkpoint, skipped samples

and ``embeddings.json``, written last, the commit marker of the whole folder: checkpoint,
model, step, dim, image_size, shards ({"n": {"tar", "rows"}}), rows, source.

This module reads and writes that layout with numpy and pyarrow only (no torch), so the
filter, the index and search can read embeddings without loading a model. Paths may be
local or ``s3://``; each file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.errors import DataError

MANIFEST = "embeddings.json"
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("shard", pa.string()),
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
])  # fmt: skip


def image_path(folder: str, n: int) -> str:
    return storage.join(folder, "img_emb", f"img_emb_{n}.npy")


def text_path(folder: str, n: int) -> str:
    return storage.join(folder, "text_emb", f"text_emb_{n}.npy")


def metadata_path(folder: str, n: int) -> str:
    return storage.join(folder, "metadata", f"metadata_{n}.parquet")


def done_path(folder: str, n: int) -> str:
    return storage.join(folder, "done", f"{n}.json")


def read_manifest(folder: str) -> dict:
    """``embeddings.json`` of a finished folder; ``DataError`` if the folder is not one."""
    path = storage.join(folder, MANIFEST)
    if not storage.exists(path):
        raise DataError(f"{folder}: not a finished embeddings folder (no {MANIFEST}); "
                        "make it with `python -m apply.embed`, or rerun that command to finish it")  # fmt: skip
    return storage.read_json(path)


# -- arrays and tables ------------------------------------------------------------------------


def write_array(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with storage.atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def read_array(path: str) -> np.ndarray:
    with storage.open_file(path, "rb") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def write_table(path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    with storage.atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def read_metadata(folder: str, n: int, columns: list[str] | None = None) -> pa.Table:
    with storage.open_file(metadata_path(folder, n), "rb") as handle:
        return pq.read_table(handle, columns=columns)


# -- what the filter reads -------------------------------------------------------------------------


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (float16 storage leaves them a hair off)."""
    rows = embeddings.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def cosines(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """float32 cosine of each image row with the text row beside it: the CLIP score."""
    return np.einsum("ij,ij->i", unit_rows(images), unit_rows(texts))


def shard_scores(folder: str, n: int) -> dict[str, float]:
    """key -> CLIP score (cosine of the stored image and text embeddings) for shard ``n``; empty if absent."""
    if not storage.exists(done_path(folder, n)):
        return {}
    keys = read_metadata(folder, n, ["key"]).column("key").to_pylist()
    scores = cosines(read_array(image_path(folder, n)), read_array(text_path(folder, n)))
    return dict(zip(keys, scores.tolist()))


def shard_images(folder: str, n: int) -> tuple[list[str], np.ndarray]:
    """(keys, unit float32 image embeddings) of shard ``n``; nothing if the shard was not embedded."""
    if not storage.exists(done_path(folder, n)):
        return [], np.empty((0, 0), np.float32)
    keys = read_metadata(folder, n, ["key"]).column("key").to_pylist()
    return keys, unit_rows(read_array(image_path(folder, n)))


def pairs_at_least(a: np.ndarray, b: np.ndarray, threshold: float, same: bool,
                   block: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(i, j) index pairs with ``a[i] . b[j] >= threshold``, exact, ``block`` rows of ``a`` at a time.

    ``same``: ``a`` is ``b``; only pairs with ``i < j`` are given. Memory: one (block, len(b))
    product; the same inputs give the same products, whatever else runs.
    """
    for start in range(0, len(a), block):
        products = a[start : start + block] @ b.T
        i, j = np.nonzero(products >= threshold)
        i = i + start
        if same:
            i, j = i[i < j], j[i < j]
        yield i, j
