"""Stream URL lists and cut them into shards of input rows.

Nothing here loads a whole input file: parquet is read batch by batch (only the
columns asked for), text formats line by line and a JSON array element by element
(gzip-compressed too), so memory stays bounded by one shard of rows plus one read
batch, however large the list. Batches are columnar (a list per column), not a
dict per row: splitting ten million rows is then mostly list slicing.

Shard ids and row indices follow input order (files sorted by name), which is what
makes sample keys deterministic.

Bad rows are rows, not crashes: a line that is not JSON, a missing field or a null
becomes a row without a URL (``invalid_url``); bytes that are not UTF-8 are kept
with U+FFFD replacements and the row is flagged (``caption_not_utf8`` or
``invalid_url``) so it is counted, not fetched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from core import storage
from core.errors import DataError
from core.reasons import Reason

INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "txt")
SUFFIXES = {
    "parquet": (".parquet",),
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz"),
    "json": (".json", ".json.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"),
    "txt": (".txt", ".txt.gz"),
}
BATCH_ROWS = 65536  # rows per read batch: bounds memory, amortises per-batch overhead
_JSON_CHUNK = 1 << 20

Batch = dict[str, list]  # column name -> values, all the same length


@dataclass(frozen=True)
class ShardInput:
    """The rows of one shard: columns ``url``, ``caption`` and the extra columns.

    ``row_errors`` holds the rows that are known bad before any request (index ->
    reason and detail): flagged here (bytes that are not UTF-8) or by
    ``ingest.plan`` (repeats, junk captions); the worker records them without fetching.
    """

    shard_id: int
    urls: list[str | None]
    captions: list[str | None]
    extras: dict[str, list]
    row_errors: dict[int, tuple[Reason, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.urls)

    def fingerprint(self) -> str:
        """What identifies the shard's input rows (URLs, captions, extra columns), for resume checks."""
        digest = hashlib.blake2b(digest_size=16)
        for column in (self.urls, self.captions, *(self.extras[k] for k in sorted(self.extras))):
            digest.update(repr(column).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()


def input_files(url_list: str, input_format: str) -> list[str]:
    fmt = input_format.removesuffix(".gz")
    fs, path = storage.filesystem(url_list)
    if not fs.exists(path):
        raise DataError(f"url_list={url_list!r}: no such file or folder")
    if not fs.isdir(path):
        named = [f for f, suffixes in SUFFIXES.items() if url_list.lower().endswith(suffixes)]
        if named and fmt not in named:
            raise DataError(f"url_list={url_list!r} looks like {named[0]} but input_format={input_format!r}: "
                            f"give --input_format {named[0]}")
        return [url_list]
    files = [f for f in storage.list_files(url_list) if f.endswith(SUFFIXES[fmt])]
    if not files:
        raise DataError(f"url_list={url_list!r}: no {fmt} files in this folder")
    return files


def _parquet_batches(path: str, columns: list[str]) -> Iterator[Batch]:
    source = storage.filesystem(path)[1] if storage.is_local(path) else None
    with (open(source, "rb") if source else storage.open_file(path)) as handle, storage.parquet_errors(
            path, "is --input_format right?"):
        parquet = pq.ParquetFile(handle, buffer_size=1 << 20)  # buffered: no whole column chunk in memory
        names = parquet.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; columns are {names}")
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys(columns))):
            yield {c: batch.column(c).to_pylist() for c in dict.fromkeys(columns)}


def _text_batches(path: str, fmt: str, columns: list[str]) -> Iterator[Batch]:
    fs, fs_path = storage.filesystem(path)
    # By each file's own name: a folder may mix list.csv and list.csv.gz under either format.
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(fs_path, "rb", compression=compression) as raw:
        # surrogateescape keeps undecodable bytes recoverable, so a bad row is flagged, not guessed at
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        if fmt == "txt":
            rows: Iterator[dict] = ({columns[0]: line.strip()} for line in text if line.strip())
        elif fmt in ("csv", "tsv"):
            rows = _csv_rows(text, path, columns, "," if fmt == "csv" else "\t")
        elif fmt == "json":
            rows = _json_array_rows(text, path)
        else:
            rows = _json_lines(text)
        batch: Batch = {c: [] for c in columns}
        for record in rows:
            for c in columns:
                batch[c].append(record.get(c))
            if len(batch[columns[0]]) == BATCH_ROWS:
                yield batch
                batch = {c: [] for c in columns}
        if batch[columns[0]]:
            yield batch


def _csv_rows(text: io.TextIOBase, path: str, columns: list[str], delimiter: str) -> Iterator[dict]:
    csv.field_size_limit(1 << 24)  # a long caption is a row, not an error
    reader = csv.DictReader(text, delimiter=delimiter)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; columns are {reader.fieldnames}")
    yield from reader


