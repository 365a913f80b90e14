"""core/tarreader.py reads what tarfile writes, and stops at damage with a clear error."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from core.tarreader import TarStreamError, iter_tar_files, iter_tar_samples, split_member_name

LONG = "deep/" * 30 + "000000001.jpg"  # > 100 characters: needs a GNU or pax header


def _tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBERS = [("000.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("000.txt", "café".encode()), (LONG, b"x" * 513),
           ("ünïcode-ñame.json", b"{}"), ("empty.txt", b"")]  # fmt: skip


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_writes(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if m[0].isascii()]
    data = _tar(fmt, members)
    assert list(iter_tar_files(io.BytesIO(data))) == members


def test_compressed_tar_goes_through_tarfile():
    data = gzip.compress(_tar(tarfile.PAX_FORMAT, MEMBERS))
    assert list(iter_tar_files(io.BytesIO(data), reopen=lambda: io.BytesIO(data))) == MEMBERS
    with pytest.raises(TarStreamError, match="compressed"):
        list(iter_tar_files(io.BytesIO(data)))


def test_truncated_member_names_the_member_after_the_complete_ones():
    data = _tar(tarfile.GNU_FORMAT, MEMBERS)
    cut = data.index(b"x" * 513) + 100
    got = []
    with pytest.raises(TarStreamError, match="truncated member data") as error:
        for item in iter_tar_files(io.BytesIO(data[:cut])):
            got.append(item)
    assert got == MEMBERS[:2] and error.value.member == LONG


def test_flipped_header_byte_is_a_bad_checksum():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, MEMBERS[:2]))
    data[512 + 3] ^= 0x01  # inside the second header's name ("000.jpg")
    with pytest.raises(TarStreamError, match="checksum"):
        list(iter_tar_files(io.BytesIO(bytes(data))))


def test_missing_end_marker_and_partial_header():
    data = _tar(tarfile.USTAR_FORMAT, MEMBERS[:2])
    body = data[: data.rindex(b"caf") + 512 - (data.rindex(b"caf") % 512)]  # through the last data block
    assert list(iter_tar_files(io.BytesIO(body))) == MEMBERS[:2]
    with pytest.raises(TarStreamError, match="truncated header"):
        list(iter_tar_files(io.BytesIO(body + b"\x01" * 100)))


def test_signed_checksum_of_old_writers_is_accepted():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, [("cafe.txt", b"x")]))
    header = data[512:1024]  # the member after the folder entry
    header[0:8] = b"caf\xe9.txt"  # a Latin-1 name: one byte above 127
    header[148:156] = b"        "
    signed = sum(b - 256 if b > 127 else b for b in header)  # as old writers summed signed chars
    header[148:156] = b"%06o\0 " % signed
    data[512:1024] = header
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), encoding="latin-1") as tar:  # tarfile accepts it
        assert [m.name for m in tar.getmembers() if m.isfile()] == ["caf\xe9.txt"]
    assert [d for _, d in iter_tar_files(io.BytesIO(bytes(data)))] == [b"x"]


def test_samples_group_consecutive_members_by_key():
    """The WebDataset key: the path up to the first dot of the base name; the rest is the extension."""
    members = [("a.jpg", b"1"), ("a.TXT", b"2"), ("dir/a.seg.png", b"3"), ("dir/a.json", b"4"), ("b.txt", b"5")]
    samples = list(iter_tar_samples(io.BytesIO(_tar(tarfile.USTAR_FORMAT, members))))
    assert samples == [("a", {"jpg": b"1", "txt": b"2"}), ("dir/a", {"seg.png": b"3", "json": b"4"}),
                       ("b", {"txt": b"5"})]  # fmt: skip
    assert split_member_name("x/y.z/000123.jpg") == ("x/y.z/000123", "jpg")


def test_damage_keeps_the_samples_before_it_and_drops_the_one_it_cuts():
    members = [("a.jpg", b"A" * 600), ("a.txt", b"caption a"), ("b.jpg", b"B" * 600), ("b.txt", b"caption b")]
    data = _tar(tarfile.USTAR_FORMAT, members)
    for cut, cut_member in ((data.index(b"B" * 600) + 100, "b.jpg"),  # the first member of b: a is complete
                            (data.index(b"caption b") + 3, "b.txt")):  # b's last member: b may be incomplete
        got = []
        with pytest.raises(TarStreamError, match=cut_member):
            for sample in iter_tar_samples(io.BytesIO(data[:cut])):
                got.append(sample.key)
        assert got == ["a"]
