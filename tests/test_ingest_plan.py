"""Rejections before download: URL normalisation, (URL, caption) dedupe across the job, junk captions.

Unit tests pin the rules (``core.urls``, ``core.captions``, ``ingest.plan``); the
end-to-end tests run ingest against real servers on loopback and read their access
logs, which prove what the planner promises: a rejected row is one pool row with its
reason and is never requested — across input files, shards, and a resumed run.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _ingest_web import HostileWeb
from conftest import INGEST_TIMEOUT_S
from core.executor import Execution, Executor
from core.captions import caption_reason, is_boilerplate, word_count
from core.layout import STATS_SUFFIX
from core.reasons import Reason, Stage
from core.urls import normalize_url, normalize_url_by_urlsplit
from infra.local.corpus import JUNK_CAPTIONS, load_ground_truth
from infra.local.webserver import serve
from ingest.config import IngestConfig
from ingest import dedupe
from ingest.dedupe import plan_duplicates
from ingest.plan import DUPLICATE_DETAIL, Planner, PlanRules, eligible_rows, fingerprint
from ingest.reader import ShardInput
from ingest.run import run_ingest

STRICT = dict(dedupe_url_caption=False, min_caption_chars=0, min_caption_words=0, reject_boilerplate_captions=False)

# -- core.urls ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, normal",
    [
        ("HTTP://Example.COM/a/B.jpg", "http://example.com/a/B.jpg"),  # path keeps its case
        ("http://example.com:80/x", "http://example.com/x"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("http://example.com:443/x", "http://example.com:443/x"),  # not http's default
        ("http://example.com:0080/x", "http://example.com/x"),
        ("http://example.com:/x", "http://example.com/x"),
        ("http://example.com/x.jpg#gallery", "http://example.com/x.jpg"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com?a=1", "http://example.com/?a=1"),
        ("http://example.com/x?", "http://example.com/x"),
        ("http://example.com/%7euser/a%2fb%20c", "http://example.com/~user/a%2Fb%20c"),
        ("http://example.com/%41%5a%30%2D%2e%5F%7E", "http://example.com/AZ0-._~"),
        ("http://example.com/x?q=%e2%82%ac&r=%61", "http://example.com/x?q=%E2%82%AC&r=a"),
        ("http://example.com/100%", "http://example.com/100%"),  # not an escape: kept
        ("  http://example.com/x \n", "http://example.com/x"),
        ("http://[2001:DB8::1]:8080/x", "http://[2001:db8::1]:8080/x"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://User:PassWord@Example.com:80/x", "http://User:PassWord@example.com/x"),
        ("http://example.com/a?b=C&a=B", "http://example.com/a?b=C&a=B"),  # query order is meaning
        ("http://example.com/a/../b/./c", "http://example.com/a/../b/./c"),  # dot segments left alone
        ("ftp://Example.com:21/x", "ftp://example.com:21/x"),
        ("not a url at all", "not a url at all"),
    ],
)
def test_normalize_url(url, normal):
    assert normalize_url(url) == normal
    assert normalize_url_by_urlsplit(url) == normal
    assert normalize_url(normal) == normal  # idempotent


@pytest.mark.parametrize("url", ["http://example.com:99999/x", "http://example.com:8o/x", "http://[::1/x"])
def test_unsplittable_urls_raise_value_error(url):
    with pytest.raises(ValueError):
        normalize_url(url)


def test_the_fast_paths_agree_with_urlsplit():
    """The regex fast paths are an optimisation: random URL soup must give urlsplit's answers."""
    rng = random.Random(5)
    pieces = list("aZ09.-_~%!$&'()*+,;=:/?#@[] \t") + [
        "%2f", "%7E", "%41", "%zz", "HTTP://", "Http://", ":80", ":443", ":8080", ":99999", ":080", "/img/",
        "é", "\x00", "\u3000", "?q=1", "www.Example.COM",
    ]
    heads = ["http://", "https://", "HTTPS://", "ftp://", "", " http://", "http://a", "https://x.y/"]
    for _ in range(30_000):
        url = rng.choice(heads) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        try:
            fast = normalize_url(url)
        except ValueError:
            fast = ValueError
        try:
            reference = normalize_url_by_urlsplit(url)
        except ValueError:
            reference = ValueError
        assert fast == reference, url


# -- core.captions ----------------------------------------------------------------------------


