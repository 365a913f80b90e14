"""core/tarwriter.py writes tars that tarfile, webdataset and our reader read back."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from core.tarwriter import RECORD, TarWriter, tar_header
from core.tarreader import iter_tar_files

MEMBERS = [("000000001.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("000000001.txt", "café ☕".encode()),
           ("000000001.json", b"{}"), ("000000002.jpg", b""), ("000000002.txt", b"x" * 512)]  # fmt: skip


def _write(path, members) -> bytes:
    with TarWriter(path) as tar:
        for name, data in members:
            tar.add(name, data)
    return path.read_bytes()


def test_tarfile_reads_every_member_with_fixed_metadata(tmp_path):
    data = _write(tmp_path / "a.tar", MEMBERS)
    assert len(data) % RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # tarfile verifies each header's checksum
        infos = tar.getmembers()
        assert [(i.name, tar.extractfile(i).read()) for i in infos] == MEMBERS
        assert {(i.mode, i.mtime, i.uid, i.gid, i.uname, i.gname, i.type) for i in infos} == {
            (0o444, 0, 0, 0, "", "", tarfile.REGTYPE)
        }


def test_our_reader_and_webdataset_read_it(tmp_path):
    _write(tmp_path / "00000.tar", MEMBERS)
    with open(tmp_path / "00000.tar", "rb") as handle:
        assert list(iter_tar_files(handle)) == MEMBERS
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000001", "000000002"]
    assert samples[0]["txt"] == "café ☕".encode() and samples[1]["jpg"] == b""


def test_same_members_same_bytes_and_bad_names_refused(tmp_path):
    assert _write(tmp_path / "a.tar", MEMBERS) == _write(tmp_path / "b.tar", MEMBERS)
    with pytest.raises(ValueError, match="must be 1 to 100 bytes"):
        tar_header("k" * 101, 1)
    with pytest.raises(ValueError, match="does not fit"):
        tar_header("big.bin", 8**11)
