"""Shard writers: one shard, committed atomically or not at all, in one of three layouts.

Ingest writes pool shards with them and shards/ writes train shards, so both share
one layout (core.layout). The layouts are img2dataset's ``output_format``s:

* ``webdataset`` (``ShardWriter``): ``{N}.tar`` with ``{key}.jpg|txt|json`` per
  success, and ``{N}.parquet`` with one metadata row per input row;
* ``files`` (``FilesShardWriter``): a folder ``{N}/`` holding the same three files
  per success, and the same ``{N}.parquet``;
* ``parquet`` (``ParquetShardWriter``): ``{N}.parquet`` alone, the metadata row of
  each input row plus the image bytes in a column named after the encode format
  (``jpg``), null for failures.

All three take samples in key order through ``add(row, image)`` and publish with
``commit(stats)``. Nothing is visible under a shard's final names until ``commit``:
everything is staged under a temporary name, then renamed (locally) or uploaded
(object storage: a PUT is atomic per object), and ``{N}_stats.json`` goes last — its
presence is what marks a shard as done for readers and for resume. A staged shard
that was never committed is simply redone by the next run; a full disk while staging or
committing is a ``core.storage.DiskFull`` naming the shard, the bytes it had staged and the
space free, and leaves nothing of the shard behind. Tar bytes are
deterministic (fixed member metadata), so a rerun of the same input writes the
same shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.layout import POOL_SCHEMA, STATS_SUFFIX, shard_name
from core.tarwriter import TarWriter

OUTPUT_FORMATS = ("webdataset", "parquet", "files")


def _publish_file(local: str, target: str) -> None:
    """Move a finished staged file to its final name: a rename locally, one PUT remotely."""
    if storage.is_local(target):
        with open(local, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(local, storage.filesystem(target)[1])
        return
    with open(local, "rb") as src, storage.atomic_write(target) as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def clean_stale_staging(output_folder: str) -> None:
    """Remove what a killed run was still staging (local output only).

    Staging folders (``.tmp-*``) and half-written files (``.NAME.xxxx.tmp``) never
    carry a final shard name, so readers ignore them anyway; this only frees the disk.
    On object storage nothing is staged in the bucket (each object is one PUT).
    """
    if not storage.is_local(output_folder):
        return
    fs, path = storage.filesystem(output_folder)
    for entry in fs.ls(path, detail=False):
        name = entry.rsplit("/", 1)[-1]
        if name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".") and name.endswith(".tmp"):
            os.remove(entry)


class BaseShardWriter(ABC):
    """What every layout shares: staging folder, metadata columns, commit order."""

    def __init__(self, output_folder: str, shard_id: int, encode_format: str, extra_columns: list[str]):
        self.output_folder = output_folder
        self.name = shard_name(shard_id)
        self.encode_format = encode_format
        self.extra_columns = list(extra_columns)
        # Local output: stage next to the final names, so commit is a rename.
        local = storage.is_local(output_folder)
        if local:
            storage.makedirs(output_folder)
        self._tmpdir = tempfile.mkdtemp(prefix=f".tmp-{self.name}-", dir=output_folder if local else None)
        self._columns: dict[str, list[Any]] = {f.name: [] for f in POOL_SCHEMA} | {c: [] for c in self.extra_columns}
        self._published: list[str] = []  # final names written so far: removed again if the commit fails
        self._image_bytes = 0  # what the shard holds so far, for the error of a full disk
        self._retries = storage.retry_counts()  # the shard's object-storage retries go in its stats

    @contextlib.contextmanager
    def _space(self) -> Iterator[None]:
        """A write that found the disk full: a ``DiskFull`` naming the shard, the bytes staged and the space free."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in storage.NO_SPACE or isinstance(exc, storage.DiskFull):
                raise
            staged = sum(os.path.getsize(os.path.join(top, name))
                         for top, _, names in os.walk(self._tmpdir) for name in names)
            raise storage.disk_full(storage.join(self.output_folder, self.name), os.path.dirname(self._tmpdir), exc,
                                    written=max(staged, self._image_bytes)) from None

    @property
    def metadata_schema(self) -> pa.Schema:
        return pa.schema(list(POOL_SCHEMA) + [pa.field(c, pa.string()) for c in self.extra_columns])

    def add(self, row: dict[str, Any], image: bytes | None, image_ext: str | None = None) -> None:
        """Record one input row; ``image`` is the encoded image on success.

        ``image_ext`` names the image member when it differs from the shard's encode format
        (resharding copies images as they are: a pool may mix jpg and png).
        """
        for column, values in self._columns.items():
            values.append(row.get(column))
        if image is not None:
            meta = {k: v for k, v in row.items() if k in self._columns and v is not None}
            self._image_bytes += len(image)
            with self._space():
                self._add_sample(row["key"], image, image_ext or self.encode_format, row.get("caption"), meta)

    @abstractmethod
    def _add_sample(self, key: str, image: bytes, ext: str, caption: str | None, meta: dict[str, Any]) -> None:
        """Stage the members of one successful sample (each layout its own way)."""

    def _sample_files(self, key: str, image: bytes, ext: str, caption: str | None, meta: dict[str, Any]):
        """The three members of a successful sample, as (name, bytes)."""
        yield f"{key}.{ext}", image
        if caption is not None:
            yield f"{key}.txt", caption.encode("utf-8")
        yield f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()

    def _metadata_table(self) -> pa.Table:
        schema = self.metadata_schema
        arrays = [
            pa.array([None if v is None else str(v) for v in self._columns[f.name]], f.type)
            if f.name in self.extra_columns
            else pa.array(self._columns[f.name], f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)

    @abstractmethod
    def _publish_samples(self) -> dict[str, Any]:
        """Publish the image data (before the metadata parquet); return its manifest entry."""

    def _write_metadata(self, path: str) -> None:
        pq.write_table(self._metadata_table(), path, compression="zstd")

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Publish images, then the parquet, then the stats marker; return the data's entry.

        The marker also lists the shard's files with their bytes and sha256 (``files``),
        so ``python -m shards.verify`` can check a pool's integrity without a manifest.
        The returned entry is the image data's (tar) with the parquet's under ``metadata``. The
        marker also counts the object-storage requests retried while the shard was made
        (``storage_retries``, ``storage_retried_objects``; its own upload aside). A commit that
        fails (a full disk: ``DiskFull``) removes what it had published: nothing of the shard stays.
        """
        committed = False
        try:
            with self._space():
                entry = self._publish_samples()
                parquet_tmp = os.path.join(self._tmpdir, f"{self.name}.parquet")
                self._write_metadata(parquet_tmp)
                metadata = _file_entry(f"{self.name}.parquet", parquet_tmp)
                self._publish(parquet_tmp, storage.join(self.output_folder, f"{self.name}.parquet"))
                files = [metadata] if entry["name"] == metadata["name"] else [entry, metadata]
                stats = {**stats, **storage.retries_since(self._retries), "files": files}
                storage.write_json(storage.join(self.output_folder, self.name + STATS_SUFFIX), stats)
            committed = True
        finally:
            self.close()
            if not committed:
                self._unpublish()
        return {**entry, "metadata": metadata}

    def _publish(self, local: str, target: str) -> None:
        self._published.append(target)
        _publish_file(local, target)

    def _unpublish(self) -> None:
        for target in self._published:
            with contextlib.suppress(OSError):
                storage.remove(target)

    def close(self) -> None:
        """Drop temporary files (after commit, or to abandon the shard)."""
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def _file_entry(name: str, path: str) -> dict[str, Any]:
    """A ``files`` entry of a shard's ``_stats.json``: name, bytes and sha256, one read of the file."""
    sha, size = storage.sha256_of(path)
    return {"name": name, "bytes": size, "sha256": sha}


class ShardWriter(BaseShardWriter):
    """``webdataset``: ``{N}.tar`` + ``{N}.parquet`` + ``{N}_stats.json``."""

    def __init__(self, output_folder: str, shard_id: int, encode_format: str, extra_columns: list[str]):
        super().__init__(output_folder, shard_id, encode_format, extra_columns)
        self._tar_path = os.path.join(self._tmpdir, f"{self.name}.tar")
        self._tar = TarWriter(self._tar_path)

    def _add_sample(self, key, image, ext, caption, meta) -> None:
        for name, data in self._sample_files(key, image, ext, caption, meta):
            self._tar.add(name, data)

    def _publish_samples(self) -> dict[str, Any]:
        self._tar.close()
        entry = _file_entry(f"{self.name}.tar", self._tar_path)
        self._publish(self._tar_path, storage.join(self.output_folder, f"{self.name}.tar"))
        return entry

    def close(self) -> None:
        try:
            if not self._tar.closed:
                with contextlib.suppress(OSError):  # fails again on a full disk: the shard is abandoned anyway
                    self._tar.close()
        finally:
            super().close()


class FilesShardWriter(BaseShardWriter):
    """``files``: a folder ``{N}/`` of ``{key}.jpg|txt|json`` + ``{N}.parquet`` + stats.

    Locally the whole folder is renamed into place at once; on object storage each
    file is one PUT and the stats marker, written last, commits the folder. Small
    files are not fsynced one by one (that would dominate the run); the rename is
    what makes the folder appear whole.
    """

    def __init__(self, output_folder: str, shard_id: int, encode_format: str, extra_columns: list[str]):
        super().__init__(output_folder, shard_id, encode_format, extra_columns)
        self._folder = os.path.join(self._tmpdir, self.name)
        os.mkdir(self._folder)
        self._bytes = 0

    def _add_sample(self, key, image, ext, caption, meta) -> None:
        for name, data in self._sample_files(key, image, ext, caption, meta):
            with open(os.path.join(self._folder, name), "wb") as handle:
                handle.write(data)
            self._bytes += len(data)

    def _publish_samples(self) -> dict[str, Any]:
        target = storage.join(self.output_folder, self.name)
        fs, path = storage.filesystem(target)
        self._published.append(target)
        if storage.is_local(target):
            if os.path.exists(path):  # left by a run killed before its marker: replace it whole
                shutil.rmtree(path)
            os.replace(self._folder, path)
        else:
            names = sorted(os.listdir(self._folder))
            if names:
                fs.put([os.path.join(self._folder, n) for n in names], [f"{path}/{n}" for n in names])
        return {"name": f"{self.name}/", "bytes": self._bytes}


class ParquetShardWriter(BaseShardWriter):
    """``parquet``: ``{N}.parquet`` alone, image bytes in a ``jpg`` (``webp``, ``png``) column.

    Rows are written in row groups as they come, so a shard's images are never all
    in memory at once.
    """

    ROWS_PER_GROUP = 256

    def __init__(self, output_folder: str, shard_id: int, encode_format: str, extra_columns: list[str]):
        super().__init__(output_folder, shard_id, encode_format, extra_columns)
        if encode_format in self._columns:
            raise ValueError(f"a column is already named {encode_format!r}")
        self._images: list[bytes | None] = []
        self._path = os.path.join(self._tmpdir, f"{self.name}.parquet")
        schema = self.metadata_schema.append(pa.field(encode_format, pa.binary()))
        self._writer = pq.ParquetWriter(self._path, schema, compression="zstd")
        self._bytes = 0

    def add(self, row: dict[str, Any], image: bytes | None, image_ext: str | None = None) -> None:
        super().add(row, image, image_ext)
        self._images.append(image)
        if len(self._images) >= self.ROWS_PER_GROUP:
            with self._space():
                self._flush()

    def _add_sample(self, key, image, ext, caption, meta) -> None:
        self._bytes += len(image)

    def _flush(self) -> None:
        if not self._images:
            return
        table = self._metadata_table().append_column(pa.field(self.encode_format, pa.binary()), pa.array(self._images, pa.binary()))
        self._writer.write_table(table)
        self._columns = {name: [] for name in self._columns}
        self._images = []

    def _publish_samples(self) -> dict[str, Any]:
        return {"name": f"{self.name}.parquet", "bytes": self._bytes}

    def _write_metadata(self, path: str) -> None:
        self._flush()
        self._writer.close()
        if os.path.abspath(path) != os.path.abspath(self._path):
            os.replace(self._path, path)

    def close(self) -> None:
        try:
            if self._writer.is_open:
                with contextlib.suppress(OSError):  # a full disk: the shard is abandoned anyway
                    self._writer.close()
        finally:
            super().close()


WRITERS: dict[str, type[BaseShardWriter]] = {
    "webdataset": ShardWriter,
    "files": FilesShardWriter,
    "parquet": ParquetShardWriter,
}


def open_shard_writer(
    output_format: str, output_folder: str, shard_id: int, encode_format: str, extra_columns: list[str]
) -> BaseShardWriter:
    """The writer for ``output_format`` (one of ``OUTPUT_FORMATS``)."""
    try:
        writer = WRITERS[output_format]
    except KeyError:
        raise ValueError(f"output_format={output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}") from None
    return writer(output_folder, shard_id, encode_format, extra_columns)
