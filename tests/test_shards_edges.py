"""shards/ on odd and hostile inputs: each case here once broke or fooled it."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.shard_writer import FilesShardWriter
from shards.config import ReportConfig, ShardsConfig, VerifyConfig
from shards.page import render_page
from shards.report import build_report
from shards.reshard import reshard
from shards.stats import hosts_of
from shards.verify import verify
from tests._shards_fixtures import make_pool


def _report(spec, **kw) -> dict:
    return build_report(ReportConfig(pool=spec.pool, decisions=spec.decisions, output_folder="/nonexistent",
                                     workers=1, progress=False, **kw))


def _kinds(folder) -> list[tuple[str, str]]:
    return sorted((f["kind"], f["path"]) for f in verify(VerifyConfig(folder=str(folder), workers=1,
                                                                      progress=False))["findings"])


def _rewrite(path: Path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def test_script_data_cannot_break_out_of_its_script_element(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=30)
    hostile = "</script><!--<script>alert(1)//"

    def poison(table: pa.Table) -> pa.Table:
        reasons = table["reason"].to_pylist()
        keep = table["keep"].to_pylist()
        i = next(j for j, k in enumerate(keep) if k)
        keep[i], reasons[i] = False, hostile
        return table.set_column(table.schema.get_field_index("keep"), "keep", pa.array(keep)).set_column(
            table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))

    _rewrite(Path(spec.decisions) / "00000.parquet", poison)
    page = render_page(_report(spec))
    assert page.count("<script") == 2 and page.count("</script>") == 2
    data = re.search(r"<script type=application/json id=report-data>(.*?)</script>", page, re.DOTALL).group(1)
    assert "<" not in data and hostile in json.dumps(json.loads(data))
    assert hostile not in page.replace(json.dumps(hostile)[1:-1], "")  # only ever escaped


def test_pool_rows_without_a_decision_are_not_kept_and_said(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=30)
    table = pq.read_table(Path(spec.decisions) / "00000.parquet")
    kept_rows = [i for i, k in enumerate(table["keep"].to_pylist()) if k]
    dropped = table.slice(kept_rows[1], 1)["key"][0].as_py()
    pq.write_table(table.filter(pa.array([k != dropped for k in table["key"].to_pylist()])),
                   Path(spec.decisions) / "00000.parquet")
    report = _report(spec)
    funnel = {s["step"]: s for s in report["funnel"]}
    assert funnel["kept"]["count"] == len(kept_rows) - 1
    assert funnel["kept"]["dropped"]["undecided"] == 1
    assert any("no row in the decisions" in w for w in report["warnings"])
    pq.write_table(table.slice(0, 0), Path(spec.decisions) / "00000.parquet")  # empty decisions: no crash
    assert {s["step"]: s["count"] for s in _report(spec)["funnel"]}["kept"] == 0


def test_odd_columns_and_null_dup_of_do_not_crash_the_report(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=30)
    _rewrite(Path(spec.pool) / "00000.parquet", lambda t: t.drop_columns(["url"]).set_column(
        t.schema.get_field_index("error_message") - 1, "error_message", pa.nulls(t.num_rows)))
    _rewrite(Path(spec.decisions) / "00000.parquet", lambda t: t.set_column(
        t.schema.get_field_index("dup_of"), "dup_of", pa.nulls(t.num_rows, pa.string())))
    report = _report(spec)
    assert report["domains"]["top"][0]["domain"] == "(no host)"
    assert report["near_duplicates"]["clusters"] == 0


def test_decision_columns_written_all_null_are_read_as_their_type(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=30)
    _rewrite(Path(spec.decisions) / "00000.parquet", lambda t: t.set_column(
        t.schema.get_field_index("keep"), "keep", pa.nulls(t.num_rows)))  # type null: no row kept
    funnel = {s["step"]: s for s in _report(spec)["funnel"]}
    assert funnel["kept"]["count"] == 0 and funnel["downloaded"]["count"] > 0


def test_non_numeric_keys_name_their_largest_clusters(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=30)

    def rename(t: pa.Table) -> pa.Table:
        dup_of = ["img-" + k if k else None for k in t["dup_of"].to_pylist()]
        return t.set_column(t.schema.get_field_index("dup_of"), "dup_of", pa.array(dup_of, pa.string()))

    _rewrite(Path(spec.decisions) / "00000.parquet", rename)
    largest = _report(spec)["near_duplicates"]["largest"]
    assert largest and all(c["kept_key"].startswith("img-") for c in largest)


def test_hosts_of_odd_urls():
    urls = ["https://User:pw@Example.COM:8443/x", "http://a@b@evil.com/", "http://ex.com\\@good.com/",
            "//cdn.example.com/a.jpg", "  https://spaced.example/x", "http://[2001:db8::1]:80/", "http://dot.example./",
            "no url at all", None]
    assert hosts_of(pa.array(urls, pa.string())).to_pylist() == [
        "example.com", "evil.com", "ex.com", "cdn.example.com", "spaced.example", "[2001:db8::1]", "dot.example",
        "(no host)", "(no host)"]


def test_verify_misses_no_file_a_marker_lists(tmp_path):
    spec = make_pool(str(tmp_path), shards=2, rows_per_shard=20)
    for tar in Path(spec.pool).glob("*.tar"):
        tar.unlink()
    assert _kinds(spec.pool) == [("missing", "00000.tar"), ("missing", "00001.tar")]


def test_verify_reads_the_files_layout(tmp_path):
    folder = tmp_path / "files"
    writer = FilesShardWriter(str(folder), 0, "jpg", [])
    for i in range(6):
        writer.add({"key": f"00000{i:02d}", "caption": f"c {i}", "status": "success"}, b"\xff\xd8 fake jpeg")
    writer.commit({"count": 6, "successes": 6})
    assert _kinds(folder) == []
    (folder / "00000" / "0000003.jpg").unlink()
    assert ("mismatched", "00000/") in _kinds(folder)
    shutil.rmtree(folder / "00000")
    assert ("missing", "00000/") in _kinds(folder)


def test_verify_names_unreadable_records(tmp_path):
    spec = make_pool(str(tmp_path), shards=2, rows_per_shard=20)
    marker = Path(spec.pool) / "00001_stats.json"
    marker.write_text(marker.read_text()[:40])
    assert _kinds(spec.pool) == [("corrupted", "00001_stats.json")]
    train = tmp_path / "train"
    train.mkdir()
    (train / "manifest.json").write_text('{"shards": [')
    assert _kinds(train) == [("corrupted", "manifest.json")]


def test_an_empty_dataset_resharded_verifies(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=10)
    _rewrite(Path(spec.decisions) / "00000.parquet", lambda t: t.set_column(
        t.schema.get_field_index("keep"), "keep", pa.array([False] * t.num_rows)))
    manifest = reshard(ShardsConfig(pool=spec.pool, decisions=spec.decisions, output_folder=str(tmp_path / "t"),
                                    distributor="inline", report=False, progress=False))
    assert manifest["total_samples"] == 0 and manifest["shards"] == []
    assert _kinds(tmp_path / "t") == []


def test_a_mixed_format_pool_keeps_each_image_extension(tmp_path):
    spec = make_pool(str(tmp_path), shards=1, rows_per_shard=20)
    tar_path = Path(spec.pool) / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    renamed = None
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if renamed is None and member.name.endswith(".jpg") and member.name[:-4] in spec.kept_keys:
                renamed = member.name[:-4]
                member.name = renamed + ".png"
            tar.addfile(member, io.BytesIO(data))
    manifest = reshard(ShardsConfig(pool=spec.pool, decisions=spec.decisions, output_folder=str(tmp_path / "t"),
                                    distributor="inline", report=False, progress=False))
    with tarfile.open(tmp_path / "t" / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert f"{renamed}.png" in names and f"{renamed}.jpg" not in names


def test_reshard_names_missing_pool_files_and_refuses_a_negative_seed(tmp_path):
    spec = make_pool(str(tmp_path), shards=3, rows_per_shard=10)
    (Path(spec.pool) / "00002.tar").unlink()
    with pytest.raises(SystemExit, match="committed shards without their files: 00002.tar"):
        reshard(ShardsConfig(pool=spec.pool, decisions=spec.decisions, output_folder=str(tmp_path / "t"),
                             distributor="inline", report=False, progress=False))
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="seed=-1"):
        ShardsConfig(pool="p", decisions="d", output_folder="o", seed=-1)