def _json_lines(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = {}  # becomes a row with no URL: counted as invalid_url, not dropped
        yield record if isinstance(record, dict) else {}


def _json_array_rows(text: io.TextIOBase, path: str) -> Iterator[dict]:
    """Elements of a JSON array file (img2dataset's ``json``), one at a time.

    A file that does not start with ``[`` is read as JSON lines instead, since many
    ``.json`` URL lists are. An element that is not an object becomes an empty row.
    """
    decoder = json.JSONDecoder()
    buffer = text.read(_JSON_CHUNK)
    position = len(buffer) - len(buffer.lstrip())
    if not buffer[position:].startswith("["):
        yield from _json_lines(_lines_after(buffer, text))
        return
    position += 1
    eof = False
    while True:
        while position < len(buffer) and buffer[position] in " \t\r\n,":
            position += 1
        if position < len(buffer) and buffer[position] == "]":
            return
        try:
            if position >= len(buffer):
                raise json.JSONDecodeError("need more", buffer, position)
            value, end = decoder.raw_decode(buffer, position)
            if end == len(buffer) and not eof:  # a number may continue in the next chunk
                raise json.JSONDecodeError("need more", buffer, position)
        except json.JSONDecodeError as exc:
            if eof:
                if position >= len(buffer):
                    raise DataError(f"{path}: the JSON array is not closed with ']'") from None
                raise DataError(f"{path}: not a valid JSON array near character {exc.pos}: {exc.msg}") from None
            chunk = text.read(_JSON_CHUNK)
            eof = not chunk
            buffer = buffer[position:] + chunk
            position = 0
            continue
        yield value if isinstance(value, dict) else {}
        position = end


def _lines_after(head: str, text: io.TextIOBase) -> Iterator[str]:
    """The lines of ``head`` (already read) and then of ``text``, the seam mended."""
    lines = list(io.StringIO(head, newline=""))
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += text.readline()
    yield from lines
    yield from text


def read_shards(
    url_list: str,
    input_format: str,
    url_col: str,
    caption_col: str | None,
    extra_columns: list[str],
    rows_per_shard: int,
) -> Iterator[ShardInput]:
    fmt = input_format.removesuffix(".gz")
    columns = list(dict.fromkeys([url_col] + ([caption_col] if caption_col else []) + list(extra_columns)))
    shard_id = 0
    pending: Batch = {c: [] for c in columns}
    filled = 0
    for path in input_files(url_list, input_format):
        batches = (
            _parquet_batches(path, columns)
            if fmt == "parquet"
            else _text_batches(path, fmt, columns)
        )
        for batch in batches:
            size, start = len(batch[url_col]), 0
            while start < size:
                take = min(rows_per_shard - filled, size - start)
                for c in columns:
                    pending[c].extend(batch[c][start : start + take])
                start += take
                filled += take
                if filled == rows_per_shard:
                    yield _shard(shard_id, pending, url_col, caption_col, extra_columns)
                    shard_id += 1
                    pending, filled = {c: [] for c in columns}, 0
    if filled:
        yield _shard(shard_id, pending, url_col, caption_col, extra_columns)


def _shard(shard_id: int, batch: Batch, url_col: str, caption_col: str | None, extras: list[str]) -> ShardInput:
    errors: dict[int, tuple[Reason, str]] = {}
    urls = []
    for index, value in enumerate(batch[url_col]):
        text, bad = _text(value)
        if bad:
            errors[index] = (Reason.INVALID_URL, "the URL is not valid UTF-8")
        urls.append(text)
    captions: list[str | None] = [None] * len(urls)
    if caption_col:
        for index, value in enumerate(batch[caption_col]):
            captions[index], bad = _text(value)
            if bad and index not in errors:
                errors[index] = (Reason.CAPTION_NOT_UTF8, "kept with U+FFFD replacements")
    extra_values = {c: [_repaired(v) for v in batch[c]] for c in extras}
    return ShardInput(shard_id, urls, captions, extra_values, errors)


def _text(value) -> tuple[str | None, bool]:
    """(the value as text, whether its bytes were not valid UTF-8)."""
    if value is None:
        return None, False
    if isinstance(value, bytes):  # a binary column in parquet
        try:
            return value.decode("utf-8"), False
        except UnicodeDecodeError:
            return value.decode("utf-8", "replace"), True
    if not isinstance(value, str):
        return str(value), False
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:  # lone surrogates: undecodable input bytes, or a JSON \ud800 escape
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8"), True


def _repaired(value):
    """Extra columns are kept as given, except text that could not be written as UTF-8."""
    if isinstance(value, (str, bytes)):
        return _text(value)[0]
    return value
