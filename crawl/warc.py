"""Stream WARC and WAT records from a local or ``s3://`` file, gzip-compressed or not.

A Common Crawl file is ~1 GB compressed, so nothing here holds more than one
record: the file is read as a stream (fsspec; gzip members decompressed on the fly,
whether the file is one member or one member per record, as WARC files are), and a
record larger than the caller's cap is skipped over in chunks without being kept.

The reader is small and our own rather than a library's because a damaged archive
must say so: a record cut short, a gzip member that ends early, a header that is not
a WARC header. Each raises ``SampleError`` (``warc_truncated`` / ``warc_malformed``)
after the records before it have been yielded; what follows the damage cannot be
found again reliably, so the file ends there and the caller counts it.

``http_payload`` splits a ``response`` record into status, headers and body,
undoing a stored chunked transfer coding and gzip/deflate content coding (capped).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from core import storage
from core.reasons import Reason, SampleError

MAX_HEADER_LINE = 65536
MAX_HEADERS = 256
SKIP_CHUNK = 1 << 20
HEAD_BYTES = 16384  # kept of an oversized block: enough for its HTTP headers
READ_BUFFER = 1 << 20
WARC_SUFFIXES = (".warc", ".warc.gz", ".wat", ".wat.gz", ".arc.warc.gz")


@dataclass(frozen=True)
class WarcRecord:
    type: str  # WARC-Type, lower-case: response, resource, metadata, request, warcinfo, ...
    target_uri: str | None
    content_type: str  # the record's Content-Type, lower-case, parameters kept
    length: int  # Content-Length of the block
    block: bytes  # the whole block; only its first HEAD_BYTES when it is larger than the cap
    complete: bool = True  # False: the block was over the cap, and the rest was skipped unread


@dataclass(frozen=True)
class HttpPayload:
    status: int
    headers: dict[str, list[str]]  # lower-case names
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None


def warc_files(paths: list[str]) -> list[str]:
    """The archive files named by ``paths`` (files, or folders of WARC/WAT files), sorted, unique."""
    found: list[str] = []
    for path in paths:
        fs, fs_path = storage.filesystem(path)
        if not fs.exists(fs_path):
            raise FileNotFoundError(f"warc: {path!r} does not exist")
        if fs.isdir(fs_path):
            inside = [f for f in storage.list_files(path) if f.lower().endswith(WARC_SUFFIXES)]
            if not inside:
                raise FileNotFoundError(f"warc: no {', '.join(WARC_SUFFIXES)} files in {path!r}")
            found.extend(inside)
        else:
            found.append(path)
    return sorted(set(found))


def _truncated(detail: str) -> SampleError:
    return SampleError(Reason.WARC_TRUNCATED, detail)


def _malformed(detail: str) -> SampleError:
    return SampleError(Reason.WARC_MALFORMED, detail)


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise _truncated(f"record block ends after {len(data)} of {n} bytes")
    return data


def _skip_exactly(stream: IO[bytes], n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, SKIP_CHUNK))
        if not chunk:
            raise _truncated(f"record block ends {n} bytes early")
        n -= len(chunk)


def read_records(stream: IO[bytes], max_block_bytes: int) -> Iterator[WarcRecord]:
    """Records of an uncompressed (or already decompressing) binary stream, in order."""
    try:
        while True:
            line = stream.readline(MAX_HEADER_LINE)
            if not line:
                return
            if not line.strip():
                continue  # the blank lines after each block
            if not line.startswith(b"WARC/"):
                raise _malformed(f"expected a WARC/1.x version line, got {line[:40]!r}")
            headers: dict[bytes, bytes] = {}
            while True:
                line = stream.readline(MAX_HEADER_LINE)
                if not line:
                    raise _truncated("file ends inside a record header")
                if not line.strip():
                    break
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
                if len(headers) > MAX_HEADERS:
                    raise _malformed(f"more than {MAX_HEADERS} header fields")
            try:
                length = int(headers[b"content-length"])
                if length < 0:
                    raise ValueError(length)
            except (KeyError, ValueError):
                raise _malformed("record without a valid Content-Length") from None
            complete = length <= max_block_bytes
            block = _read_exactly(stream, length if complete else min(length, HEAD_BYTES))
            if not complete:
                _skip_exactly(stream, length - len(block))
            target = headers.get(b"warc-target-uri")
            yield WarcRecord(
                type=headers.get(b"warc-type", b"").decode("latin-1").lower(),
                target_uri=target.decode("utf-8", "replace").strip("<>") if target else None,
                content_type=headers.get(b"content-type", b"").decode("latin-1").lower(),
                length=length,
                block=block,
                complete=complete,
            )
    except EOFError as exc:  # a gzip member cut short
        raise _truncated(f"compressed data ends early: {exc}") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _malformed(f"corrupt compressed data: {exc}") from None


def iter_warc(path: str, max_block_bytes: int) -> Iterator[WarcRecord]:
    """Records of the WARC/WAT file at ``path`` (local or s3://, .gz or not), streamed."""
    with storage.open_file(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic == b"\x1f\x8b":
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            stream = io.BufferedReader(raw, READ_BUFFER)  # fast readline, whatever fsspec hands back
        with stream:
            yield from read_records(stream, max_block_bytes)


# -- the HTTP message inside a response record ------------------------------------------


def _dechunk(body: bytes, cap: int) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise ValueError("chunk size line missing")
        size = int(body[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        out += body[start : start + size]
        if len(out) > cap:
            raise OverflowError
        pos = start + size + 2


def _decompress(body: bytes, coding: str, cap: int) -> bytes:
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(coding)
    if wbits is None:
        raise SampleError(Reason.BAD_ENCODING, f"unsupported Content-Encoding {coding!r}")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, cap + 1)
    except zlib.error:
        if coding != "deflate":
            raise SampleError(Reason.BAD_ENCODING, f"corrupt {coding} body") from None
        data = zlib.decompressobj(-15).decompress(body, cap + 1)  # raw deflate, as some servers send it
    if len(data) > cap:
        raise SampleError(Reason.PAGE_TOO_LARGE, f"more than {cap} bytes once decompressed")
    return data


def http_payload(block: bytes, max_body_bytes: int, *, headers_only: bool = False) -> HttpPayload:
    """Status, headers and decoded body of an HTTP response block; ``warc_malformed`` if unreadable.

    ``headers_only``: the body is returned as stored (no dechunking or decompression),
    for the head of a block too large to read whole.
    """
    end, gap = block.find(b"\r\n\r\n"), 4
    if end < 0:
        end, gap = block.find(b"\n\n"), 2
    if end < 0:
        raise _malformed("HTTP response without the blank line after its headers")
    lines = block[:end].decode("latin-1").splitlines()
    try:
        status = int(lines[0].split(None, 2)[1])
    except (IndexError, ValueError):
        raise _malformed(f"not an HTTP status line: {lines[0][:60] if lines else ''!r}") from None
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    body = block[end + gap :]
    if headers_only:
        return HttpPayload(status, headers, body)
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        try:
            body = _dechunk(body, max_body_bytes)
        except OverflowError:
            raise SampleError(Reason.PAGE_TOO_LARGE, f"more than {max_body_bytes} bytes once dechunked") from None
        except ValueError as exc:
            raise _malformed(f"bad chunked body: {exc}") from None
    coding = ",".join(headers.get("content-encoding", [])).strip().lower()
    if coding and coding != "identity":
        body = _decompress(body, coding, max_body_bytes)
    return HttpPayload(status, headers, body)
