"""Stream URL lists and cut them into shards of input rows.

Nothing here loads a whole input file: parquet is read batch by batch, text formats
line by line (gzip-compressed too, through fsspec), so memory stays bounded by one
shard of rows however large the list. Shard ids and row indices follow input order
(files sorted by name), which is what makes sample keys deterministic.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from core import storage
from core.config import ConfigError

SUFFIXES = {
    "parquet": (".parquet",),
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz"),
    "json": (".json", ".json.gz", ".jsonl", ".jsonl.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"),
    "txt": (".txt", ".txt.gz"),
}


@dataclass(frozen=True)
class ShardInput:
    """The rows of one shard: columns ``url``, ``caption`` and the extra columns."""

    shard_id: int
    urls: list[str | None]
    captions: list[str | None]
    extras: dict[str, list]

    def __len__(self) -> int:
        return len(self.urls)


def input_files(url_list: str, input_format: str) -> list[str]:
    fmt = input_format.removesuffix(".gz")
    fs, path = storage.filesystem(url_list)
    if not fs.exists(path):
        raise ConfigError(f"url_list={url_list!r}: no such file or folder")
    if not fs.isdir(path):
        return [url_list]
    files = [f for f in storage.list_files(url_list) if f.endswith(SUFFIXES[fmt])]
    if not files:
        raise ConfigError(f"url_list={url_list!r}: no {fmt} files in this folder")
    return files


def _records(path: str, fmt: str, columns: list[str], batch_rows: int) -> Iterator[dict]:
    """Rows of one file as dicts holding ``columns`` (missing values are None)."""
    if fmt == "parquet":
        with storage.open_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ConfigError(f"{path}: no column(s) {missing}; columns are {parquet.schema_arrow.names}")
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()
        return
    fs, fs_path = storage.filesystem(path)
    with fs.open(fs_path, "rb", compression="infer") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        if fmt == "txt":
            for line in text:
                line = line.strip()
                if line:
                    yield {columns[0]: line}
        elif fmt in ("csv", "tsv"):
            reader = csv.DictReader(text, delimiter="," if fmt == "csv" else "\t")
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{path}: no column(s) {missing}; columns are {reader.fieldnames}")
            for row in reader:
                yield {c: row.get(c) for c in columns}
        else:  # json lines
            for number, line in enumerate(text, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = {}  # becomes a row with no URL: counted as invalid_url, not dropped
                if not isinstance(record, dict):
                    record = {}
                yield {c: record.get(c) for c in columns}


def read_shards(
    url_list: str,
    input_format: str,
    url_col: str,
    caption_col: str | None,
    extra_columns: list[str],
    rows_per_shard: int,
) -> Iterator[ShardInput]:
    fmt = input_format.removesuffix(".gz")
    columns = [url_col] + ([caption_col] if caption_col else []) + list(extra_columns)
    shard_id = 0
    urls: list = []
    captions: list = []
    extras: dict[str, list] = {c: [] for c in extra_columns}
    for path in input_files(url_list, input_format):
        for record in _records(path, fmt, columns, batch_rows=min(rows_per_shard, 65536)):
            urls.append(_text(record.get(url_col)))
            captions.append(_text(record.get(caption_col)) if caption_col else None)
            for column in extra_columns:
                extras[column].append(record.get(column))
            if len(urls) == rows_per_shard:
                yield ShardInput(shard_id, urls, captions, extras)
                shard_id += 1
                urls, captions, extras = [], [], {c: [] for c in extra_columns}
    if urls:
        yield ShardInput(shard_id, urls, captions, extras)


def _text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)
