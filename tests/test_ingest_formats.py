"""img2dataset compatibility: input formats, output formats, option names, distributors, progress.

Downloads go to a real HTTP server on 127.0.0.1 (tests/_ingest_web.py); the S3 case
uses the moto server on loopback.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _ingest_web import HostileWeb
from core import storage
from core.config import ConfigError, DataError, from_dict, parse_config
from core.executor import Progress
from core.reasons import Reason
from ingest import reader
from ingest.config import IngestConfig
from ingest.reader import read_shards
from ingest.run import run_ingest
from ingest.shard_worker import download_shard

REPO = Path(__file__).resolve().parents[1]
ROWS = 12


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as server:
        yield server


def url_list(tmp: Path, base: str, rows: int = ROWS, delay: float = 0.0) -> Path:
    urls = [f"{base}/img/f{i}.jpg" + (f"?delay={delay}" if delay else "") for i in range(rows)]
    urls[3] = f"{base}/status/404"
    table = pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(rows)], "license": ["cc0"] * rows})
    pq.write_table(table, tmp / "urls.parquet")
    return tmp / "urls.parquet"


def config(list_path: Path, output: str, **overrides) -> IngestConfig:
    values = dict(url_list=str(list_path), input_format="parquet", url_col="URL", caption_col="TEXT",
                  save_additional_columns=["license"], output_folder=output, image_size=32,
                  number_sample_per_shard=5, distributor="inline", thread_count=4, timeout=5.0,
                  allow_networks=["127.0.0.1/32"], progress=False)
    return IngestConfig(**{**values, **overrides})


# -- output formats ---------------------------------------------------------------------


def test_parquet_output_holds_the_images_in_a_jpg_column(tmp_path, web):
    summary = run_ingest(config(url_list(tmp_path, web.base), str(tmp_path / "out"), output_format="parquet"))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json",
                     "00002.parquet", "00002_stats.json", "_ingest_summary.json"]
    rows = [r for i in range(3) for r in pq.read_table(tmp_path / "out" / f"{i:05d}.parquet").to_pylist()]
    assert len(rows) == ROWS and summary.successes == ROWS - 1
    for row in rows:
        if row["status"] == "success":
            assert Image.open(io.BytesIO(row["jpg"])).size == (32, 32) and row["license"] == "cc0"
        else:
            assert row["jpg"] is None and row["reason"] == "http_404"
    assert pq.read_schema(tmp_path / "out" / "00000.parquet").field("jpg").type == pa.binary()


@pytest.mark.parametrize("output", ["local", "s3"])
def test_files_output_is_a_folder_per_shard(tmp_path, web, output, request):
    if output == "s3":
        request.getfixturevalue("s3_env")
        folder = f"s3://webclip/files-{os.getpid()}"
    else:
        folder = str(tmp_path / "out")
    run_ingest(config(url_list(tmp_path, web.base), folder, output_format="files"))
    files = {p.removeprefix(folder.rstrip("/") + "/") for p in _walk(folder)}
    assert not any(f.endswith(".tar") for f in files)
    assert {"00000.parquet", "00000_stats.json", "00002_stats.json"} <= files
    shard0 = sorted(f for f in files if f.startswith("00000/"))
    # Row 3 failed (404): no files for it; every success has image, caption and metadata.
    assert shard0 == [f"00000/00000{i}.{ext}" for i in (0, 1, 2, 4) for ext in ("jpg", "json", "txt")]
    meta = json.loads(_read(storage.join(folder, "00000/000000.json")))
    assert meta["caption"] == "caption 0" and meta["license"] == "cc0" and meta["status"] == "success"
    assert _read(storage.join(folder, "00000/000000.txt")) == b"caption 0"


def _walk(folder: str) -> list[str]:
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache()
    prefix = "" if storage.is_local(folder) else "s3://"
    return [prefix + p for p in fs.find(path)]


def _read(path: str) -> bytes:
    with storage.open_file(path) as handle:
        return handle.read()


def test_webdataset_output_and_extra_hash_column(tmp_path, web):
    run_ingest(config(url_list(tmp_path, web.base), str(tmp_path / "out"), compute_hash="sha512"))
    table = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert "sha512" in table.column_names and "sha256" in table.column_names
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000.jpg", "000000.txt", "000000.json"]


# -- distributors and live progress -----------------------------------------------------------


def test_multiprocessing_distributor_matches_inline(tmp_path, web, capfd):
    urls = url_list(tmp_path, web.base, rows=20)
    run_ingest(config(urls, str(tmp_path / "inline")))
    summary = run_ingest(config(urls, str(tmp_path / "mp"), distributor="multiprocessing", workers=2,
                                progress=True))
    assert summary.count == 20 and summary.shards_total == 4
    for shard in range(4):
        name = f"{shard:05d}.tar"
        assert (tmp_path / "mp" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()
    err = capfd.readouterr().err
    assert "ingest" in err and "ok=" in err and "sample/s" in err


def test_workers_report_progress_while_a_shard_is_in_flight(tmp_path, web):
    """A single slow shard: running counts arrive before it commits, then its final stats."""
    cfg = config(url_list(tmp_path, web.base, rows=24, delay=0.12), str(tmp_path / "out"),
                 number_sample_per_shard=24, thread_count=2)
    shard = next(read_shards(cfg.url_list, "parquet", "URL", "TEXT", ["license"], 24))
    reports: list[tuple[int, int, int]] = []
    stats = download_shard(shard, cfg, lambda *counts: reports.append(counts))
    assert any(0 < count < 24 for _, count, _ in reports)  # reported before the shard finished
    assert [count for _, count, _ in reports] == sorted(count for _, count, _ in reports)
    # What ingest.run hands them to: the executor's bar, counting absolute counts per shard.
    progress = Progress("ingest", unit="shard", item="sample", total=24, enabled=False)
    progress.running(shard.shard_id, {"items": reports[0][1], "successes": reports[0][2]})
    assert tuple(progress.totals.values()) == reports[0][1:]
    progress.finished(shard.shard_id, {"items": stats["count"], "successes": stats["successes"]})
    progress.running(shard.shard_id, {"items": reports[-1][1], "successes": reports[-1][2]})  # a late report
    assert tuple(progress.totals.values()) == (24, 23)  # after the commit changes nothing


# -- input formats ----------------------------------------------------------------------


def test_json_array_is_streamed_element_by_element(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "_JSON_CHUNK", 7)  # every element straddles a chunk seam
    records = [{"url": f"http://a/{i}.jpg", "caption": f"c {i} \u00e9\u2028x", "n": i * 1234567} for i in range(25)]
    body = json.dumps(records[:10], indent=1) + "\n"
    (tmp_path / "list.json").write_text(body[:-2] + ", 42, \"text\", " + json.dumps(records[10:])[1:] + "\n")
    (shard,) = read_shards(str(tmp_path / "list.json"), "json", "url", "caption", ["n"], 100)
    assert shard.urls == [r["url"] for r in records[:10]] + [None, None] + [r["url"] for r in records[10:]]
    assert shard.captions[11] is None and shard.captions[24] == records[22]["caption"]
    assert shard.extras["n"][26] == 24 * 1234567


def test_json_lines_in_a_json_file_and_gz_forms(tmp_path):
    rows = [{"url": f"http://a/{i}.jpg", "caption": f"c{i}"} for i in range(7)]
    with gzip.open(tmp_path / "list.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with gzip.open(tmp_path / "list.csv.gz", "wt") as f:
        f.write("url,caption\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows))
    with gzip.open(tmp_path / "list.txt.gz", "wt") as f:
        f.write("".join(f"{r['url']}\n" for r in rows))
    for name, fmt, caption in (("list.json.gz", "json.gz", "caption"), ("list.csv.gz", "csv.gz", "caption"),
                               ("list.txt.gz", "txt.gz", None)):
        shards = list(read_shards(str(tmp_path / name), fmt, "url", caption, [], 3))
        assert [u for s in shards for u in s.urls] == [r["url"] for r in rows], name
        assert [len(s) for s in shards] == [3, 3, 1]


def test_a_folder_mixing_plain_and_gz_files_reads_both(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "a.csv").write_text("url,caption\nhttp://a/1.jpg,one\n")
    with gzip.open(folder / "b.csv.gz", "wt") as f:
        f.write("url,caption\nhttp://a/2.jpg,two\n")
    for fmt in ("csv", "csv.gz"):
        shards = list(read_shards(str(folder), fmt, "url", "caption", [], 10))
        assert [u for s in shards for u in s.urls] == ["http://a/1.jpg", "http://a/2.jpg"], fmt


def test_broken_json_array_is_a_clear_error(tmp_path):
    (tmp_path / "list.json").write_text('[{"url": "http://a/1.jpg"}, {"url": ')
    with pytest.raises(DataError, match="list.json"):
        list(read_shards(str(tmp_path / "list.json"), "json", "url", None, [], 10))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "txt"])
def test_non_utf8_bytes_flag_the_row_and_keep_the_rest(tmp_path, fmt):
    good, bad = "caf\u00e9 ok", b"caf\xe9 \xff bad"
    if fmt == "txt":
        body = b"http://a/1.jpg\nhttp://a/\xff.jpg\nhttp://a/3.jpg\n"
    elif fmt == "jsonl":
        body = (json.dumps({"url": "http://a/1.jpg", "caption": good}).encode() + b"\n"
                + b'{"url": "http://a/2.jpg", "caption": "' + bad + b'"}\n'
                + json.dumps({"url": "http://a/3.jpg", "caption": "x"}).encode() + b"\n")
    else:
        sep = b"," if fmt == "csv" else b"\t"
        body = (b"url" + sep + b"caption\n" + b"http://a/1.jpg" + sep + good.encode() + b"\n"
                + b"http://a/2.jpg" + sep + bad + b"\n" + b"http://a/3.jpg" + sep + b"x\n")
    (tmp_path / f"list.{fmt}").write_bytes(body)
    caption = None if fmt == "txt" else "caption"
    (shard,) = read_shards(str(tmp_path / f"list.{fmt}"), fmt, "url", caption, [], 10)
    assert len(shard) == 3 and shard.urls[0] == "http://a/1.jpg" and shard.urls[2] == "http://a/3.jpg"
    if fmt == "txt":
        assert shard.row_errors == {1: (Reason.INVALID_URL, "the URL is not valid UTF-8")}
        assert shard.urls[1] == "http://a/\ufffd.jpg"
    else:
        assert shard.captions[0] == good and shard.captions[1] == "caf\ufffd \ufffd bad"
        assert list(shard.row_errors) == [1] and shard.row_errors[1][0] is Reason.CAPTION_NOT_UTF8


def test_binary_caption_column_in_parquet(tmp_path):
    pq.write_table(pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg"],
                             "caption": pa.array([b"fine", b"\xff\xfe"], pa.binary())}), tmp_path / "l.parquet")
    (shard,) = read_shards(str(tmp_path / "l.parquet"), "parquet", "url", "caption", [], 10)
    assert shard.captions == ["fine", "\ufffd\ufffd"] and list(shard.row_errors) == [1]


# -- the command line -----------------------------------------------------------------------


def test_an_img2dataset_command_line_parses_with_its_meanings():
    argv = ["--url_list", "x.csv.gz", "--input_format", "csv.gz", "--url_col", "URL", "--caption_col", "TEXT",
            "--output_folder", "out", "--output_format", "files", "--save_additional_columns", '["NSFW", "LICENSE"]',
            "--disallowed_header_directives", "[]", "--resize_only_if_bigger", "True", "--compute_hash", "md5",
            "--distributor", "multiprocessing", "--enable_wandb", "False", "--processes_count", "16",
            "--thread_count", "128", "--image_size", "384", "--resize_mode", "keep_ratio", "--encode_format", "webp",
            "--encode_quality", "80", "--number_sample_per_shard", "1000", "--timeout", "20", "--retries", "1",
            "--incremental_mode", "overwrite", "--min_image_size", "64", "--max_image_area", "inf",
            "--max_aspect_ratio", "3.5", "--user_agent_token", "me@example.org", "--max_shard_retry", "1"]
    cfg = parse_config(IngestConfig, argv, "ingest", "")
    assert cfg.save_additional_columns == ["NSFW", "LICENSE"] and cfg.disallowed_header_directives == []
    assert cfg.resize_only_if_bigger is True and cfg.compute_hash == "md5" and cfg.extra_columns()[-1] == "md5"
    assert (cfg.output_format, cfg.distributor, cfg.input_format) == ("files", "multiprocessing", "csv.gz")
    assert cfg.fetch_config().disallowed_header_directives == () and cfg.max_aspect_ratio == 3.5
    assert parse_config(IngestConfig, ["--url_list", "x", "--output_folder", "y", "--compute_hash", "None"],
                        "ingest", "").hash_columns() == []


@pytest.mark.parametrize("option, value, message", [
    ("distributor", "pyspark", "not supported; use ray"),
    ("output_format", "tfrecord", "choose one of webdataset, parquet, files"),
    ("compute_hash", "crc32", "choose one of sha256"),
    ("input_format", "xlsx", "input_format='xlsx'"),
    ("save_additional_columns", ["status"], "clash with the pool's own columns"),
])
def test_unsupported_values_are_named(option, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(IngestConfig, {"url_list": "x", "output_folder": "y", option: value})


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "ingest", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}, check=True).stdout
    for field in dataclasses.fields(IngestConfig):
        assert f"--{field.name}" in out and len(field.metadata["help"]) > 15, field.name
    for word in ("webdataset", "multiprocessing", "allow_networks", "_stats.json", "resume"):
        assert word in out
