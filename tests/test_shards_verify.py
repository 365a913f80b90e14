"""verify names each kind of damage, planted here, and exits non-zero."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.config import VerifyConfig
from shards.verify import main as verify_main
from shards.verify import verify
from tests._shards_fixtures import make_pool, make_train_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    spec = make_pool(str(root), shards=4, rows_per_shard=50, seed=7)
    make_train_shards(spec, str(root / "train"), samples_per_shard=20, mix_window=2)
    return spec, root / "train"


@pytest.fixture
def train(built, tmp_path) -> Path:
    copy = tmp_path / "train"
    shutil.copytree(built[1], copy)
    return copy


def _findings(folder: Path) -> list[tuple[str, str]]:
    result = verify(VerifyConfig(folder=str(folder), workers=1, progress=False))
    assert result["ok"] == (not result["findings"])
    return [(f["kind"], f["path"]) for f in result["findings"]]


def _rewrite_tar(path: Path, keep) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if keep(member.name):
                tar.addfile(member, io.BytesIO(data))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_intact_shards_pass_and_exit_0(train, capsys):
    assert _findings(train) == []
    assert verify_main([str(train), "--progress", "false"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    result = verify(VerifyConfig(folder=str(train), workers=2, progress=False))  # the process pool too
    assert result["ok"] and result["samples"] == _manifest(train)["total_samples"]


def test_a_flipped_byte_is_corrupted(train, capsys):
    path = train / "00001.tar"
    data = bytearray(path.read_bytes())
    data[512 + 20] ^= 0x01  # inside the first member's data: the tar still parses
    path.write_bytes(bytes(data))
    assert _findings(train) == [("corrupted", "00001.tar")]
    assert verify_main([str(train), "--progress", "false", "--output_json", str(train.parent / "v.json")]) == 1
    assert "CORRUPTED  00001.tar: sha256" in capsys.readouterr().out
    assert json.loads((train.parent / "v.json").read_text())["counts"]["corrupted"] == 1


def test_a_truncated_tar_is_corrupted(train):
    path = train / "00002.tar"
    path.write_bytes(path.read_bytes()[:1500])
    findings = verify(VerifyConfig(folder=str(train), workers=1, progress=False))["findings"]
    assert {(f["kind"], f["path"]) for f in findings} == {("corrupted", "00002.tar")}
    assert any("cannot be read to its end" in f["detail"] for f in findings)


def test_a_missing_shard_is_named(train):
    (train / "00003.tar").unlink()
    assert _findings(train) == [("missing", "00003.tar")]


def test_an_extra_shard_is_named(train):
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(train / f"00000{suffix}", train / f"00042{suffix}")
    assert sorted(_findings(train)) == [("extra", "00042.parquet"), ("extra", "00042.tar"),
                                        ("extra", "00042_stats.json")]


def test_a_count_mismatch_is_named(train):
    manifest = _manifest(train)
    manifest["shards"][0]["count"] += 1
    (train / "manifest.json").write_text(json.dumps(manifest))
    kinds = _findings(train)
    assert ("mismatched", "00000.tar") in kinds and all(k == "mismatched" for k, _ in kinds)


def test_a_tar_missing_a_sample_its_parquet_lists_is_mismatched(train):
    """Records updated to the damaged tar (hash and count): the tar-vs-parquet check still sees it."""
    path = train / "00001.tar"
    victim = pq.read_table(train / "00001.parquet")["key"][0].as_py()
    _rewrite_tar(path, lambda name: not name.startswith(victim))
    manifest = _manifest(train)
    import hashlib

    entry = manifest["shards"][1]
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), count=entry["count"] - 1)
    (train / "manifest.json").write_text(json.dumps(manifest))
    result = verify(VerifyConfig(folder=str(train), workers=1, progress=False))
    details = [f["detail"] for f in result["findings"] if f["kind"] == "mismatched"]
    assert any("missing from the tar" in d and victim in d for d in details), result["findings"]


def test_a_pool_is_checked_against_its_stats_markers(built, tmp_path):
    spec, _ = built
    pool = tmp_path / "pool"
    shutil.copytree(spec.pool, pool)
    assert _findings(pool) == []
    data = bytearray((pool / "00002.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pool / "00002.parquet").write_bytes(bytes(data))
    (pool / "00003_stats.json").unlink()  # an uncommitted shard: missing its marker
    assert sorted(_findings(pool)) == [("corrupted", "00002.parquet"), ("missing", "00003_stats.json")]


def test_an_img2dataset_folder_without_hashes_is_checked_for_consistency(built, tmp_path):
    """img2dataset's _stats.json has counts only: tar vs parquet vs counts are still checked."""
    spec, _ = built
    folder = tmp_path / "i2d"
    shutil.copytree(spec.pool, folder)
    for marker in folder.glob("*_stats.json"):
        stats = json.loads(marker.read_text())
        stats.pop("files")
        marker.write_text(json.dumps(stats))
    table = pq.read_table(folder / "00000.parquet")  # img2dataset's columns: no reason
    pq.write_table(table.drop_columns(["reason"]), folder / "00000.parquet")
    assert _findings(folder) == []
    table = pq.read_table(folder / "00001.parquet")
    pq.write_table(table.slice(0, table.num_rows - 5), folder / "00001.parquet")
    findings = verify(VerifyConfig(folder=str(folder), workers=1, progress=False))["findings"]
    assert {f["kind"] for f in findings} == {"mismatched"}
    assert any("rows" in f["detail"] and f["path"] == "00001.parquet" for f in findings)


def test_the_folder_must_exist_and_bad_options_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        verify(VerifyConfig(folder=str(tmp_path / "nowhere"), progress=False))
    (tmp_path / "empty").mkdir()
    assert _findings(tmp_path / "empty") == [("missing", ".")]  # an empty folder is not a verified dataset
    with pytest.raises(SystemExit) as exc:
        verify_main(["--folder", str(tmp_path), "--workers", "-1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        verify_main(["--help"])
    assert exc.value.code == 0 and "corrupted" in capsys.readouterr().out


def test_an_empty_parquet_is_not_a_crash(train):
    pq.write_table(pa.table({"x": [1]}), train / "00000.parquet")
    kinds = _findings(train)
    assert ("corrupted", "00000.parquet") in kinds
