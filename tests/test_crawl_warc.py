"""WARC/WAT input: the demo pages archived (by warcio), read back by crawl/'s own reader.

Checks the pairs against the page generator's ground truth, that damaged archives
(cut records, cut gzip members, garbage) become counted reasons after keeping what
came before, that an oversized record is skipped without being held in memory, and
that the output is a URL list ingest downloads, locally and on S3.
"""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
from collections import Counter
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from core import storage
from core.config import from_dict
from core.reasons import Reason, SampleError
from crawl.__main__ import main as crawl_main
from crawl.archive import crawl_warc_file
from crawl.config import CrawlConfig
from crawl.output import CrawlStats, PairWriter
from crawl.warc import http_payload
from infra.local.pages import load_truth, write_warc

PAGE_REASON_IN_A_WARC = {"robots_disallowed": None, "redirect": "http_other"}  # archives know no robots.txt


def config(out: str = "unused", **overrides) -> CrawlConfig:
    return from_dict(CrawlConfig, {"warc": ["unused"], "output_folder": out, "distributor": "inline",
                                   "progress": False, **overrides})


def expected_from_truth(corpus_dir) -> tuple[set, Counter]:
    """(pairs as (page path, image path, caption, source), reason counts) a WARC of every page must give."""
    page_rows, image_rows = load_truth(corpus_dir)
    page_reason = {r["path"]: PAGE_REASON_IN_A_WARC.get(r["expected_reason"], r["expected_reason"])
                   for r in page_rows}
    parsed = {path for path, reason in page_reason.items() if reason is None}
    pairs = {(r["page_path"], r["image_path"], r["caption"], r["caption_source"])
             for r in image_rows if r["page_path"] in parsed and r["expected_reason"] is None}
    reasons = Counter(r["expected_reason"] for r in image_rows if r["page_path"] in parsed and r["expected_reason"])
    reasons.update(reason for reason in page_reason.values() if reason)
    return pairs, reasons


def read_pairs(paths: list[str]) -> set:
    rows = [row for path in paths for row in pq.read_table(path).to_pylist()]
    return {(urlsplit(r["page_url"]).path, urlsplit(r["url"]).path, r["caption"], r["caption_source"]) for r in rows}


def crawl_file(path, tmp_path, **overrides) -> tuple[set, CrawlStats]:
    stats = CrawlStats()
    writer = PairWriter(str(tmp_path / "part.parquet"))
    crawl_warc_file(str(path), config(**overrides), writer, stats)
    writer.close()
    return read_pairs([str(tmp_path / "part.parquet")]), stats


@pytest.fixture(scope="module")
def demo_warc(small_corpus, tmp_path_factory):
    corpus_dir, base_url = small_corpus
    folder = tmp_path_factory.mktemp("warc")
    write_warc(folder / "pages.warc.gz", corpus_dir / "site", base_url)
    return folder / "pages.warc.gz"


@pytest.mark.parametrize("compress", [True, False])
def test_pairs_from_a_warc_match_the_ground_truth(small_corpus, tmp_path, compress):
    corpus_dir, base_url = small_corpus
    path = tmp_path / ("pages.warc.gz" if compress else "pages.warc")
    records = write_warc(path, corpus_dir / "site", base_url, compress=compress)
    pairs, stats = crawl_file(path, tmp_path)
    expected_pairs, expected_reasons = expected_from_truth(corpus_dir)
    assert pairs == expected_pairs and stats.pairs == len(expected_pairs)
    assert Counter(stats.reasons) == expected_reasons
    assert stats.records == records and stats.pages == records
    assert {source for *_, source in pairs} == {"alt", "figcaption"}
    assert any("café crème" in caption for _, _, caption, _ in pairs)  # a Latin-1 page, declared by its meta
    assert any("“naïve”" in caption for _, _, caption, _ in pairs)  # windows-1252, declared by the header only


def _cut(data: bytes, at: int, path) -> str:
    path.write_bytes(data[:at])
    return str(path)


@pytest.mark.parametrize("compress", [True, False])
def test_a_truncated_archive_keeps_what_came_before_and_counts_the_cut(small_corpus, tmp_path, compress):
    corpus_dir, base_url = small_corpus
    full = tmp_path / "full.warc"
    write_warc(full, corpus_dir / "site", base_url, compress=compress)
    data = full.read_bytes()
    all_pairs, _ = crawl_file(full, tmp_path)
    for fraction in (0.3, 0.55, 0.9):
        pairs, stats = crawl_file(_cut(data, int(len(data) * fraction), tmp_path / "cut.warc"), tmp_path)
        assert stats.reasons[Reason.WARC_TRUNCATED.value] == 1, fraction
        assert pairs < all_pairs