@pytest.mark.parametrize("caption", [None, "", " ", "\t\n", "\u00a0"])
def test_missing_captions(caption):
    assert caption_reason(caption, 5, 2) is Reason.CAPTION_MISSING
    assert caption_reason(caption, 0, 0, reject_boilerplate=False) is Reason.CAPTION_MISSING


@pytest.mark.parametrize(
    "caption",
    [
        "image", "Image", "IMAGE.", "[image]", "(untitled)", "photo", "Picture:", "untitled", "img", "thumbnail",
        "logo", "icon", "placeholder", "click here", "Click here!", "click_here", "CLICK  HERE", "download",
        "Read more »", "image not found", "No image available", "photo of", "n/a", "null", "…image…",
        "IMG_1234.JPG", "IMG_1234", "img-1234", "DSC_0001.jpg", "DSC 0001", "DSCN1234", "image001", "Image 3",
        "PXL_20230101_123456", "P1000123", "foo.png", "holiday_2019 (2).JPG", "Screenshot 2023-01-01.png",
        "photo.webp", "12345", "...", "2019-06-01", "http://example.com/a.jpg", "www.example.com",
    ],
)
def test_boilerplate_captions(caption):
    assert caption_reason(caption, 5, 2) is Reason.CAPTION_BOILERPLATE
    assert caption_reason(caption, 0, 0) is Reason.CAPTION_BOILERPLATE  # whatever the length rules


@pytest.mark.parametrize(
    "caption",
    [
        "a photo of a dog", "Image of the week: a red fox in the snow", "img 2019 trip to paris",
        "Photo 2 of 10 from the wedding", "my photo.jpg of the beach, and more", "untitled (red circle) by Jo",
        "A red circle on a grey background", "Logo of the Red Cross", "日本の風景写真です", "東京 tower",
        "word " * 40 + "end.jpg",  # too long to be a file name worth checking
    ],
)
def test_descriptions_are_not_boilerplate(caption):
    assert not is_boilerplate(caption.strip())
    assert caption_reason(caption, 5, 2) is None


def reference_is_boilerplate(caption: str) -> bool:
    """is_boilerplate as written, every regex applied: what its shortcuts must agree with."""
    from core import captions

    if len(caption) > captions.BOILERPLATE_MAX_CHARS:
        return False
    if captions._LETTER.search(caption) is None:
        return True
    if caption.rpartition(".")[2].lower() in captions.FILE_NAME_EXTENSIONS and captions._FILE_NAME.fullmatch(caption):
        return True
    if " " not in caption and caption.lower().startswith(("http://", "https://", "www.")):
        return True
    if len(caption.split()) > captions._MAX_GENERIC_WORDS:
        return False
    bare = captions._EDGE_PUNCTUATION.sub("", caption.lower())
    return (captions._SPACES.sub(" ", bare) in captions.GENERIC_CAPTIONS
            or captions._NUMBERED_NAME.fullmatch(bare) is not None)


def test_boilerplate_shortcuts_agree_with_the_plain_rule():
    import sys

    # the two facts the shortcuts stand on: [^\W_] is str.isalnum(), and whitespace but the space is unprintable
    import re
    word = re.compile(r"[^\W_]")
    assert all(bool(word.fullmatch(chr(c))) is chr(c).isalnum() for c in range(sys.maxunicode + 1))
    assert all(not chr(c).isprintable() for c in range(sys.maxunicode + 1) if chr(c).isspace() and c != 0x20)
    rng = random.Random(5)
    pieces = ["img", "IMG", "image", "dsc", "DSCN", "photo", "screen shot", "scan", "ſcan", "İmg", "K", "_", "__", "-",
              " ", "  ", "\t", "\n", "\xa0", "\xad", "0", "12", "a", ".jpg", "www.", "http://", "click", "here", "logo",
              "ı", "é", "!", "…", "»", "(", ")", "n/a", "untitled", "river stone light", "Market", ".", "²", "٣", "中"]
    for _ in range(50000):
        caption = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        assert is_boilerplate(caption) is reference_is_boilerplate(caption), caption


