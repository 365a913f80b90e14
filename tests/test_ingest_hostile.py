"""Hostile input and the safety rules, end to end through ingest and real sockets.

One ingest run (inline) reads a JSON-lines list full of bad rows and downloads from
two real servers: one on 127.0.0.1 (allowed with --allow_networks 127.0.0.1/32) and
one on 127.0.0.2 (loopback too, but not allowed). Every bad row must end as exactly
one pool row with the right reason, the good rows around them must succeed, and the
second server's access log must prove it was never contacted — not directly, not
through a redirect. No request leaves 127.0.0.0/8: the private and metadata
addresses in the list are refused before any connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pyarrow.parquet as pq
import pytest

from _ingest_web import HostileWeb, jpeg_bytes
from core import storage
from core.reasons import Reason
from ingest.config import IngestConfig
from ingest.fetcher import FetchConfig, Fetcher
from ingest.run import run_ingest
from ingest.safety import NetworkPolicy

TOKEN = "tester@example.org"
NOT_UTF8 = b"caf\xe9 au lait \xff"  # latin-1 bytes in a UTF-8 file


def hostile_rows(a: str, b: str) -> list[tuple[bytes, str | None]]:
    """(raw JSON line, expected reason) — raw bytes, so a line may hold invalid UTF-8."""

    def line(url, caption="a caption", license="cc0") -> bytes:
        return json.dumps({"url": url, "caption": caption, "license": license}).encode()

    return [
        (line(f"{a}/img/g0.jpg"), None),
        (line(f"{a}/png/p1"), None),  # application/octet-stream, but an image
        (line(f"{a}/redirect?to=/img/g2.jpg"), None),
        (line(None), "invalid_url"),  # null URL column
        (line(f"{a}/img/g4.jpg", caption=None), "caption_missing"),  # null caption: rejected before download
        (line(f"{a}/img/g5.jpg", caption=""), "caption_missing"),  # empty caption: likewise
        (b'{"url": "' + f"{a}/img/g6.jpg".encode() + b'", "caption": "' + NOT_UTF8 + b'"}', "caption_not_utf8"),
        (line("file:///etc/passwd"), "unsupported_scheme"),
        (line("ftp://127.0.0.1/x.jpg"), "unsupported_scheme"),
        (line("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"),
         "unsupported_scheme"),
        (line("http://[::1"), "invalid_url"),
        (line("not a url at all"), "invalid_url"),
        (line("http://127.0.0.1:99999/x.jpg"), "invalid_url"),
        (line(f"{a}/bomb.png"), "too_many_pixels"),
        (line(f"{a}/bomb.jpg"), "too_many_pixels"),
        (line(f"{a}/endless"), "too_large"),
        (line(f"{a}/endless_slow"), "timeout"),
        (line(f"{a}/drip"), "timeout"),
        (line(f"{a}/html"), "not_image"),
        (line(f"{a}/mislabelled.jpg"), "decode_error"),
        (line(f"{a}/cut_body.jpg"), "truncated"),
        (line(f"{a}/half_image.jpg"), "decode_error"),
        (line(f"{a}/corrupt.jpg"), "decode_error"),
        (line(f"{a}/loop"), "too_many_redirects"),
        (line(f"{b}/img/direct.jpg"), "ssrf_blocked"),  # loopback, outside 127.0.0.1/32
        (line(f"{a}/redirect?to={b}/img/via_redirect.jpg"), "ssrf_blocked"),
        (line("http://169.254.169.254/latest/meta-data/"), "ssrf_blocked"),  # cloud metadata
        (line("http://10.0.0.1/x.jpg"), "ssrf_blocked"),
        (line("http://[fd00:ec2::254]/latest/"), "ssrf_blocked"),
        (line(f"{a}/status/404"), "http_404"),
        (b"this line is not JSON", "invalid_url"),
        (b"[1, 2]", "invalid_url"),
        (b'{"url": "' + f"{a}/img/\xff".encode("latin-1") + b'", "caption": "x"}', "invalid_url"),
        (line(f"{a}/img/g33.jpg", license=None), None),
    ]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with HostileWeb("127.0.0.1") as allowed, HostileWeb("127.0.0.2") as refused:
        rows = hostile_rows(allowed.base, refused.base)
        (tmp / "urls.jsonl").write_bytes(b"\n".join(line for line, _ in rows) + b"\n")
        cfg = IngestConfig(
            url_list=str(tmp / "urls.jsonl"), input_format="jsonl", caption_col="caption",
            save_additional_columns=["license"], output_folder=str(tmp / "pool"), image_size=32,
            number_sample_per_shard=10, distributor="inline", thread_count=16, timeout=1.0, max_bytes=200_000,
            allow_networks=["127.0.0.1/32"], user_agent_token=TOKEN, compute_hash="md5", progress=False,
        )
        summary = run_ingest(cfg)
        refused_log_during_run = list(refused.log)
        yield {"rows": rows, "allowed": allowed, "refused": refused, "refused_log": refused_log_during_run,
               "pool": str(tmp / "pool"), "summary": summary, "a": allowed.base, "b": refused.base}


def pool_rows(folder: str) -> list[dict]:
    rows = []
    for path in storage.list_files(folder, ".parquet"):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def test_every_bad_row_is_one_row_with_its_reason(hostile_run):
    expected = [reason for _, reason in hostile_run["rows"]]
    pool = pool_rows(hostile_run["pool"])
    assert len(pool) == len(expected) and len({r["key"] for r in pool}) == len(expected)
    got = [r["reason"] for r in pool]
    wrong = [(i, e, g, pool[i]["error_message"]) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    assert not wrong, wrong
    for row, reason in zip(pool, expected):
        if reason is None:
            assert row["status"] == "success"
        else:
            assert row["status"] == Reason(reason).pool_status
    assert hostile_run["summary"].count == len(expected)
    assert hostile_run["summary"].successes == expected.count(None)


def test_bad_text_is_kept_readable_and_flagged(hostile_run):
    pool = pool_rows(hostile_run["pool"])
    assert pool[6]["caption"] == "caf\ufffd au lait \ufffd"
    assert pool[4]["caption"] is None and pool[5]["caption"] == ""
    assert pool[33]["license"] is None and pool[0]["license"] == "cc0"
    # Not fetched: the rows were decided before any request.
    assert not any(f"/img/g{n}.jpg" in path for n in (4, 5, 6) for path in hostile_run["allowed"].paths())


def test_per_sample_metadata(hostile_run):
    a = hostile_run["a"]
    pool = pool_rows(hostile_run["pool"])
    first, png, redirected = pool[0], pool[1], pool[2]
    assert first["content_type"] == "image/jpeg" and first["final_url"] == first["url"]
    assert png["content_type"] == "application/octet-stream"
    assert redirected["final_url"] == f"{a}/img/g2.jpg" and redirected["url"] != redirected["final_url"]
    data = jpeg_bytes("g0")
    assert first["sha256"] == hashlib.sha256(data).hexdigest()
    assert first["md5"] == hashlib.md5(data).hexdigest()  # --compute_hash md5: img2dataset's column
    assert (first["original_width"], first["original_height"]) == (96, 64)
    assert (first["width"], first["height"]) == (32, 32) and len(first["phash"]) == 16


def test_refused_server_was_never_contacted(hostile_run):
    assert hostile_run["refused_log"] == []
    # The allowed server saw the redirect that pointed at the refused one, and no hop after it.
    paths = hostile_run["allowed"].paths()
    assert any(p.startswith("/redirect?to=http://127.0.0.2") for p in paths)
    assert not any("via_redirect" in p and not p.startswith("/redirect") for p in paths)


def test_refused_server_log_does_record_requests():
    """Control: the same server, once allowed, does log a request (so an empty log means something)."""
    with HostileWeb("127.0.0.2") as server:
        async def fetch():
            async with Fetcher(FetchConfig(timeout=5), NetworkPolicy.from_cidrs(["127.0.0.2/32"])) as fetcher:
                return await fetcher.fetch(server.base + "/img/x.jpg")
        assert asyncio.run(fetch()).http_status == 200
        assert server.paths() == ["/img/x.jpg"]


def test_user_agent_names_the_project_and_the_operator(hostile_run):
    agents = {entry["user_agent"] for entry in hostile_run["allowed"].log}
    assert agents and all(agent.startswith("webclip/") and agent.endswith(TOKEN) for agent in agents)


def test_pool_stats_count_every_reason(hostile_run):
    stats = [storage.read_json(p) for p in storage.list_files(hostile_run["pool"], "_stats.json")]
    reasons: dict[str, int] = {}
    for s in stats:
        for reason, n in s["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    expected: dict[str, int] = {}
    for _, reason in hostile_run["rows"]:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert reasons == expected