def test_garbage_and_broken_headers_are_malformed(tmp_path):
    cases = {
        "garbage.warc": b"this is not a WARC file at all\r\n" * 10,
        "gzip-garbage.warc.gz": gzip.compress(b"GET / HTTP/1.1\r\n\r\n"),
        "no-length.warc": b"WARC/1.0\r\nWARC-Type: response\r\n\r\nbody",
        "bad-length.warc": b"WARC/1.0\r\nContent-Length: -5\r\n\r\n",
        "corrupt.warc.gz": b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"\xff" * 200,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        pairs, stats = crawl_file(tmp_path / name, tmp_path)
        assert pairs == set() and stats.reasons == {"warc_malformed": 1}, name
    (tmp_path / "cut-header.warc").write_bytes(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Len")
    assert crawl_file(tmp_path / "cut-header.warc", tmp_path)[1].reasons == {"warc_truncated": 1}


def _record(writer, uri: str, body: bytes, headers: list[tuple[str, str]], status: str = "200 OK") -> None:
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http))


def test_http_bodies_are_dechunked_decompressed_and_judged(tmp_path):
    page = b'<img src="/a.jpg" alt="a bright red kite">'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(page[i:i + 7]), page[i:i + 7]) for i in range(0, len(page), 7)) + b"0\r\n\r\n"
    with open(tmp_path / "http.warc.gz", "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        _record(writer, "http://a.example/1", gzip.compress(page), [("Content-Type", "text/html"),
                                                                    ("Content-Encoding", "gzip")])
        _record(writer, "http://a.example/2", chunked, [("Content-Type", "text/html"), ("Transfer-Encoding", "chunked")])
        _record(writer, "http://a.example/3", page, [("Content-Type", "text/html"), ("Content-Encoding", "br")])
        _record(writer, "http://a.example/4", page, [("Content-Type", "text/html"), ("X-Robots-Tag", "noai")])
        _record(writer, "http://a.example/5", page, [("Content-Type", "image/png")])
        _record(writer, "http://a.example/6", gzip.compress(b"<p>" * 2_000_000), [
            ("Content-Type", "text/html"), ("Content-Encoding", "gzip")])  # a decompression bomb, in small
        _record(writer, "http://a.example/7", b"", [("Content-Type", "text/html")], status="503 Unavailable")
        writer.write_record(writer.create_warc_record("http://a.example/1", "request",
                                                      payload=io.BytesIO(b"GET /1 HTTP/1.1\r\n\r\n")))
        writer.write_record(writer.create_warc_record("http://a.example/r", "resource", payload=io.BytesIO(page),
                                                      warc_content_type="text/html"))
    pairs, stats = crawl_file(tmp_path / "http.warc.gz", tmp_path, max_page_bytes=1_000_000)
    assert {(page_path, caption) for page_path, _, caption, _ in pairs} == {
        ("/1", "a bright red kite"), ("/2", "a bright red kite"), ("/r", "a bright red kite")}
    assert stats.reasons == {"bad_encoding": 1, "opt_out": 1, "not_html": 1, "page_too_large": 1, "http_5xx": 1}
    assert stats.records == 9 and stats.pages == 8
    with pytest.raises(SampleError) as caught:
        http_payload(b"garbage without a blank line", 100)
    assert caught.value.reason is Reason.WARC_MALFORMED


def test_an_oversized_record_is_skipped_without_being_held(tmp_path):
    big = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + b"<p>spam</p>" * 4_000_000  # 44 MB
    small = b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<img src="/k.jpg" alt="a small kite">'
    with open(tmp_path / "big.warc", "wb") as handle:
        for uri, block in (("http://a.example/big", big), ("http://a.example/small", small)):
            handle.write(b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: %s\r\n"
                         b"Content-Type: application/http; msgtype=response\r\nContent-Length: %d\r\n\r\n"
                         % (uri.encode(), len(block)) + block + b"\r\n\r\n")
    del big
    tracemalloc.start()
    try:
        pairs, stats = crawl_file(tmp_path / "big.warc", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12_000_000, f"peak {peak / 1e6:.1f} MB while skipping a 44 MB record"
    assert stats.reasons == {"page_too_large": 1} and [p[2] for p in pairs] == ["a small kite"]


def test_a_wat_file_gives_pairs_from_its_link_metadata(tmp_path):
    def envelope(uri: str, links: list[dict], base: str | None = None) -> bytes:
        head = {"Title": "t", **({"Base": base} if base else {})}
        return json.dumps({"Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": uri},
            "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Head": head, "Links": links}}}}}).encode()

    with open(tmp_path / "links.wat.gz", "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for body in (
            envelope("http://w.example/a/page.html", [{"path": "IMG@/src", "url": "x.jpg", "alt": "a grey heron"},
                                                      {"path": "IMG@/src", "url": "y.jpg", "alt": "logo"}]),
            envelope("http://w.example/b.html", [{"path": "IMG@/src", "url": "z.jpg", "alt": "an egret"}], "/img/"),
            b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Type": "warcinfo"}}}',
            b"{not json",
        ):
            writer.write_record(writer.create_warc_record("http://w.example/", "metadata", payload=io.BytesIO(body),
                                                          warc_content_type="application/json"))
    pairs, stats = crawl_file(tmp_path / "links.wat.gz", tmp_path)
    assert pairs == {("/a/page.html", "/a/x.jpg", "a grey heron", "alt"), ("/b.html", "/img/z.jpg", "an egret", "alt")}
    assert stats.reasons == {"alt_meaningless": 1, "warc_malformed": 1} and stats.records == 4


