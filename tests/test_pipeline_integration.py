"""The whole data path against the real local stack, checked row by row.

A small demo corpus is served by the real HTTP server on 127.0.0.1; ingest runs on a
real local Ray instance and writes to a real S3-compatible server on loopback; filter
and shards read and write there too. Every count is checked against the generator's
ground truth: each input row ends as exactly one parquet row with a status, each
success is in exactly one tar, and the reasons are the planted ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import INGEST_TIMEOUT_S, SMALL_CORPUS_ROWS
from core import storage
from core.layout import STATS_SUFFIX
from filter.config import FilterConfig
from filter.run import run_filter
from infra.local import scenes
from infra.local.corpus import load_ground_truth
from ingest.config import IngestConfig
from ingest.run import run_ingest
from shards.config import ReportConfig, ShardsConfig, VerifyConfig
from shards.report import build_report
from shards.verify import verify
from shards.reshard import reshard

ROWS_PER_SHARD = 100

pytestmark = pytest.mark.integration


def ingest_config(corpus_dir, output_folder, **overrides) -> IngestConfig:
    values = dict(
        url_list=str(corpus_dir / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
        output_folder=output_folder, image_size=64, number_sample_per_shard=ROWS_PER_SHARD, workers=2,
        thread_count=32, per_host_limit=32, timeout=INGEST_TIMEOUT_S, allow_networks=["127.0.0.1/32"],
        progress=False, distributor="ray",
    )
    values.update(overrides)
    return IngestConfig(**values)


def read_pool(folder: str) -> list[dict]:
    rows = []
    for path in storage.list_files(folder, ".parquet"):
        with storage.open_file(path) as handle:
            rows += pq.read_table(handle).to_pylist()
    return rows


def tar_members(folder: str) -> Counter:
    names = Counter()
    for path in storage.list_files(folder, ".tar"):
        with storage.open_file(path) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            names.update(member.name for member in tar)
    return names


def row_index(key: str) -> int:
    return int(key[:5]) * ROWS_PER_SHARD + int(key[5:])


@pytest.fixture(scope="module")
def s3_pipeline(small_corpus, s3_env):
    """ingest (Ray) → filter → shards, all on s3://webclip/…; returns the paths."""
    corpus_dir, _ = small_corpus
    paths = {"pool": "s3://webclip/pool", "decisions": "s3://webclip/decisions", "train": "s3://webclip/train"}
    summary = run_ingest(ingest_config(corpus_dir, paths["pool"]))
    run_filter(FilterConfig(pool=paths["pool"], output_folder=paths["decisions"], progress=False))
    manifest = reshard(ShardsConfig(pool=paths["pool"], decisions=paths["decisions"],
                                    output_folder=paths["train"], samples_per_shard=64, distributor="ray",
                                    progress=False))
    return {**paths, "summary": summary, "manifest": manifest}


def test_every_input_row_is_one_pool_row_with_the_planted_outcome(small_corpus, s3_pipeline):
    corpus_dir, _ = small_corpus
    truth = load_ground_truth(corpus_dir).to_pylist()
    pool = read_pool(s3_pipeline["pool"])
    assert len(pool) == SMALL_CORPUS_ROWS
    assert len({r["key"] for r in pool}) == SMALL_CORPUS_ROWS
    by_row = {row_index(r["key"]): r for r in pool}
    assert sorted(by_row) == list(range(SMALL_CORPUS_ROWS))
    mismatches = []
    for expected in truth:
        got = by_row[expected["row"]]
        assert got["url"] == expected["url"] and got["caption"] == expected["caption"]
        assert got["status"] in ("success", "failed_to_download", "failed_to_resize")
        if got["reason"] != expected["expected_ingest_reason"]:
            mismatches.append((expected["row"], expected["kind"], expected["expected_ingest_reason"], got["reason"],
                               got["error_message"]))
    assert not mismatches, mismatches[:10]
    # Every planted failure kind really occurred (the corpus is big enough to hold each).
    reasons = Counter(r["reason"] for r in pool if r["reason"])
    for reason in ("http_404", "http_5xx", "timeout", "truncated", "not_image", "decode_error", "opt_out",
                   "too_many_redirects", "ssrf_blocked"):
        assert reasons[reason] > 0, f"no {reason} in {reasons}"


def test_every_success_is_in_exactly_one_tar(s3_pipeline):
    pool = read_pool(s3_pipeline["pool"])
    members = tar_members(s3_pipeline["pool"])
    successes = {r["key"] for r in pool if r["status"] == "success"}
    assert all(count == 1 for count in members.values())
    assert {name.split(".")[0] for name in members} == successes
    for key in successes:
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= members.keys()
    stats = [storage.read_json(p) for p in storage.list_files(s3_pipeline["pool"], STATS_SUFFIX)]
    assert sum(s["count"] for s in stats) == SMALL_CORPUS_ROWS
    assert sum(s["successes"] for s in stats) == len(successes)
    for s in stats:  # img2dataset's keys are all there
        assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                "end_time", "status_dict"} <= s.keys()


def test_filter_decisions_match_the_ground_truth(small_corpus, s3_pipeline):
    corpus_dir, _ = small_corpus
    truth = {t["row"]: t for t in load_ground_truth(corpus_dir).to_pylist()}
    decisions = read_pool(s3_pipeline["decisions"])
    assert len(decisions) == SMALL_CORPUS_ROWS
    # Near duplicates are found by pHash, not by bytes: graded by recall and precision below.
    wrong = [(t["row"], t["kind"], t["expected_filter_reason"], d["reason"])
             for d in decisions if (t := truth[row_index(d["key"])])["expected_filter_reason"] != d["reason"]
             and "dup_near" not in (t["kind"], d["reason"])]
    assert not wrong, wrong[:10]
    assert all(d["keep"] == (d["reason"] is None) for d in decisions)


