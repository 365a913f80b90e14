"""ShardWriter: one shard (pool or train), committed atomically or not at all.

Ingest writes pool shards with it and shards/ writes train shards, so both share
one layout (core.layout). Samples arrive in key order; each becomes a parquet row
(failures too, in a pool) and, on success, three tar members. Nothing is visible
under the shard's final names until ``commit``: tar and parquet are staged as
temporary files, then renamed (or uploaded) into place, and ``_stats.json`` goes
last — its presence is what marks a shard as done for readers and for resume. The tar bytes are deterministic (fixed
member metadata), so a rerun of the same input writes the same shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.layout import POOL_SCHEMA, STATS_SUFFIX, shard_name


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
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
        self._tar_path = os.path.join(self._tmpdir, f"{self.name}.tar")
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.USTAR_FORMAT)
        self._columns: dict[str, list[Any]] = {f.name: [] for f in POOL_SCHEMA} | {c: [] for c in self.extra_columns}

    def add(self, row: dict[str, Any], image: bytes | None) -> None:
        """Record one input row; ``image`` is the encoded image on success."""
        for column, values in self._columns.items():
            values.append(row.get(column))
        if image is None:
            return
        key = row["key"]
        meta = {k: v for k, v in row.items() if k in self._columns and v is not None}
        add_tar_member(self._tar, f"{key}.{self.encode_format}", image)
        if row.get("caption") is not None:
            add_tar_member(self._tar, f"{key}.txt", row["caption"].encode("utf-8"))
        add_tar_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())

    def _table(self) -> pa.Table:
        extra = [pa.field(c, pa.string()) for c in self.extra_columns]
        schema = pa.schema(list(POOL_SCHEMA) + extra)
        arrays = [
            pa.array([None if v is None else str(v) for v in self._columns[f.name]], f.type)
            if f.name in self.extra_columns
            else pa.array(self._columns[f.name], f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Publish tar, parquet, then the stats marker; return the tar's name, bytes and sha256."""
        self._tar.close()
        entry = {"name": f"{self.name}.tar", "bytes": os.path.getsize(self._tar_path), "sha256": _sha256(self._tar_path)}
        parquet_tmp = os.path.join(self._tmpdir, f"{self.name}.parquet")
        pq.write_table(self._table(), parquet_tmp, compression="zstd")
        try:
            for local, final in (
                (self._tar_path, f"{self.name}.tar"),
                (parquet_tmp, f"{self.name}.parquet"),
            ):
                target = storage.join(self.output_folder, final)
                if storage.is_local(target):
                    with open(local, "rb") as handle:
                        os.fsync(handle.fileno())
                    os.replace(local, target)
                    continue
                with open(local, "rb") as src, storage.atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            storage.write_json(storage.join(self.output_folder, self.name + STATS_SUFFIX), stats)
        finally:
            self.close()
        return entry

    def close(self) -> None:
        """Drop temporary files (after commit, or to abandon the shard)."""
        if not self._tar.closed:
            self._tar.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