@pytest.mark.parametrize(
    "caption, min_chars, min_words, reason",
    [
        ("sunset", 5, 2, Reason.CAPTION_SHORT),  # one word
        ("ok", 5, 2, Reason.CAPTION_SHORT),  # two characters
        ("a cat", 5, 2, None),  # exactly at both limits
        ("a cat", 6, 2, Reason.CAPTION_SHORT),
        ("  a cat  ", 5, 2, None),  # the ends do not count
        ("red fox", 5, 3, Reason.CAPTION_SHORT),
        ("sunset", 0, 0, None),
        ("東京", 0, 2, None),  # two characters of an unspaced script: two words
        ("東", 0, 2, Reason.CAPTION_SHORT),
    ],
)
def test_short_captions(caption, min_chars, min_words, reason):
    assert caption_reason(caption, min_chars, min_words) is reason


def test_boilerplate_comes_before_short_and_can_be_switched_off():
    assert caption_reason("image", 5, 2) is Reason.CAPTION_BOILERPLATE  # not merely short
    assert caption_reason("image", 5, 2, reject_boilerplate=False) is Reason.CAPTION_SHORT
    assert caption_reason("click here", 5, 2, reject_boilerplate=False) is None
    assert word_count("東京 tower") == 3 and word_count("a b  c") == 3


def test_the_corpus_junk_captions_get_the_reasons_its_ground_truth_expects():
    defaults = IngestConfig(url_list="x", output_folder="y")
    for template, expected in JUNK_CAPTIONS.items():
        for n in (1000, 4321, 9999):
            got = caption_reason(template.format(n=n), defaults.min_caption_chars, defaults.min_caption_words,
                                 defaults.reject_boilerplate_captions)
            assert got is expected, (template, n)


def test_caption_boilerplate_is_a_filter_reason_of_a_failed_download():
    assert Reason("caption_boilerplate").stage is Stage.FILTER
    assert Reason.CAPTION_BOILERPLATE.pool_status == "failed_to_download"
    assert "file name" in Reason.CAPTION_BOILERPLATE.description


# -- the job-wide dedupe (ingest.dedupe) --------------------------------------------------------


def test_a_million_fingerprints_of_distinct_pairs_do_not_collide():
    digests = b"".join(fingerprint(f"http://host{i % 97}.example/img/{i}.jpg", f"caption {i % 1000}")
                       for i in range(1_000_000))
    values = np.frombuffer(digests, dtype="<u8")
    assert np.unique(values).size == 1_000_000


def shard(shard_id: int, rows: list[tuple[str | None, str | None]], errors=None) -> ShardInput:
    return ShardInput(shard_id, [u for u, _ in rows], [c for _, c in rows], {}, errors or {})


def plan_all(shards: list[ShardInput], folder: Path, rules: PlanRules = PlanRules(), rows_per_shard: int = 100,
             rows_per_partition: int = 1 << 23, distributor: str = "inline") -> tuple[list[ShardInput], Planner]:
    """The shards as ``ingest.run`` plans them: the dedupe passes over all, then each shard in order."""
    planner = Planner(rules)
    with Executor(Execution(distributor=distributor, workers=2, progress=False)) as executor:
        found = plan_duplicates(executor, str(folder), shards, rows_per_shard, rows_per_partition)
        return [planner.plan(s, found.rows(s)) for s in shards], planner


def brute_force_duplicates(shards: list[ShardInput]) -> list[list[int]]:
    """The rule, the plainest way: a Python set of (normalised URL, caption) in job order."""
    seen, out = set(), []
    for s in shards:
        out.append([])
        for i, (url, caption) in enumerate(zip(s.urls, s.captions)):
            if not url or url.isspace() or i in s.row_errors:
                continue
            key = (normalize_url(url), caption or "")
            if key in seen:
                out[-1].append(i)
            seen.add(key)
    return out