def test_near_duplicates_are_found_against_the_ground_truth(small_corpus, s3_pipeline):
    from infra.local.truth import grade_near_duplicates

    corpus_dir, _ = small_corpus
    grade = grade_near_duplicates(s3_pipeline["decisions"], str(corpus_dir))
    assert grade.planted >= 10, grade  # the small corpus plants about 5% near duplicates
    assert grade.recall >= 0.9 and grade.precision >= 0.95, grade.as_dict()


def test_train_shards_hold_exactly_the_kept_samples(small_corpus, s3_pipeline):
    corpus_dir, _ = small_corpus
    kept = {d["key"] for d in read_pool(s3_pipeline["decisions"]) if d["keep"]}
    manifest = s3_pipeline["manifest"]
    assert manifest["total_samples"] == len(kept)
    assert storage.read_json(storage.join(s3_pipeline["train"], "manifest.json"))["total_samples"] == len(kept)
    keys = Counter()
    for entry in manifest["shards"]:
        path = storage.join(s3_pipeline["train"], entry["name"])
        with storage.open_file(path) as handle:
            data = handle.read()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
            jsons = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
        assert len(jsons) == entry["count"]
        keys.update(j["key"] for j in jsons)
    assert set(keys) == kept and max(keys.values()) == 1
    # No held-out pair reached the training data, by the ground truth of every kept row.
    truth = {t["row"]: t for t in load_ground_truth(corpus_dir).to_pylist()}
    for key in kept:
        t = truth[row_index(key)]
        assert (t["image_colour"], t["image_shape"]) not in scenes.HELD_OUT_PAIRS
        assert (t["caption_colour"], t["caption_shape"]) not in scenes.HELD_OUT_PAIRS


def test_report_agrees_with_the_parquet_files(s3_pipeline):
    report = build_report(ReportConfig(pool=s3_pipeline["pool"], decisions=s3_pipeline["decisions"],
                                       train=s3_pipeline["train"], output_folder="s3://webclip/report",
                                       workers=2, progress=False))
    pool = read_pool(s3_pipeline["pool"])
    decisions = {d["key"]: d for d in read_pool(s3_pipeline["decisions"])}
    funnel = {step["step"]: step["count"] for step in report["funnel"]}
    assert funnel["input_rows"] == len(pool)
    assert funnel["downloaded"] == sum(r["status"] == "success" for r in pool)
    assert funnel["kept"] == sum(d["keep"] for d in decisions.values())
    assert funnel["in_train_shards"] == s3_pipeline["manifest"]["total_samples"]
    failures = Counter(r["reason"] for r in pool if r["reason"] and r["reason"] not in ("dup_url", "caption_short",
                       "caption_missing", "caption_boilerplate", "caption_not_utf8"))
    assert report["failures"] == dict(failures)
    assert report["filter_rejections"] == dict(
        Counter(decisions[r["key"]]["reason"] for r in pool if r["status"] == "success" and decisions[r["key"]]["reason"])
    )


def test_manifest_fingerprints_the_url_list_behind_the_pool(small_corpus, s3_pipeline):
    corpus_dir, _ = small_corpus
    lists = s3_pipeline["manifest"]["inputs"]["input_lists"]
    url_list = ingest_config(corpus_dir, "unused").url_list
    assert [entry["path"] for entry in lists] == [url_list]
    assert lists[0]["sha256"] == hashlib.sha256(Path(url_list).read_bytes()).hexdigest()
    assert s3_pipeline["manifest"]["inputs"]["decisions"]["filter_config"]["pool"] == s3_pipeline["pool"]


def test_train_shards_on_s3_verify_clean(s3_pipeline):
    result = verify(VerifyConfig(folder=s3_pipeline["train"], workers=2, progress=False))
    assert result["ok"], result["findings"]
    assert result["samples"] == s3_pipeline["manifest"]["total_samples"]
    pool = verify(VerifyConfig(folder=s3_pipeline["pool"], workers=1, progress=False))
    assert pool["ok"], pool["findings"]


def test_local_inline_run_gives_the_same_bytes_and_resumes(small_corpus, s3_pipeline, tmp_path):
    """Same input, other storage and distributor: identical shards. A lost shard is redone alone."""
    corpus_dir, _ = small_corpus
    local = tmp_path / "pool"
    run_ingest(ingest_config(corpus_dir, str(local), distributor="inline"))
    for name in ("00000.tar", "00001.parquet", "00003.tar"):
        with storage.open_file(storage.join(s3_pipeline["pool"], name)) as handle:
            assert handle.read() == (local / name).read_bytes(), name
    # Simulate a crash while shard 2 was being written: no marker, a partial tar.
    (local / f"00002{STATS_SUFFIX}").unlink()
    (local / "00002.tar").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in local.iterdir() if p.name.startswith("00001")}
    summary = run_ingest(ingest_config(corpus_dir, str(local), distributor="inline"))
    assert summary.shards_skipped == SMALL_CORPUS_ROWS // ROWS_PER_SHARD - 1
    assert summary.count == SMALL_CORPUS_ROWS
    with storage.open_file(storage.join(s3_pipeline["pool"], "00002.tar")) as handle:
        assert handle.read() == (local / "00002.tar").read_bytes()
    assert before == {p.name: p.stat().st_mtime_ns for p in local.iterdir() if p.name.startswith("00001")}
