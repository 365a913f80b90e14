"""The report's numbers, against counts made here directly from the parquet rows."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.reasons import Reason, reason_from_message
from shards.config import ReportConfig
from shards.page import SEARCH_URL
from shards.report import build_report, write_report
from shards.report import main as report_main
from tests._shards_fixtures import make_pool, make_report, make_train_shards

BEFORE = {"dup_url", "caption_short"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec = make_pool(str(root), shards=5, rows_per_shard=80, seed=11)
    make_train_shards(spec, str(root / "train"), samples_per_shard=25)
    report = make_report(spec, str(root / "train"), workers=2)
    return spec, root, report


def _rank_value(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_funnel_and_reasons_match_the_rows(built):
    spec, _, report = built
    rows, decided = spec.rows, {d["key"]: d for d in spec.decided}
    funnel = {s["step"]: s for s in report["funnel"]}
    assert funnel["input_rows"]["count"] == len(rows)
    assert funnel["unique"]["count"] == sum(r["reason"] != "dup_url" for r in rows)
    attempted = [r for r in rows if r["reason"] not in BEFORE]
    assert funnel["attempted"]["count"] == len(attempted)
    downloaded = [r for r in rows if r["status"] == "success"]
    assert funnel["downloaded"]["count"] == len(downloaded)
    kept = [r for r in downloaded if decided[r["key"]]["keep"]]
    assert funnel["kept"]["count"] == len(kept)
    assert funnel["in_train_shards"]["count"] == len(kept)
    assert funnel["unique"]["dropped"] == {"dup_url": sum(r["reason"] == "dup_url" for r in rows)}
    assert funnel["attempted"]["dropped"] == {"caption_short": sum(r["reason"] == "caption_short" for r in rows)}
    failures = Counter(r["reason"] for r in attempted if r["status"] != "success")
    assert report["failures"] == dict(failures) and funnel["downloaded"]["dropped"] == dict(failures)
    rejections = Counter(decided[r["key"]]["reason"] for r in downloaded if not decided[r["key"]]["keep"])
    assert report["filter_rejections"] == dict(rejections)
    for code in {*failures, *rejections}:
        assert report["reasons"][code]["description"] == Reason(code).description


def test_domains_languages_and_duplicates_match(built):
    spec, _, report = built
    decided = {d["key"]: d for d in spec.decided}
    per = defaultdict(Counter)
    for r in spec.rows:
        host = r["url"].split("/")[2]
        per[host]["rows"] += 1
        per[host]["attempted"] += r["reason"] not in BEFORE
        per[host]["downloaded"] += r["status"] == "success"
        per[host]["kept"] += r["status"] == "success" and decided[r["key"]]["keep"]
        per[host]["opt_out"] += r["reason"] == "opt_out"
    top = {d["domain"]: d for d in report["domains"]["top"]}
    assert set(top) == set(per) and report["domains"]["distinct"] == len(per) and report["domains"]["exact"]
    for host, counts in per.items():
        for column in ("rows", "attempted", "downloaded", "kept", "opt_out"):
            assert top[host][column] == counts[column], (host, column)
        assert top[host]["success_rate"] == pytest.approx(counts["downloaded"] / counts["attempted"], abs=1e-4)
    assert [d["rows"] for d in report["domains"]["top"]] == sorted((c["rows"] for c in per.values()), reverse=True)
    kept_languages = Counter(d["language"] for d in spec.decided if d["keep"])
    assert report["languages"]["kept"] == dict(kept_languages)
    clusters = Counter(d["dup_of"] for d in spec.decided if d["reason"] == "dup_near")
    sizes = Counter(n + 1 for n in clusters.values())
    assert report["near_duplicates"]["sizes"] == {str(s): c for s, c in sizes.items()}
    assert report["near_duplicates"]["clusters"] == len(clusters)
    assert report["opt_out"]["rows"] == sum(r["reason"] == "opt_out" for r in spec.rows)
    assert report["opt_out"]["by_directive"] == {"X-Robots-Tag: noai": report["opt_out"]["rows"]}


def test_distributions_match_the_rows(built):
    spec, _, report = built
    decided = {d["key"]: d for d in spec.decided}
    kept = [r for r in spec.rows if r["status"] == "success" and decided[r["key"]]["keep"]]
    dists = report["distributions"]
    for name, column in (("width", "original_width"), ("height", "original_height")):
        q = dists[name]["quantiles"]["kept"]
        values = [r[column] for r in kept]
        assert q["count"] == len(values)
        assert (q["min"], q["median"], q["p90"], q["max"]) == tuple(
            _rank_value(values, p) for p in (0, 0.5, 0.9, 1.0))  # exact: integer bins
    words = [len(r["caption"].split()) for r in kept]
    assert dists["caption_words"]["quantiles"]["kept"]["median"] == _rank_value(words, 0.5)
    sizes = [r["download_bytes"] for r in kept]
    assert dists["file_size"]["quantiles"]["kept"]["median"] == pytest.approx(_rank_value(sizes, 0.5), rel=0.025)
    scores = [decided[r["key"]]["clip_score"] for r in kept]
    assert dists["clip_score"]["quantiles"]["kept"]["median"] == pytest.approx(_rank_value(scores, 0.5), abs=0.006)
    plot = dists["width"]["plot"]
    assert sum(plot["series"]["kept"]) == len(kept)  # the plot's bars add up to the samples
    assert len(plot["edges"]) == len(plot["series"]["kept"]) + 1


def test_per_shard_rows_and_train_shards(built):
    spec, root, report = built
    by_shard = defaultdict(list)
    for r in spec.rows:
        by_shard[r["key"][:5]].append(r)
    assert [s["shard"] for s in report["pool_shards"]] == sorted(by_shard)
    for row in report["pool_shards"]:
        rows = by_shard[row["shard"]]
        assert row["rows"] == len(rows)
        assert row["downloaded"] == sum(r["status"] == "success" for r in rows)
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    assert [s["sha256"] for s in report["train_shards"]["shards"]] == [e["sha256"] for e in manifest["shards"]]


def test_outputs_are_written_and_the_datasheet_marks_what_is_unknown(built, tmp_path):
    _, root, report = built
    paths = write_report(str(tmp_path / "out"), report)
    page = Path(paths["html"]).read_text()
    # No external resource: the only URLs are the SVG namespace and the search page's local address (a link).
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "").replace(
        SEARCH_URL, "")
    assert "<svg" in page and 'id="pool-shards"' in page
    sheet = Path(paths["datasheet"]).read_text()
    for section in ("## Motivation", "## Composition", "## Collection process",
                    "## Preprocessing, cleaning, labeling", "## Uses", "## Distribution", "## Maintenance"):
        assert section in sheet
    assert sheet.count("Not known to the pipeline") >= 8
    assert f"{report['funnel'][-1]['count']:,} in the final set" in sheet
    assert json.loads(Path(paths["json"]).read_text())["funnel"] == report["funnel"]


def test_an_img2dataset_folder_is_reported(tmp_path):
    """img2dataset's layout: error_message text, no reason, no download size, no decisions."""
    folder = tmp_path / "i2d"
    folder.mkdir()
    messages = ["HTTP Error 404: Not Found", "<urlopen error [Errno 111] Connection refused>", "timed out",
                "image too small", "cannot identify image file <_io.BytesIO object at 0x7f3>", "something new"]
    rows = []
    for shard in range(2):
        table_rows = []
        for i in range(30):
            key = f"{shard:05d}{i:04d}"
            message = messages[(i // 3) % len(messages)] if i % 3 == 0 else None
            table_rows.append({"caption": f"caption {i}", "url": f"http://h{i % 4}.example/{i}.jpg", "key": key,
                               "status": "failed_to_download" if message else "success", "error_message": message,
                               "width": None if message else 256, "height": None if message else 256,
                               "original_width": None if message else 300 + i, "original_height": None if message else 200,
                               "exif": None, "sha256": None})
        schema = pa.schema([("caption", pa.string()), ("url", pa.string()), ("key", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                            ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                            ("exif", pa.string()), ("sha256", pa.string())])
        pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), folder / f"{shard:05d}.parquet")
        successes = sum(r["status"] == "success" for r in table_rows)
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": 30, "successes": successes, "failed_to_download": 30 - successes, "failed_to_resize": 0,
             "duration": 2.0, "start_time": 1.7e9, "end_time": 1.7e9 + 2, "status_dict": {}}))
        rows += table_rows
    out = tmp_path / "report"
    assert report_main(["--pool", str(folder), "--output_folder", str(out), "--progress", "false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["layout"] == "img2dataset"
    funnel = {s["step"]: s["count"] for s in report["funnel"]}
    assert funnel == {"input_rows": 60, "unique": 60, "attempted": 60, "downloaded": 40, "kept": 40}
    expected = Counter((r.value if (r := reason_from_message(m["error_message"])) else "unclassified")
                       for m in rows if m["error_message"])
    assert report["failures"] == dict(expected)
    assert expected["unclassified"] == 2 and report["unclassified_messages"] == {"something new": 2}
    assert {"http_404", "connection_error", "timeout", "too_small", "decode_error"} <= set(report["failures"])
    assert report["distributions"]["file_size"]["recorded"] is False  # img2dataset stores no size: said so
    assert report["distributions"]["width"]["quantiles"]["kept"]["count"] == 40
    assert report["filter_rejections"] is None and report["languages"] is None
    assert (out / "index.html").exists() and "img2dataset" in (out / "datasheet.md").read_text()


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no committed shards"):
        build_report(ReportConfig(pool=str(tmp_path), output_folder=str(tmp_path / "o"), progress=False))


def test_report_and_verify_run_on_ray_with_the_same_results(built):
    """The same numbers from Ray tasks as from local processes (a big pool is read by many machines)."""
    import ray

    from core.executor import init_ray
    from shards.config import VerifyConfig
    from shards.verify import verify

    spec, root, report = built
    started = init_ray(None, 2)  # one local instance for both
    try:
        on_ray = build_report(ReportConfig(pool=spec.pool, decisions=spec.decisions, train=str(root / "train"),
                                           output_folder="/unused", distributor="ray", workers=2, progress=False))
        checked = verify(VerifyConfig(folder=str(root / "train"), distributor="ray", progress=False))
    finally:
        if started:
            ray.shutdown()
    varying = ("generated_at", "duration_s", "datasheet")  # the datasheet: from the same numbers, dated
    assert {k: v for k, v in on_ray.items() if k not in varying} == \
        {k: v for k, v in report.items() if k not in varying}
    assert checked["ok"] and checked["samples"] == report["funnel"][-1]["count"]