def random_shards(seed: int, count: int, rows_per_shard: int) -> list[ShardInput]:
    """Pairs drawn from a small pool (many repeats, within and across shards), some spelled otherwise,
    some rows without URL or flagged by the reader; the last shard short."""
    rng = random.Random(seed)
    out = []
    for shard_id in range(count):
        rows, errors = [], {}
        for i in range(rows_per_shard if shard_id < count - 1 else rows_per_shard // 3):
            n = rng.randrange(300)
            url = rng.choice([f"http://h{n % 7}.example/{n}.jpg", f"HTTP://H{n % 7}.example:80/{n}.jpg#x"])
            caption = rng.choice([f"a photo of {n % 11}", None, ""])
            if rng.random() < 0.03:
                url = rng.choice([None, "  "])
            if rng.random() < 0.03:
                errors[i] = (Reason.CAPTION_NOT_UTF8, "kept with U+FFFD replacements")
            rows.append((url, caption))
        out.append(shard(shard_id, rows, errors))
    return out


@pytest.mark.parametrize("rows_per_partition", [1 << 23, 97, 20])  # 1, 19 and 92 partitions
def test_partitioned_dedupe_matches_a_brute_force_reference(tmp_path, monkeypatch, rows_per_partition):
    monkeypatch.setattr(dedupe, "CHUNK_ROWS", 37)  # many spill files, chunks cutting across shards
    monkeypatch.setattr(dedupe, "MERGE_CHUNKS", 5)  # and many runs
    shards = random_shards(7, 40, 50)
    rules = PlanRules(check_captions=False)
    planned, planner = plan_all(shards, tmp_path / "plan", rules, rows_per_shard=50,
                                rows_per_partition=rows_per_partition)
    expected = brute_force_duplicates(shards)
    got = [sorted(i for i, (reason, _) in p.row_errors.items() if reason is Reason.DUP_URL) for p in planned]
    assert got == expected
    assert sum(map(len, expected)) > 1000 and sum(len(e) > 0 for e in expected) == 40  # repeats in every shard
    assert planner.marked["dup_url"] == sum(map(len, expected))
    for p, s in zip(planned, shards):  # the reader's flags are kept as they were
        assert all(p.row_errors[i] == s.row_errors[i] for i in s.row_errors)
    plan = tmp_path / "plan" / dedupe.PLAN_FOLDER
    partitions = len(list((plan / "dups").iterdir()))
    eligible = sum(len(eligible_rows(s)) for s in shards)
    assert eligible > 1500 and partitions >= -(-eligible // rows_per_partition)
    assert partitions == 1 if rows_per_partition > eligible else partitions < 2 * -(-eligible // rows_per_partition)
    assert len(list((plan / "runs").iterdir())) == -(-eligible // 37 // 5) and not list((plan / "chunks").iterdir())


@pytest.mark.parametrize("distributor", ["processes", "ray"])
def test_inline_processes_and_ray_find_the_same_duplicates(tmp_path, monkeypatch, distributor):
    monkeypatch.setattr(dedupe, "CHUNK_ROWS", 101)
    monkeypatch.setattr(dedupe, "MERGE_CHUNKS", 2)
    shards = random_shards(11, 12, 40)
    inline, _ = plan_all(shards, tmp_path / "inline", rows_per_shard=40, rows_per_partition=50)
    other, _ = plan_all(shards, tmp_path / distributor, rows_per_shard=40, rows_per_partition=50,
                        distributor=distributor)
    assert [p.row_errors for p in other] == [p.row_errors for p in inline]
    assert sum(len(p.row_errors) for p in inline) > 100


def test_an_empty_job_and_a_job_without_eligible_rows(tmp_path):
    planned, planner = plan_all([], tmp_path / "none")
    assert planned == [] and not planner.marked
    rows = shard(0, [(None, "a caption here"), ("  ", "a caption here")])
    planned, planner = plan_all([rows], tmp_path / "no-urls")
    assert planned == [rows] and not planner.marked


def marks(planned: ShardInput) -> dict[int, str]:
    return {i: reason.value for i, (reason, _) in planned.row_errors.items()}


def test_planner_dedupes_across_shards_after_normalisation(tmp_path):
    (first, second), planner = plan_all([shard(0, [("http://a.example/x.jpg", "a red fox"),
                                                   ("http://a.example/y.jpg", "a red fox")]), shard(1, [
        ("HTTP://A.example:80/x.jpg#top", "a red fox"),  # the same pair, spelled otherwise
        ("http://a.example/%78.jpg", "a red fox"),  # %78 is "x"
        ("http://a.example/x.jpg", "a grey fox"),  # same URL, another caption: a new sample
        ("http://a.example/x.jpg", "a grey fox"),  # ... repeated within the shard
        ("http://a.example/x.jpg", "a red fox "),  # the caption is compared exactly
    ])], tmp_path)
    assert marks(first) == {}
    assert marks(second) == {0: "dup_url", 1: "dup_url", 3: "dup_url"}
    assert second.row_errors[0][1] == DUPLICATE_DETAIL
    assert planner.marked == Counter({"dup_url": 3})


def test_planner_caption_marks_and_precedence(tmp_path):
    (planned, again), _ = plan_all([shard(0, [
        ("http://a.example/1.jpg", "IMG_1234.JPG"),
        ("http://a.example/2.jpg", None),
        ("http://a.example/3.jpg", "sunset"),
        ("http://a.example/1.jpg", "IMG_1234.JPG"),  # a repeat of a junk row: dup_url, the filter's order
        (None, "image"),  # no URL: left for the worker's invalid_url
        ("   ", "image"),
        ("http://a.example/7.jpg", "caf\ufffd au lait"),  # flagged by the reader: keeps its reason
        ("http://a.example/8.jpg", "a fine caption"),
    ], errors={6: (Reason.CAPTION_NOT_UTF8, "kept with U+FFFD replacements")}),
        shard(1, [("http://a.example/7.jpg", "caf\ufffd au lait")])], tmp_path)
    assert marks(planned) == {0: "caption_boilerplate", 1: "caption_missing", 2: "caption_short", 3: "dup_url",
                              6: "caption_not_utf8"}
    assert "--reject_boilerplate_captions" in planned.row_errors[0][1]
    # The reader-flagged row was not remembered: its clean twin is not a duplicate of a repair.
    assert marks(again) == {}


def test_planner_without_captions_dedupes_by_url_only(tmp_path):
    cfg = IngestConfig(url_list="x", output_folder="y", caption_col=None)
    rules = cfg.plan_rules()
    assert rules.dedupe_url_caption and not rules.check_captions
    (planned,), _ = plan_all([shard(0, [("http://a.example/1.jpg", None), ("http://a.example/1.jpg#x", None),
                                        ("http://a.example/2.jpg", None)])], tmp_path, rules)
    assert marks(planned) == {1: "dup_url"}


def test_strict_options_turn_the_planner_off():
    cfg = IngestConfig(url_list="x", output_folder="y", caption_col="caption", **STRICT)
    assert not cfg.plan_rules().active
    rows = shard(0, [("http://a.example/1.jpg", ""), ("http://a.example/1.jpg", "")])
    assert Planner(cfg.plan_rules()).plan(rows) is rows
    with pytest.raises(Exception, match="min_caption_words"):
        IngestConfig(url_list="x", output_folder="y", min_caption_words=-1)


# -- end to end, with the server's access log -------------------------------------------------


def two_files(folder: Path, base: str) -> list[tuple[str, str, str | None]]:
    """Two JSON-lines files, the second repeating the first; (url, caption, expected reason) per row."""
    host_and_port = base.removeprefix("http://")
    rows = [
        # file 1 (rows 0-5)
        (f"{base}/img/a.jpg", "a red square on grey", None),
        (f"{base}/img/b.jpg", "a blue circle on the left", None),
        (f"{base}/img/junk1.jpg", "IMG_1234.JPG", "caption_boilerplate"),
        (f"{base}/img/junk2.jpg", " ", "caption_missing"),
        (f"{base}/img/junk3.jpg", "sunset", "caption_short"),
        (f"{base}/img/c.jpg", "a green star in the middle", None),
        # file 2 (rows 6-11): earlier pairs in other spellings, and one new caption
        (f"HTTP://{host_and_port}/img/a.jpg#top", "a red square on grey", "dup_url"),
        (f"http://{host_and_port}/img/%62.jpg", "a blue circle on the left", "dup_url"),
        (f"{base}/img/a.jpg", "the same square, another caption", None),  # a new pair: downloaded again
        (f"{base}/img/c.jpg", "a green star in the middle", "dup_url"),
        (f"{base}/img/a.jpg", "the same square, another caption", "dup_url"),
        (f"{base}/img/d.jpg", "image", "caption_boilerplate"),
    ]
    folder.mkdir()
    for name, part in (("1.jsonl", rows[:6]), ("2.jsonl", rows[6:])):
        (folder / name).write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c, _ in part))
    return rows


def config(url_list: Path, output: Path, **overrides) -> IngestConfig:
    values = dict(url_list=str(url_list), input_format="jsonl", caption_col="caption", output_folder=str(output),
                  number_sample_per_shard=4, distributor="inline", image_size=32, thread_count=8, timeout=10.0,
                  allow_networks=["127.0.0.1/32"], progress=False)
    return IngestConfig(**{**values, **overrides})


def pool(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def requests(web: HostileWeb, since: int) -> Counter:
    return Counter(path.split("?")[0] for path in web.paths()[since:])


@pytest.fixture(scope="module")
def web():
    with HostileWeb("127.0.0.1") as server:
        yield server


@pytest.fixture(scope="module")
def planned_run(web, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    rows = two_files(tmp / "lists", web.base)
    before = len(web.paths())
    summary = run_ingest(config(tmp / "lists", tmp / "pool"))
    return {"tmp": tmp, "rows": rows, "summary": summary, "requests": requests(web, before)}


def test_rejected_rows_are_pool_rows_with_reasons_and_never_requested(planned_run):
    rows, got = planned_run["rows"], pool(planned_run["tmp"] / "pool")
    assert [r["reason"] for r in got] == [expected for _, _, expected in rows]
    assert [r["url"] for r in got] == [url for url, _, _ in rows]  # recorded as given, not normalised
    for row in got:
        assert row["status"] == ("success" if row["reason"] is None else "failed_to_download")
        if row["reason"] is not None:
            assert row["error_message"] and row["sha256"] is None and row["http_status"] is None
    # Only the rows worth their bytes were requested: a.jpg twice (two captions), b and c once.
    assert planned_run["requests"] == Counter({"/img/a.jpg": 2, "/img/b.jpg": 1, "/img/c.jpg": 1})


def test_rejections_are_counted_in_stats_and_summary(planned_run):
    reasons = Counter()
    for path in (planned_run["tmp"] / "pool").glob(f"*{STATS_SUFFIX}"):
        reasons.update(json.loads(path.read_text())["reasons"])
    expected = Counter(reason for _, _, reason in planned_run["rows"] if reason)
    assert reasons == expected
    summary = planned_run["summary"]
    assert summary.reasons == dict(expected) and summary.count == len(planned_run["rows"])
    assert summary.failed_to_download == sum(expected.values()) and summary.successes == 4


def test_strict_options_download_every_row_as_img2dataset_does(planned_run, web):
    tmp = planned_run["tmp"]
    before = len(web.paths())
    run_ingest(config(tmp / "lists", tmp / "strict", **STRICT))
    assert all(r["status"] == "success" for r in pool(tmp / "strict"))
    got = requests(web, before)
    assert got["/img/a.jpg"] == 4 and got["/img/b.jpg"] == 2 and got["/img/c.jpg"] == 2 and got["/img/d.jpg"] == 1
    assert got["/img/junk1.jpg"] == got["/img/junk2.jpg"] == got["/img/junk3.jpg"] == 1


def test_a_resumed_run_marks_the_same_rows(planned_run, web):
    """Shards 1 and 2 repeat rows of shard 0; redone without it, they must still be marked."""
    tmp = planned_run["tmp"]
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "pool", resumed)
    for path in resumed.iterdir():
        if not path.name.startswith("00000") and not path.name.startswith("_"):
            path.unlink()
    for name in ("keys/0000000.bin", "keys/0000009.bin", "dups/00000.bin"):  # a crashed run's half-done plan
        (resumed / dedupe.PLAN_FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
        (resumed / dedupe.PLAN_FOLDER / name).write_bytes(b"\xff" * 40000)
    before = len(web.paths())
    summary = run_ingest(config(tmp / "lists", resumed, distributor="multiprocessing", workers=2))
    assert summary.shards_skipped == 1 and summary.count == len(planned_run["rows"])
    assert not (resumed / dedupe.PLAN_FOLDER).exists()  # recomputed, then removed
    strip = ("duration", "start_time", "end_time")
    original, again = pool(tmp / "pool"), pool(resumed)
    assert [{k: v for k, v in r.items() if k not in strip} for r in again] == \
        [{k: v for k, v in r.items() if k not in strip} for r in original]
    # Rows 6 and 7 repeat shard 0's a.jpg and b.jpg: still not requested.
    assert requests(web, before) == Counter({"/img/a.jpg": 1, "/img/c.jpg": 1})


def test_one_partition_or_many_give_the_same_pool(planned_run, web, monkeypatch):
    """Every eligible row its own partition, three rows a spill file: the same pool, byte for byte but the clock."""
    monkeypatch.setattr(dedupe, "CHUNK_ROWS", 3)
    tmp = planned_run["tmp"]
    before = len(web.paths())
    run_ingest(config(tmp / "lists", tmp / "many", plan_rows_per_partition=1, distributor="processes", workers=2))
    assert requests(web, before) == planned_run["requests"]
    clock = ("duration", "start_time", "end_time")
    names = sorted(p.name for p in (tmp / "pool").iterdir() if p.name[:1].isdigit())
    assert names == sorted(p.name for p in (tmp / "many").iterdir() if p.name[:1].isdigit())
    assert any(n.endswith(".tar") for n in names) and any(n.endswith(".parquet") for n in names)
    for name in names:
        one, many = (tmp / "pool" / name).read_bytes(), (tmp / "many" / name).read_bytes()
        if name.endswith(".tar"):
            assert one == many, name
        elif name.endswith(".parquet"):
            one, many = (pq.read_table(tmp / folder / name).to_pylist() for folder in ("pool", "many"))
            assert [{k: v for k, v in r.items() if k not in clock} for r in one] == \
                [{k: v for k, v in r.items() if k not in clock} for r in many], name
        else:
            one, many = json.loads(one), json.loads(many)
            assert {k: v for k, v in one.items() if k not in clock} == \
                {k: v for k, v in many.items() if k not in clock}, name
    assert not (tmp / "many" / dedupe.PLAN_FOLDER).exists() and not (tmp / "pool" / dedupe.PLAN_FOLDER).exists()


def test_a_url_only_list_is_not_caption_checked(web, tmp_path):
    urls = [f"{web.base}/img/u{i}.jpg" for i in range(5)] + [f"{web.base}/img/u1.jpg#again"]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    before = len(web.paths())
    run_ingest(config(tmp_path / "urls.txt", tmp_path / "pool", input_format="txt", caption_col=None))
    got = pool(tmp_path / "pool")
    assert [r["reason"] for r in got] == [None] * 5 + ["dup_url"]  # no caption: no caption rule, still deduped
    assert all(r["caption"] is None for r in got)
    assert requests(web, before) == Counter({f"/img/u{i}.jpg": 1 for i in range(5)})


# -- the demo corpus: the planted junk and repeats, against its ground truth ------------------


def test_demo_corpus_rows_rejected_before_download_were_never_requested(small_corpus, tmp_path):
    """The planted caption_junk and dup_url rows, served by the corpus's own web server.

    A second server on the corpus's site, with an access log of its own, so that other
    tests' runs on the shared one cannot blur the counts.
    """
    corpus_dir, _ = small_corpus
    truth = load_ground_truth(corpus_dir).to_pylist()
    with serve(corpus_dir / "site", access_log=tmp_path / "access.jsonl") as base_url:
        urls = pa.table({"url": [base_url + t["path"] for t in truth], "caption": [t["caption"] for t in truth]})
        pq.write_table(urls, tmp_path / "urls.parquet")
        cfg = IngestConfig(url_list=str(tmp_path / "urls.parquet"), input_format="parquet", caption_col="caption",
                           output_folder=str(tmp_path / "pool"), number_sample_per_shard=100, distributor="inline",
                           image_size=32, thread_count=32, per_host_limit=32, timeout=INGEST_TIMEOUT_S,
                           allow_networks=["127.0.0.1/32"], progress=False)
        summary = run_ingest(cfg)
    got = pool(tmp_path / "pool")
    wrong = [(t["row"], t["kind"], t["expected_ingest_reason"], r["reason"]) for t, r in zip(truth, got)
             if r["reason"] != t["expected_ingest_reason"]]
    assert not wrong and len(got) == len(truth)
    junk = [t for t in truth if t["kind"] == "caption_junk"]
    repeats = [t for t in truth if t["kind"] == "dup_url"]
    assert junk and repeats
    assert {t["expected_ingest_reason"] for t in junk} >= {"caption_missing", "caption_boilerplate"}
    requested = Counter(json.loads(line)["path"] for line in (tmp_path / "access.jsonl").read_text().splitlines())
    assert [t["path"] for t in junk if requested[t["path"]]] == []
    for row in repeats:  # requested once: for the original row, never for its repeat
        assert requested[row["path"]] == 1, row
        assert sum(t["path"] == row["path"] and t["expected_ingest_reason"] is None for t in truth) == 1
    assert summary.reasons["dup_url"] == len(repeats)
    assert sum(summary.reasons.get(r.value, 0) for r in JUNK_CAPTIONS.values() if r) >= len(junk)
