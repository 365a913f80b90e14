"""A small streaming tar reader: a tar's regular files as (name, bytes), or grouped into samples.

``iter_tar_files`` reads plain tars itself (a 512-byte header, the data padded to 512
bytes, GNU ``L`` and pax ``x`` records for long names and big sizes), far cheaper per
member than ``tarfile``'s stream mode (BENCHMARKS.md, "Trainer against open_clip_train");
compressed tars go through ``tarfile``. Every header's checksum is verified and a short
read raises ``TarStreamError``, so a damaged shard stops at the damage, after the members
before it.

``iter_tar_samples`` groups consecutive members into samples by key, the WebDataset
convention every stage reads shards by: the key is the member's path up to the first
dot of its base name, the rest (lower-cased) its extension (``dir/0001.seg.jpg`` is key
``dir/0001``, extension ``seg.jpg``).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
_REGULAR = (b"0", b"\0", b"7")


class TarStreamError(ValueError):
    """The tar is damaged: a bad header checksum, a bad number, or data cut short.

    ``member`` names the member whose data was cut short, when known: a reader that
    groups members by key then knows the members before it were complete.
    """

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def iter_tar_files(handle: BinaryIO, reopen=None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file of the tar read from ``handle``.

    ``reopen`` (optional) returns a fresh handle on the same bytes: it is used when the
    first block shows a compressed tar, which is then read through ``tarfile``.
    """
    first = handle.read(BLOCK)
    if first.startswith(_COMPRESSED_MAGIC):
        if reopen is None:
            raise TarStreamError("compressed tar: pass reopen= to read it through tarfile")
        yield from _through_tarfile(reopen())
        return
    yield from _plain(handle, first)


class TarSample(NamedTuple):
    key: str
    members: dict[str, bytes]  # extension -> bytes


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``: the key ends at the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


# What a damaged or unreadable tar raises while being read (the compressed path adds tarfile's).
READ_ERRORS = (TarStreamError, tarfile.TarError, OSError, EOFError)


def iter_tar_samples(handle: BinaryIO, reopen=None) -> Iterator[TarSample]:
    """The tar's consecutive members grouped by key, as samples.

    On damage (one of ``READ_ERRORS``) the samples before it are yielded, the sample the
    damage cuts into is dropped (it may be incomplete; a sample is kept only when the
    error names a member of a later key), and the error is raised.
    """
    current: TarSample | None = None
    try:
        for name, data in iter_tar_files(handle, reopen):
            key, ext = split_member_name(name)
            if current is not None and current.key != key:
                yield current  # complete: before reading on, which may fail
                current = None
            if current is None:
                current = TarSample(key, {})
            current.members[ext] = data
    except READ_ERRORS as exc:
        cut = getattr(exc, "member", None)
        if current is not None and cut is not None and split_member_name(cut)[0] != current.key:
            yield current
        raise
    if current is not None:
        yield current


def _through_tarfile(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    with handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                yield member.name, extracted.read() if extracted is not None else b""


def _plain(handle: BinaryIO, header: bytes) -> Iterator[tuple[str, bytes]]:
    long_name: bytes | None = None  # from a GNU 'L' or pax 'path' record, for the next member
    pax_size: int | None = None
    while True:
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker at a block boundary is tolerated)
        if len(header) < BLOCK:
            raise TarStreamError(f"truncated header ({len(header)} of {BLOCK} bytes)")
        _check_checksum(header)
        size = pax_size if pax_size is not None else _number(header[124:136])
        kind = header[156:157]
        try:
            data = _read_exact(handle, size)  # the bytes themselves, not copied again to drop padding
            _read_exact(handle, -size % BLOCK)
        except TarStreamError as exc:
            name = (long_name or _ustar_name(header)).decode("utf-8", "replace")
            raise TarStreamError(f"{name}: {exc}", member=name) from None
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0]
        elif kind == b"x":
            records = _pax_records(data)
            long_name = records.get(b"path", long_name)
            pax_size = int(records[b"size"]) if b"size" in records else None
        elif kind == b"g":
            pass  # global pax header: nothing here that a reader of names and bytes needs
        else:
            if kind in _REGULAR:
                yield (long_name or _ustar_name(header)).decode("utf-8", "replace"), data
            long_name = pax_size = None  # they applied to this member only
        header = handle.read(BLOCK)


def _ustar_name(header: bytes) -> bytes:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            return prefix + b"/" + name
    return name


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarStreamError(f"bad number field {field!r}") from None


def _check_checksum(header: bytes) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned:
        high = sum(1 for b in header[:148] if b > 127) + sum(1 for b in header[156:] if b > 127)
        signed = unsigned - 256 * high  # some old writers summed the bytes as signed chars
        if stored != signed:
            raise TarStreamError("bad header checksum")


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``"%d key=value\\n"`` records, the length counting the whole record."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarStreamError("bad pax record length") from None
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        records[key] = value
        pos += length
    return records


def _read_exact(handle: BinaryIO, n: int) -> bytes:
    if n == 0:
        return b""
    data = handle.read(n)
    while len(data) < n:
        more = handle.read(n - len(data))
        if not more:
            raise TarStreamError(f"truncated member data ({len(data)} of {n} bytes)")
        data += more
    return data