def test_cli_resumes_by_file_and_ingest_downloads_the_result(small_corpus, demo_warc, tmp_path):
    from ingest.config import IngestConfig
    from ingest.run import run_ingest

    corpus_dir, _ = small_corpus
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.warc.gz").write_bytes(demo_warc.read_bytes())
    (tmp_path / "in" / "b.warc").write_bytes(b"not a warc\r\n")
    (tmp_path / "in" / "notes.txt").write_text("not an archive: ignored")
    out = tmp_path / "urls"
    argv = ["--warc", str(tmp_path / "in"), "--output_folder", str(out), "--distributor", "inline",
            "--progress", "false"]
    assert crawl_main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_crawl_stats.json", "warc-00000.parquet", "warc-00000_stats.json", "warc-00001.parquet",
                     "warc-00001_stats.json"]
    totals = json.loads((out / "_crawl_stats.json").read_text())
    expected_pairs, _ = expected_from_truth(corpus_dir)
    assert totals["pairs"] == len(expected_pairs) and totals["reasons"]["warc_malformed"] == 1
    marker = (out / "warc-00000_stats.json").read_text()
    (out / "warc-00001_stats.json").unlink()  # as if killed before the second file committed
    assert crawl_main(argv) == 0
    assert (out / "warc-00000_stats.json").read_text() == marker  # committed: skipped, not redone
    assert (out / "warc-00001_stats.json").exists()
    assert json.loads((out / "_crawl_stats.json").read_text())["pairs"] == len(expected_pairs)
    # another setting: the rerun stops and says what differs (issue 22; committed units were redone silently)
    assert crawl_main([*argv, "--max_page_bytes", "3000000"]) == 2
    assert (out / "warc-00000_stats.json").read_text() == marker
    assert crawl_main([*argv, "--max_page_bytes", "3000000", "--incremental_mode", "overwrite"]) == 0
    redone = json.loads((out / "_crawl_stats.json").read_text())
    assert (out / "warc-00000_stats.json").read_text() != marker and "page_too_large" not in redone["reasons"]
    assert crawl_main([*argv, "--incremental_mode", "overwrite"]) == 0  # and back, for the ingest below

    pool = tmp_path / "pool"
    cfg = from_dict(IngestConfig, {
        "url_list": str(out), "input_format": "parquet", "url_col": "url", "caption_col": "caption",
        "save_additional_columns": ["page_url", "caption_source"], "output_folder": str(pool),
        "distributor": "inline", "allow_networks": ["127.0.0.1/32"], "image_size": 32, "progress": False,
        "thread_count": 16, "per_host_limit": 16})
    summary = run_ingest(cfg)
    assert summary.count == len(expected_pairs) and summary.successes == summary.count
    rows = pq.read_table(str(pool / "00000.parquet")).to_pylist()
    assert {r["caption_source"] for r in rows} == {"alt", "figcaption"}
    assert all(r["page_url"].endswith(".html") and r["status"] == "success" for r in rows)


def test_archives_and_output_on_s3(s3_env, demo_warc, small_corpus):
    corpus_dir, _ = small_corpus
    with storage.atomic_write("s3://webclip/crawl-in/pages.warc.gz") as handle:
        handle.write(demo_warc.read_bytes())
    assert crawl_main(["--warc", "s3://webclip/crawl-in/", "--output_folder", "s3://webclip/crawl-out",
                       "--distributor", "inline", "--progress", "false"]) == 0
    stats = storage.read_json("s3://webclip/crawl-out/_crawl_stats.json")
    with storage.open_file("s3://webclip/crawl-out/warc-00000.parquet") as handle:
        table = pq.read_table(handle)
    assert table.num_rows == stats["pairs"] == len(expected_from_truth(corpus_dir)[0])
    assert table.column_names == ["url", "caption", "page_url", "caption_source"]


@pytest.mark.parametrize("rows_per_group", [3, 10, 50_000])
def test_pair_parts_hold_every_pair_in_order_a_row_group_at_a_time(tmp_path, rows_per_group):
    from crawl.extract import Pair

    writer = PairWriter(str(tmp_path / "part.parquet"), rows_per_group=rows_per_group)
    expected = []
    for page in range(40):
        pairs = [Pair(f"https://x.example/{page}/{k}.jpg", f"a caption {page} {k} é", "alt") for k in range(page % 4)]
        writer.add(f"https://x.example/{page}.html", pairs)
        expected += [(p.url, p.caption, f"https://x.example/{page}.html", p.caption_source) for p in pairs]
    writer.close()
    part = pq.ParquetFile(tmp_path / "part.parquet")
    table = part.read()
    assert list(zip(*(table.column(c).to_pylist() for c in ("url", "caption", "page_url", "caption_source")))) == expected
    sizes = [part.metadata.row_group(i).num_rows for i in range(part.metadata.num_row_groups)]
    assert sum(sizes) == len(expected) == writer.rows
    assert all(size >= min(rows_per_group, len(expected)) for size in sizes[:-1]) and len(sizes) <= -(-len(expected) // rows_per_group)
