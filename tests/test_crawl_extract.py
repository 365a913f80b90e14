"""The crawler's pure rules: HTML and WAT → pairs, charsets, robots.txt, the per-host scheduler."""

from __future__ import annotations

import codecs
import random

import pytest

from core.captions import caption_reason
from core.reasons import Reason, SampleError, Stage
from crawl import extract as extract_mod
from crawl import page as page_mod
from crawl.extract import (
    Pair,
    extract_html,
    extract_wat,
    is_meaningless,
    pick_image_url,
    srcset_candidates,
)
from crawl.page import decode_html, looks_binary, read_page
from crawl.politeness import HostScheduler
from crawl.robots import ALLOW_ALL, parse_robots, policy_for_status

PAGE = "http://example.org/articles/cats.html"


def pairs(html: str | bytes, url: str = PAGE) -> list[tuple[str, str, str]]:
    return [(p.url, p.caption, p.caption_source) for p in extract_html(url, html).pairs]


def reasons(html: str | bytes) -> dict[str, int]:
    return dict(extract_html(PAGE, html).reasons)


# -- reasons vocabulary --------------------------------------------------------------


def test_crawl_reasons_are_one_stage_with_descriptions():
    crawl = [r for r in Reason if r.stage is Stage.CRAWL]
    assert {"robots_disallowed", "page_too_large", "not_html", "html_parse_error", "bad_encoding",
            "warc_truncated", "alt_meaningless", "data_uri", "out_of_scope", "depth_limit",
            "dup_in_page"} <= {r.value for r in crawl}
    assert all(r.description for r in crawl)
    assert Reason.HTTP_404.stage is Stage.FETCH and Reason.CAPTION_SHORT.stage is Stage.FILTER  # untouched


# -- URLs of an <img> ------------------------------------------------------------------


def test_srcset_parsing_follows_the_standard():
    assert srcset_candidates("a.jpg 320w, b.jpg 1280w,c.jpg 640w") == [
        ("a.jpg", 320, 1.0), ("b.jpg", 1280, 1.0), ("c.jpg", 640, 1.0)]
    assert srcset_candidates("x.jpg, x@2x.jpg 2x") == [("x.jpg", 0, 1.0), ("x@2x.jpg", 0, 2.0)]
    # URLs may hold commas (image CDNs); a comma inside parentheses does not split descriptors
    assert srcset_candidates("https://cdn/w_100,h_50/a.jpg 100w, b.jpg (x, y) 5w") == [
        ("https://cdn/w_100,h_50/a.jpg", 100, 1.0), ("b.jpg", 5, 1.0)]
    assert srcset_candidates("  ,, ") == [] and srcset_candidates("a.jpg bogus 9q") == [("a.jpg", 0, 1.0)]


@pytest.mark.parametrize("attributes, expected", [
    ({"src": "s.jpg", "srcset": "a.jpg 320w, c.jpg 1280w, b.jpg 640w"}, ("c.jpg", None)),
    ({"srcset": "a.jpg 1x, b.jpg 2x, c.jpg 1.5x"}, ("b.jpg", None)),
    ({"srcset": "a.jpg 3x, b.jpg 100w"}, ("b.jpg", None)),  # widths rank before densities
    ({"src": "data:image/gif;base64,R0l", "data-src": "real.jpg"}, ("real.jpg", None)),
    ({"src": "spinner.gif", "data-lazy-src": "real.jpg"}, ("real.jpg", None)),
    ({"data-original": "o.jpg"}, ("o.jpg", None)),
    ({"src": "data:,x", "data-srcset": "data:,y 1x, big.jpg 800w"}, ("big.jpg", None)),
    ({"src": "data:image/png;base64,iVBOR"}, (None, Reason.DATA_URI)),
    ({"src": "  "}, (None, Reason.INVALID_URL)),
    ({}, (None, Reason.INVALID_URL)),
])
def test_image_url_choice(attributes, expected):
    assert pick_image_url(attributes) == expected


def test_picture_sources_count_as_candidates():
    html = ('<picture><source srcset="p-800.webp 800w, p-400.webp 400w" type="image/webp">'
            '<img src="p.jpg" srcset="p-600.jpg 600w" alt="a red kite over a hill"></picture>')
    assert pairs(html) == [("http://example.org/articles/p-800.webp", "a red kite over a hill", "alt")]


def test_urls_resolve_against_the_page_then_the_base():
    html = '<img src="../img/a.jpg" alt="one cat"><img src="//cdn.example.net/b.jpg#frag" alt="two cats">'
    assert [p[0] for p in pairs(html)] == ["http://example.org/img/a.jpg", "http://cdn.example.net/b.jpg"]
    based = '<head><base href="/static/"><base href="/ignored/"></head><img src="c.jpg" alt="three cats">'
    assert pairs(based) == [("http://example.org/static/c.jpg", "three cats", "alt")]
    absolute_base = '<base href="https://Media.Example.COM/x/"><img src="d.jpg" alt="four cats">'
    assert pairs(absolute_base)[0][0] == "https://media.example.com/x/d.jpg"


def test_unusable_urls_are_counted_by_reason():
    html = ('<img src="javascript:alert(1)" alt="a scripted picture"><img alt="no source at all">'
            '<img src="http://[::1" alt="a broken address"><img src="data:image/png;base64,x" alt="inline dot">')
    assert pairs(html) == []
    assert reasons(html) == {"unsupported_scheme": 1, "invalid_url": 2, "data_uri": 1}


# -- captions --------------------------------------------------------------------------


@pytest.mark.parametrize("alt", [
    "", "   ", "image", "Image:", "LOGO", "logo.", "icon", "photo", "thumbnail", "IMG_1234.jpg", "IMG_1234",
    "DSC01234", "dsc_0001.JPG", "P1010001.JPG", "my holiday.jpeg", "banner.png", "12345", "--", "www.example.com",
    "https://example.com/a.jpg", "Screenshot 2024-01-01", "image not found",
])
def test_meaningless_alts(alt):
    assert is_meaningless(extract_mod.clean_text(alt))


@pytest.mark.parametrize("alt", [
    "a red circle", "Logo of the Red Cross on a tent", "Image of a cat", "photo of a dog on a beach", "café",
    "3 apples on a table", "The Jpeg committee meeting", "Paris, 1920",
])
def test_meaningful_alts(alt):
    assert not is_meaningless(extract_mod.clean_text(alt))


@pytest.mark.parametrize("alt", ["click to enlarge", "Header", "footer.", "n/a", "PXL_20230101_123456", "P1000123",
                                 "…image…", "holiday_2019 (2).JPG", "Read more »", "a photo of a dog", "Logo of the Red Cross"])
def test_alt_texts_are_judged_as_ingest_and_the_filter_judge_captions(alt):
    """One rule, core/captions.py's: an alt text says nothing exactly when the filter would call it boilerplate."""
    assert is_meaningless(alt) is (caption_reason(alt, 0, 0) is Reason.CAPTION_BOILERPLATE)


def test_an_alt_the_filter_would_reject_gives_way_to_the_figure_caption():
    html = ('<figure><img src="a.jpg" alt="Click to enlarge"><figcaption>a heron on a post</figcaption></figure>'
            '<img src="b.jpg" alt="view image">')
    assert pairs(html) == [("http://example.org/articles/a.jpg", "a heron on a post", "figcaption")]
    assert reasons(html) == {"alt_meaningless": 1}


def test_alt_then_figcaption_then_nothing():
    html = """
    <figure><img src="a.jpg" alt=""><figcaption>
       A <em>green</em>
       triangle\t at dusk </figcaption></figure>
    <figure><img src="b.jpg" alt="a blue square"><figcaption>Figure 2</figcaption></figure>
    <figure><div><span><img src="c.jpg" alt="IMG_0001.JPG"></span></div><figcaption>Three hens</figcaption></figure>
    <figure><img src="d.jpg" alt="image"><figcaption> </figcaption></figure>
    <img src="e.jpg" alt="logo">
    <img src="f.jpg" alt="Tom &amp; Jerry&nbsp;at&#32;home">
    """
    base = "http://example.org/articles/"
    assert pairs(html) == [
        (base + "a.jpg", "A green triangle at dusk", "figcaption"),
        (base + "b.jpg", "a blue square", "alt"),
        (base + "c.jpg", "Three hens", "figcaption"),
        (base + "f.jpg", "Tom & Jerry at home", "alt"),
    ]
    assert reasons(html) == {"alt_meaningless": 2}


def test_duplicates_within_a_page_keep_the_first_captioned_copy():
    html = ('<img src="a.jpg" alt="image">'  # no caption: does not claim the URL
            '<img class="lazy" src="data:image/gif;base64,R0l" data-src="a.jpg" alt="a sleeping fox">'
            '<noscript><img src="a.jpg" alt="a sleeping fox"></noscript>'
            '<img src="./a.jpg#zoom" alt="the fox again">')
    assert pairs(html) == [("http://example.org/articles/a.jpg", "a sleeping fox", "alt")]
    assert reasons(html) == {"alt_meaningless": 1, "dup_in_page": 2}


# -- links and meta robots ---------------------------------------------------------------


def test_links_resolved_deduplicated_and_nofollow_honoured():
    html = ('<base href="/a/"><a href="b.html#x">b</a><a href="b.html">b again</a><a href="/c.html" rel="nofollow">c</a>'
            '<a href="mailto:x@y">m</a><area href="d.html"><a href="HTTP://Other.Example.org/e">e</a><a>no href</a>')
    result = extract_html(PAGE, html, want_links=True)
    assert result.links == ["http://example.org/a/b.html", "http://example.org/a/d.html", "http://other.example.org/e"]
    assert extract_html(PAGE, html).links == []  # only when asked
    meta = '<meta name="robots" content="NOFOLLOW"><a href="x.html">x</a><img src="i.jpg" alt="a calm lake">'
    result = extract_html(PAGE, meta, want_links=True)
    assert result.links == [] and len(result.pairs) == 1


def test_a_page_opts_out_with_meta_robots():
    for content in ("noai", "noimageai, nofollow", "none"):
        html = f'<meta name="robots" content="{content}"><img src="i.jpg" alt="a calm lake"><a href="x.html">x</a>'
        result = extract_html(PAGE, html, want_links=True)
        assert result.opt_out and result.pairs == []
    kept = '<meta name="robots" content="noai"><img src="i.jpg" alt="a calm lake">'
    assert extract_html(PAGE, kept, disallowed_directives=()).opt_out is None  # '[]' honours none


def test_too_many_links_are_capped(monkeypatch):
    monkeypatch.setattr(extract_mod, "MAX_LINKS_PER_PAGE", 5)
    html = "".join(f'<a href="/p{i}.html">{i}</a>' for i in range(50))
    assert len(extract_html(PAGE, html, want_links=True).links) == 5


# -- malformed HTML never raises -----------------------------------------------------------


def test_malformed_html_is_repaired_not_refused():
    html = ("<HTML><BODY><div><p>x<table><tr><td><IMG SRC=/a.jpg ALT='first &amp; best'></td>"
            "<td><img src=b.jpg alt=second></div></span><p><b><i>y</b></i>"
            '<img src="c.jpg" alt="third one" alt="ignored" / > <!-- c --> </table><img src="d.jpg" alt="cut off')
    got = pairs(html)
    assert got[:3] == [("http://example.org/a.jpg", "first & best", "alt"),
                       ("http://example.org/articles/b.jpg", "second", "alt"),
                       ("http://example.org/articles/c.jpg", "third one", "alt")]


def test_random_bytes_never_crash_the_extractor():
    rng = random.Random(3)
    pieces = ["<img", " src=", "'a.jpg'", " alt=", '"x y"', ">", "<figure>", "</figure>", "<figcaption>",
              "<!--", "-->", "<base href=", "<a href=", "&amp;", "&#", "\x00", "\ufffd", "srcset=", "a 2x,", "<", ">"]
    for _ in range(300):
        doc = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        extract_html(PAGE, doc, want_links=True)
        extract_html(PAGE, rng.randbytes(rng.randint(0, 400)).decode("utf-8", "replace"))


# -- page-level checks and charsets --------------------------------------------------------


def read(body: bytes, content_type: str | None = "text/html", charset: str | None = None, max_bytes: int = 10**6):
    return read_page(PAGE, body, content_type=content_type, charset=charset, max_bytes=max_bytes)


def reason_of(body: bytes, **kwargs) -> str:
    with pytest.raises(SampleError) as caught:
        read(body, **kwargs)
    return caught.value.reason.value


def test_page_level_reasons():
    assert reason_of(b"<p>" * 100, max_bytes=50) == "page_too_large"
    assert reason_of(b"<p>hello</p>", content_type="application/pdf") == "not_html"
    assert reason_of(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR") == "not_html"  # binary junk served as text/html
    assert reason_of(b"\x00\x01" + bytes(range(256)) * 4) == "not_html"
    assert reason_of(codecs.BOM_UTF16_LE + b"\x00\xd8A\x00") == "bad_encoding"
    junk = b"<html><body>" + "日本語".encode() + b"\xff\xfe\x81\x8d\x90\x9d\xc3\x28\xa0\xa1" * 20 + b"</body></html>"
    assert reason_of(junk, charset="utf-8") == "bad_encoding"
    assert read(b'<img src="a.jpg" alt="an owl">', content_type="application/xhtml+xml").pairs
    assert read(b'<img src="a.jpg" alt="an owl">', content_type=None).pairs  # undeclared: judged by the bytes


def test_a_parser_failure_is_a_counted_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the parser gave up")

    monkeypatch.setattr(page_mod, "extract_html", broken)
    assert reason_of(b"<p>fine</p>") == "html_parse_error"


def caption(body: bytes, charset: str | None = None) -> str:
    return read(body, charset=charset).pairs[0].caption


def test_charsets_bom_header_meta_then_guess():
    text = '<img src="a.jpg" alt="Un café crème “naïve”">'
    assert caption(codecs.BOM_UTF8 + text.encode()) == "Un café crème “naïve”"
    assert caption(codecs.BOM_UTF16_LE + text.encode("utf-16-le")) == "Un café crème “naïve”"
    assert caption(text.encode("cp1252"), charset="windows-1252") == "Un café crème “naïve”"
    meta = '<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1">' + text.replace("“naïve”", "")
    assert caption(meta.encode("latin-1")) == "Un café crème"
    assert caption(('<meta charset="utf-8">' + text).encode()) == "Un café crème “naïve”"
    # a header that lies (or names no real text encoding) gives way to the bytes
    assert caption(text.encode(), charset="base64") == "Un café crème “naïve”"
    assert caption(text.encode(), charset="x-no-such-charset") == "Un café crème “naïve”"
    assert caption(text.encode("cp1252")).startswith("Un caf")  # nothing declared: guessed, not refused
    # declared, and the bytes contradict every declaration: refused rather than guessed into mojibake
    assert reason_of(("<meta charset=utf-8>" + text).encode("cp1252")) == "bad_encoding"
    assert caption(("<meta charset=utf-8>" + text).encode("cp1252"), charset="cp1252") == "Un café crème “naïve”"


def test_utf8_pages_reach_the_parser_as_their_own_bytes():
    body = '<p>déjà vu</p>'.encode()
    assert decode_html(body) is body and decode_html(body, "utf-8") is body
    assert decode_html("<p>déjà</p>".encode("latin-1"), "latin1") == "<p>déjà</p>"
    assert not looks_binary(codecs.BOM_UTF16_BE + "<p>".encode("utf-16-be"))


# -- robots.txt -----------------------------------------------------------------------------


ROBOTS = """
# comments and blank lines are ignored
User-agent: *
Disallow: /private/
Allow: /private/open.html
Disallow: /*.pdf$
Disallow: /search?q=
Crawl-delay: 2

User-agent: otherbot
User-agent: webclip/0.1
Disallow: /only-for-us/
Disallow:

user-agent: WEBCLIP
allow: /only-for-us/but-this
crawl-delay: 0.5
"""


def test_robots_our_group_wins_and_merges():
    ours = parse_robots(ROBOTS)
    assert not ours.allows("http://h/only-for-us/x") and ours.allows("http://h/only-for-us/but-this.html")
    assert ours.allows("http://h/private/x")  # the * group does not apply when ours exists
    assert ours.crawl_delay == 0.5
    star = parse_robots(ROBOTS, token="somebot")
    assert not star.allows("http://h/private/secret.html") and star.allows("http://h/private/open.html")
    assert not star.allows("http://h/files/report.pdf") and star.allows("http://h/files/report.pdf?v=2")
    assert not star.allows("http://h/search?q=cats") and star.allows("http://h/search")
    assert star.crawl_delay == 2.0 and star.allows("http://h/robots.txt")


def test_robots_longest_match_and_ties():
    policy = parse_robots("User-agent: *\nDisallow: /a\nAllow: /a/b\nDisallow: /a/b/c\nAllow: /x\nDisallow: /x\n")
    assert not policy.allows("http://h/a") and policy.allows("http://h/a/b") and not policy.allows("http://h/a/b/c")
    assert policy.allows("http://h/x")  # equal length: allow wins
    assert parse_robots("").allows("http://h/anything") and parse_robots("garbage\n\x00\n").allows("http://h/")
    assert not parse_robots("User-agent: *\nDisallow: /\n").allows("http://h/page")


def test_robots_fetch_status_rules():
    assert policy_for_status(200) is None
    assert policy_for_status(404) is ALLOW_ALL and policy_for_status(403) is ALLOW_ALL
    for status in (500, 503, 429):
        assert policy_for_status(status).blocked is Reason.ROBOTS_UNREACHABLE


# -- the per-host scheduler ---------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_request_per_host_and_a_pause_after_each():
    clock = Clock()
    scheduler: HostScheduler[str] = HostScheduler(delay=1.0, clock=clock)
    for url in ("a1", "a2", "a3"):
        scheduler.push("a", url)
    scheduler.push("b", "b1")
    assert scheduler.pop_ready() == ("a", "a1")
    assert scheduler.pop_ready() == ("b", "b1")
    assert scheduler.pop_ready() is None  # a is busy, b has nothing left
    clock.now += 5  # a slow response: the pause starts when it ends
    scheduler.release("a")
    assert scheduler.pop_ready() is None and scheduler.seconds_until_ready() == 1.0
    clock.now += 0.999
    assert scheduler.pop_ready() is None
    clock.now += 0.001
    assert scheduler.pop_ready() == ("a", "a2")
    scheduler.release("a", requested=False)  # decided without a request: no pause
    assert scheduler.pop_ready() == ("a", "a3")
    scheduler.release("a")
    scheduler.set_delay("a", 3.0)
    scheduler.push("a", "a4", front=False)
    scheduler.push("a", "a0", front=True)
    clock.now += 1.0  # the pause that was set when a3 ended (1 s) applies
    assert scheduler.pop_ready() == ("a", "a0") and scheduler.queued == 1
    assert scheduler.drop_queue("a") == ["a4"] and scheduler.queued == 0


def test_pair_is_a_plain_value():
    assert Pair("http://x/a.jpg", "cap", "alt") == Pair("http://x/a.jpg", "cap", "alt")


# -- WAT records ------------------------------------------------------------------------------


def wat(links: list[dict], head: dict | None = None, uri: str = PAGE) -> dict:
    return {"Envelope": {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": uri},
        "Payload-Metadata": {"HTTP-Response-Metadata": {
            "Headers": {"Content-Type": "text/html"},
            "HTML-Metadata": {"Head": head or {"Title": "t"}, "Links": links}}}}}


def test_wat_links_become_pairs_by_the_same_rules():
    links = [
        {"path": "A@/href", "url": "/other.html", "text": "other"},
        {"path": "IMG@/src", "url": "img/a.jpg", "alt": "a heron in the reeds"},
        {"path": "IMG@/src", "url": "img/b.jpg", "alt": "IMG_2020.JPG"},
        {"path": "IMG@/src", "url": "data:image/gif;base64,R0l", "alt": "pixel art"},
        {"path": "IMG@/data-src", "url": "img/c.jpg", "alt": "two herons"},
        {"path": "IMG@/srcset", "url": "img/d1.jpg 1x, img/d2.jpg 2x", "alt": "three herons"},
        {"path": "IMG@/src", "url": "img/a.jpg", "alt": "a heron again"},
        {"path": "SCRIPT@/src", "url": "app.js"},
    ]
    page_url, result = extract_wat(wat(links, head={"Base": "/media/"}))
    assert page_url == PAGE
    assert [(p.url, p.caption) for p in result.pairs] == [
        ("http://example.org/media/img/a.jpg", "a heron in the reeds"),
        ("http://example.org/media/img/c.jpg", "two herons"),
        ("http://example.org/media/img/d2.jpg", "three herons"),
    ]
    assert dict(result.reasons) == {"alt_meaningless": 1, "data_uri": 1, "dup_in_page": 1}


def test_wat_opt_out_and_non_pages():
    _, result = extract_wat(wat([{"path": "IMG@/src", "url": "a.jpg", "alt": "a heron"}],
                                head={"Metas": [{"name": "robots", "content": "noimageai"}]}))
    assert result.opt_out == "noimageai" and result.pairs == []
    request = {"Envelope": {"WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Target-URI": PAGE},
                            "Payload-Metadata": {"HTTP-Request-Metadata": {}}}}
    assert extract_wat(request) == (None, None)
    with pytest.raises(KeyError):
        extract_wat({"not": "a wat record"})


# -- the fast paths agree with the plain ones -----------------------------------------------


def test_fast_paths_agree_with_the_plain_rules():
    rng = random.Random(11)
    bases = ["http://example.org/articles/cats.html", "https://Ex.COM", "https://ex.com/a/b/", "http://h:8080/x?y#z",
             "http://ex.com/a/./b/../c.html", "http://user@ex.com/p", "http://[::1]:80/x", "https://bücher.de/x",
             "https://ex.com", "http://ex.com/a b/c", "http://ex.com:/x", "https://ex.com/p;q/r", " http://ex.com/y/",
             "HTTP://ex.com/z/", "http://ex.com/a\tb/", "ftp://ex.com/f/"]
    pieces = ["a", "b.jpg", "/", "//", "?", "#", "..", ".", ":", "http:", "https://", "HTTP://", "Ex.com", ":80",
              "?q=1", "#f", " ", "\t", "%20", "@", "~", "javascript:", "data:", "[::1]", "/img/x.jpg", "C:", ";",
              ":99999", "ü", "\\", "http://a.b", "\x01", "\x1f", "\xa0", "\u3000", "\n", "/.x", "..", "A.B", "http://", "ex.com", "-", "x.", ":8080"]
    for _ in range(20000):
        base = rng.choice(bases)
        raw = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        assert extract_mod.Resolver(base)(raw) == extract_mod.resolve(base, raw), (base, raw)
    srcset_pieces = ["a.jpg", "b", ",", " ", "\t", "1x", "2x", "320w", "1.5x", "w", ",,", "http://h/p,q.jpg", "100h"]
    for _ in range(20000):
        value = "".join(rng.choice(srcset_pieces) for _ in range(rng.randint(0, 8)))
        assert srcset_candidates(value) == extract_mod._srcset_by_hand(value), value


# -- the page loop agrees with the rules applied one by one -----------------------------------


def reference_image_url(attributes, source_srcsets=()):
    """Rule 1 as written: the widest srcset candidate, else a lazy attribute, else src; no data: URIs."""
    best, rank, saw_data = None, (-1, -1.0), False
    for srcset in (attributes.get("srcset"), attributes.get("data-srcset"), attributes.get("data-lazy-srcset"),
                   *source_srcsets):
        for url, width, density in extract_mod._srcset_by_hand(srcset or ""):
            if url[:5].lower() == "data:":
                saw_data = True
            elif (width, density) > rank:
                best, rank = url, (width, density)
    if best is not None:
        return best, None
    for name in (*extract_mod.LAZY_SRC_ATTRIBUTES, "src"):
        value = (attributes.get(name) or "").strip()
        if value[:5].lower() == "data:":
            saw_data = True
        elif value:
            return value, None
    return None, Reason.DATA_URI if saw_data else Reason.INVALID_URL


def reference_is_meaningless(caption):
    """Rule 3's judgement as ingest and the filter make it: a caption missing or boilerplate."""
    return caption_reason(caption, 0, 0) in (Reason.CAPTION_MISSING, Reason.CAPTION_BOILERPLATE)


def reference_extract_html(page_url, html, want_links=False,
                           disallowed=("noai", "noimageai", "noindex", "noimageindex")):
    """Rules 1-4 (and links) with the plain functions, one image at a time, no shortcut."""
    from selectolax.lexbor import LexborHTMLParser

    from crawl.extract import PageExtraction, resolve, robots_directives

    tree = LexborHTMLParser(html)
    directives, base = set(), page_url
    for node in tree.head.css("base[href], meta[name]") if tree.head is not None else ():
        if node.tag == "base":
            if base is page_url:
                base = resolve(page_url, node.attributes.get("href") or "")[0] or page_url
        elif (node.attributes.get("name") or "").lower() in ("robots", "webclip"):
            directives |= robots_directives(node.attributes.get("content"))
    if "none" in directives:
        directives |= {"noindex", "nofollow"}
    result = PageExtraction()
    opted_out = sorted(directives.intersection(disallowed))
    if opted_out:
        result.opt_out = opted_out[0]
    hrefs, seen, picture, sources = [], set(), None, []
    for node in tree.css("img, source[srcset], a[href], area[href]"):
        if node.tag in ("a", "area"):
            if "nofollow" not in (node.attributes.get("rel") or "").lower():
                hrefs.append(node.attributes.get("href") or "")
            continue
        if node.tag == "source":
            if node.parent is not None and node.parent.tag == "picture":
                if node.parent.mem_id != picture:
                    picture, sources = node.parent.mem_id, []
                sources.append(node.attributes.get("srcset") or "")
            continue
        if opted_out:
            continue
        in_picture = bool(sources) and node.parent is not None and node.parent.mem_id == picture
        raw, problem = reference_image_url(node.attributes, sources if in_picture else ())
        url, problem = resolve(base, raw) if raw is not None else (None, problem)
        if url is None:
            result.reasons[problem.value] += 1
            continue
        caption, source = extract_mod.clean_text(node.attributes.get("alt")), "alt"
        if reference_is_meaningless(caption):
            caption, source = "", "figcaption"
            figure = node.parent
            for _ in range(extract_mod.FIGURE_SEARCH_DEPTH):
                if figure is None or figure.tag == "figure":
                    break
                figure = figure.parent
            if figure is not None and figure.tag == "figure":
                figcaption = figure.css_first("figcaption")
                caption = extract_mod.clean_text(figcaption.text(deep=True, separator=" ") if figcaption else "")
            if reference_is_meaningless(caption):
                result.reasons["alt_meaningless"] += 1
                continue
        if url in seen:
            result.reasons["dup_in_page"] += 1
            continue
        seen.add(url)
        result.pairs.append(Pair(url, caption, source))
    if want_links and "nofollow" not in directives:
        for href in hrefs:
            if len(set(result.links)) >= extract_mod.MAX_LINKS_PER_PAGE:
                break
            url, _ = resolve(base, href)
            if url is not None and url not in result.links:
                result.links.append(url)
    return result


def random_page(rng: random.Random) -> str:
    """Markup of the shapes the fast paths single out, and the odd cases around them."""
    srcs = ["a.jpg", "/img/b.jpg", "https://cdn.example.net/c.jpg", "HTTPS://CDN.Example.NET/D.JPG", "../e.jpg",
            "./a.jpg", " a.jpg ", "a.jpg#x", "//cdn.example.net/f.jpg", "data:image/gif;base64,R0l", " data:,x",
            "DATA:,y", "javascript:void(0)", "", "  ", "\ta.jpg", "g h.jpg", "\xa0/i.jpg", "/j.jpg?", "/k;l.jpg",
            "/m//n.jpg", "mailto:x@y", "http://[::1/", "\x01/o.jpg", "p.jpg\n", "?q=1", "#top"]
    srcsets = ["a-1.jpg 320w, a-2.jpg 640w", "b.jpg 1x, b2.jpg 2x", "c.jpg 100w,c2.jpg 200w", "d,1.jpg 10w, d2.jpg 5w",
               "data:,z 1000w, e.jpg 10w", "f.jpg 10w, g.jpg 10w", "h.jpg (x, y) 5w", ",i.jpg 5w", "j.jpg, k.jpg 2x",
               "l.jpg 0320w, m.jpg 320w", "n.jpg 5W", "o.jpg\t7w ,\np.jpg 9w", "q.jpg 1w, r.jpg 2w,", "   "]
    alts = ["a red kite over a hill", "Street market in the morning", "image", "IMG_4032.JPG", "", "  ", "logo!!",
            "logo!!!!!!!!!!!!!!!!!!!!!!", "photo of a dog", "scan 0042", "ſcan 0042", "www.example.com", "12345",
            "Tom &amp; Jerry", "a\tcat\non a mat", "The end.", "Mr. Smith at his desk, reading", "café au lait",
            "stone light garden market", "image!!!!!!!!!!!!!!!!!!!!!!!", "Screenshot of the old harbour",
            "screen shot 2024 of the harbour", "Image of a quiet morning street", "ſcan of the old city street",
            "http://example.com/some/long/path", "Street market in the morning (detail)", "dsc 0042 at the harbour"]
    lazy = ["data-src", "data-lazy-src", "data-original", "data-srcset", "data-lazy-srcset"]

    def img() -> str:
        attributes = []
        if rng.random() < 0.8:
            attributes.append(f'src="{rng.choice(srcs)}"')
        if rng.random() < 0.3:
            attributes.append(f'srcset="{rng.choice(srcsets)}"')
        if rng.random() < 0.2:
            name = rng.choice(lazy)
            attributes.append(f'{name}="{rng.choice(srcsets if "srcset" in name else srcs)}"')
        if rng.random() < 0.9:
            attributes.append(f'alt="{rng.choice(alts)}"')
        rng.shuffle(attributes)
        return f"<img {' '.join(attributes)}>"

    def block(depth: int = 0) -> str:
        roll = rng.random()
        if depth > 3 or roll < 0.4:
            return img()
        inner = "".join(block(depth + 1) for _ in range(rng.randint(1, 3)))
        if roll < 0.55:
            caption = f"<figcaption>{rng.choice(alts)}</figcaption>"
            return f"<figure>{caption if rng.random() < 0.3 else ''}{inner}{caption if rng.random() < 0.6 else ''}</figure>"
        if roll < 0.65:
            sources = "".join(f'<source srcset="{rng.choice(srcsets)}">' for _ in range(rng.randint(0, 2)))
            return f"<picture>{sources}{img()}</picture>{inner}"
        if roll < 0.75:
            return f"<noscript>{inner}</noscript>"
        if roll < 0.85:
            return f'<a href="{rng.choice(srcs)}"{" rel=nofollow" if rng.random() < 0.2 else ""}>{inner}</a>'
        return f"<div><p>{inner}</p></div>"

    head_parts = ['<meta charset="utf-8">', "<title>t</title>", '<link rel="stylesheet" href="/s.css">',
                  "<script>var a = '<base href=/no/>';</script>", '<meta property="og:title" content="x">']
    if rng.random() < 0.3:
        head_parts.append(f'<base href="{rng.choice(["/static/", "https://Media.Example.com/x/", "sub/", "../up/"])}">')
    if rng.random() < 0.1:
        head_parts.append(f'<meta name="robots" content="{rng.choice(["noai", "nofollow", "none", "index"])}">')
    if rng.random() < 0.1:  # the odd ones: a <base> without href, an empty or upper-case name, a nested one
        head_parts.append(rng.choice([
            "<base target=_blank>", '<BASE HREF="/upper/">', '<base href="">', '<meta name content="noai">',
            '<meta name="ROBOTS" content="NoAI">', '<meta name="webclip" content="noimageai">',
            '<noscript><meta name="robots" content="noai"></noscript>', '<template><base href="/t/"></template>',
            '<meta name="robots">']))
    rng.shuffle(head_parts)
    head = "".join(head_parts[: rng.randint(0, len(head_parts))])
    late = rng.choice(["", "", '<base href="/late/">', '<meta name="robots" content="noai">'])  # in <body>: ignored
    return f"<html><head>{head}</head><body>{late}{''.join(block() for _ in range(rng.randint(0, 12)))}</body></html>"


def test_the_page_loop_agrees_with_the_rules_one_by_one():
    rng = random.Random(7)
    pages = ["http://example.org/articles/cats.html", "https://Ex.COM", "http://ex.com/a/./b/c.html",
             "https://bücher.de/x/", "http://h:8080/x?y#z"]
    for _ in range(1500):
        page, html, links = rng.choice(pages), random_page(rng), rng.random() < 0.3
        got, expected = extract_html(page, html, want_links=links), reference_extract_html(page, html, links)
        assert (got.pairs, dict(got.reasons), got.links, got.opt_out) == \
            (expected.pairs, dict(expected.reasons), expected.links, expected.opt_out), html


def test_the_page_loop_agrees_on_the_benchmark_pages():
    from bench.crawl_parse import synthetic_page

    rng = random.Random(0)
    for page in range(40):
        html = synthetic_page(rng, page, rng.choice([5, 50]) * 1024)
        url = f"https://site{page}.example/articles/{page}.html"
        got, expected = extract_html(url, html), reference_extract_html(url, html)
        assert (got.pairs, dict(got.reasons)) == (expected.pairs, dict(expected.reasons))
        assert got.pairs


def test_image_url_shortcuts_agree_with_the_plain_rule():
    rng = random.Random(9)
    pieces = ["a.jpg", "b", ",", " ", "\t", "1x", "2x", "320w", "1.5x", "w", ",,", "http://h/p,q.jpg", "100h",
              "640w", " 640w,", "data:x", "DATA:y", "\xa0", "0w", "9w ", "12w,", "٣w", "²w", " 5w, ", "(1, 2)"]
    names = ["src", "srcset", "data-src", "data-srcset", "data-lazy-srcset", "data-original", "alt"]
    for _ in range(30000):
        attributes = {rng.choice(names): "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
                      for _ in range(rng.randint(0, 3))}
        sources = tuple("".join(rng.choice(pieces) for _ in range(3)) for _ in range(rng.choice([0, 0, 0, 1, 2])))
        assert pick_image_url(attributes, sources) == reference_image_url(attributes, sources), (attributes, sources)


def test_whitespace_the_url_shortcut_must_strip_is_all_below_u3001():
    import sys

    assert max(c for c in range(sys.maxunicode + 1) if chr(c).isspace()) < 0x3001


def test_whitespace_but_the_space_is_unprintable():
    """The page loop's one check that alt texts are clean (clean_text would leave them as they are)."""
    import sys

    assert all(not chr(c).isprintable() for c in range(sys.maxunicode + 1) if chr(c).isspace() and c != 0x20)


def test_picture_sources_found_from_the_picture_as_the_query_finds_them():
    pictures = [
        '<picture><source srcset="a 100w"><source srcset="b 200w"><img src="c.jpg" alt="a heron on a post"></picture>',
        ('<picture><source srcset="a 100w"><img src="c.jpg" alt="a heron on a post"><source srcset="b 900w">'
         '<img src="d.jpg" alt="a heron on a second post"></picture>'),
        ('<picture><source srcset="a 100w"><picture><source srcset="n 500w"><img src="i.jpg" alt="inner heron here">'
         '</picture><source srcset="b 300w"><img src="o.jpg" alt="outer heron there"></picture>'),
        ('<picture><source srcset="a 100w"><picture><source srcset="n 500w"></picture>'
         '<img src="o.jpg" alt="outer heron there"></picture>'),
        ('<picture><div><source srcset="z 999w"></div><source><source srcset="">'
         '<img src="p.jpg" alt="a heron on a post"></picture>'),
        '<picture><svg><source srcset="s 700w"></svg><img src="q.jpg" alt="a heron on a post"></picture>',
        '<picture><img src="r.jpg" alt="a heron on a post"></picture><picture><source srcset="t 10w"></picture>',
    ]
    for body in pictures:
        html = f"<html><body>{body}</body></html>"
        got, expected = extract_html(PAGE, html), reference_extract_html(PAGE, html)
        assert (got.pairs, dict(got.reasons)) == (expected.pairs, dict(expected.reasons)), body


def test_the_page_loop_agrees_on_plain_pages_and_their_odd_cases():
    """Pages of rooted URLs and clean alt texts (the all-at-once checks), each with at most one odd image."""
    rng = random.Random(3)
    odd_srcs = ["/a b.jpg", "/a//b.jpg", "/a/./b.jpg", "/a#b", "/a;b", "/a?", "/a\x01b", "/ä.jpg", "a.jpg", "/a\x7fb",
                "https://h.example/x.jpg", "//h.example/y.jpg", " /lead.jpg", "/trail.jpg ", "/", "/q?x=1"]
    odd_alts = ["two  spaces here and more", " leading space in this alt", "trailing space in this alt ",
                "a\tcat sitting on the old mat", "a\ncat sitting on the old mat", "nbsp\xa0between words here",
                "soft\xadhyphen in a long enough alt", "", "logo", "IMG_0001.jpg", "The end. Of a long caption text"]
    for _ in range(600):
        images = [(f"/media/{rng.randrange(30)}.jpg", "a river stone in the light of morning") for _ in range(rng.randint(1, 8))]
        for _ in range(rng.choice([0, 1, 1, 2])):
            k = rng.randrange(len(images))
            src, alt = images[k]
            images[k] = (rng.choice(odd_srcs) if rng.random() < 0.5 else src, rng.choice(odd_alts) if rng.random() < 0.6 else alt)
        body = "".join(f'<p><img src="{src}" alt="{alt}"></p>' for src, alt in images)
        html = f"<html><head></head><body>{body}</body></html>"
        page = rng.choice([PAGE, "https://Ex.COM", "http://ex.com/a/./b/c.html"])
        got, expected = extract_html(page, html), reference_extract_html(page, html)
        assert (got.pairs, dict(got.reasons)) == (expected.pairs, dict(expected.reasons)), html


# -- odd markup: the page loop sees what the rules one by one see -------------------------------------------


def agrees(html: str | bytes, url: str = PAGE):
    """The page's extraction, checked against the rules applied one by one to selectolax's nodes."""
    got, expected = extract_html(url, html), reference_extract_html(url, html)
    assert (got.pairs, dict(got.reasons)) == (expected.pairs, dict(expected.reasons)), html
    return got


def urls(extraction) -> list[str]:
    return [p.url.removeprefix("http://example.org") for p in extraction.pairs]


def test_attribute_names_in_any_case_predefined_or_not():
    """Lexbor keeps a few attribute names (src, alt) in a table and hashes the rest (data-src, srcset), lower-cased."""
    html = ('<img SRC="/a.jpg" ALT="a red kite over the hill">'
            '<img src="data:,x" DATA-SRC="/b.jpg" alt="a blue kite over the sea">'
            '<img src="/c0.jpg" data-Lazy-Src="/c.jpg" Alt="a green kite">'
            '<img src="/d.jpg" SrcSet="/d1.jpg 100w, /d2.jpg 200w" alt="a yellow kite in the rain">'
            '<img src="/e.jpg" data-src-x="/no1.jpg" xdata-src="/no2.jpg" data-sr="/no3.jpg" data-srcset-="/no4.jpg" '
            'alt="an orange kite with look-alike attributes">'
            '<img src="/f.jpg" data-srcset alt="a kite whose data-srcset has no value">'
            '<img data-hi-res-src="/g.jpg" data-echo="/h.jpg" alt="a kite with two lazy attributes">'
            '<img data-url=" /i.jpg " alt="a kite with spaces around its URL">'
            '<img src="/j.jpg" data-original="" alt="a kite with an empty lazy attribute">'
            '<img src="/k.jpg" data-lazy-srcset="/k1.jpg 10w, /k2.jpg 5w" alt="a kite with a lazy srcset">'
            '<img src="/l.jpg" dätä-src="/no5.jpg" data-src\u00e9="/no6.jpg" alt="a kite with non-ASCII names">')
    got = agrees(html)
    assert urls(got) == ["/a.jpg", "/b.jpg", "/c.jpg", "/d2.jpg", "/e.jpg", "/f.jpg", "/h.jpg", "/i.jpg", "/j.jpg",
                         "/k1.jpg", "/l.jpg"]
    assert got.pairs[2].caption == "a green kite"


def test_duplicate_attributes_keep_the_first_as_the_parser_does():
    html = ('<img src="/a.jpg" src="/b.jpg" alt="the first alt text" ALT="the second alt text">'
            '<img src="data:,x" data-src="/c.jpg" DATA-SRC="/d.jpg" data-src="/e.jpg" alt="a lazy duplicate">'
            '<img src src="/f.jpg" alt="an empty first src">')
    got = agrees(html)
    assert [(url, p.caption) for url, p in zip(urls(got), got.pairs)] == [
        ("/a.jpg", "the first alt text"), ("/c.jpg", "a lazy duplicate")]
    assert dict(got.reasons) == {"invalid_url": 1}


def test_images_where_the_parser_puts_them():
    """A <template>'s content is no part of the tree; an <img> breaks out of <svg>; <image> is an <img>."""
    html = ('<template><img src="/t.jpg" alt="inside a template"></template>'
            '<svg><image href="/s.jpg"/><img src="/s2.jpg" alt="an img breaks out of svg"></svg>'
            '<math><mi><img src="/m.jpg" alt="an img in a math text"></mi></math>'
            '<svg><foreignObject><img src="/f.jpg" alt="an img in a foreign object"></foreignObject></svg>'
            '<noscript><img src="/n.jpg" alt="an img in noscript"></noscript>'
            '<image src="/i.jpg" alt="an image tag becomes img">'
            '<div><template><p><img src="/t2.jpg" alt="deeper in a template"></p></template></div>'
            '<table><tr><img src="/ft.jpg" alt="fostered out of a table"></tr></table>'
            '<figure><svg><figcaption>an svg figcaption</figcaption></svg><img src="/fg.jpg" alt="">'
            '<figcaption>the figure caption</figcaption></figure>')
    got = agrees(html)
    assert urls(got) == ["/s2.jpg", "/m.jpg", "/f.jpg", "/n.jpg", "/i.jpg", "/ft.jpg", "/fg.jpg"]


def test_figure_captions_near_and_far():
    """The first <figcaption> of a figure, found by a walk of its first 65 nodes, else by the rule's query."""
    def spans(n: int) -> str:
        return "".join(f"<span>{i}</span>" for i in range(n))

    html = (f'<figure><img src="/a.jpg" alt="">{spans(80)}<figcaption>far down a large figure</figcaption></figure>'
            f'<figure><img src="/b.jpg" alt="">{spans(62)}<figcaption>the 65th node of its figure</figcaption></figure>'
            f'<figure><img src="/c.jpg" alt="">{spans(63)}<figcaption>the 66th node of its figure</figcaption></figure>'
            f'<figure><img src="/d.jpg" alt="">{spans(70)}</figure>'
            '<figure><img src="/e.jpg" alt=""><!-- a comment --> text <figcaption>after a comment</figcaption></figure>'
            '<figure><img src="/f.jpg" alt=""></figure>'
            '<figure><figcaption>the first one</figcaption><img src="/g.jpg" alt=""><figcaption>second</figcaption></figure>'
            '<figure><p><figcaption>nested in a paragraph</figcaption></p><img src="/h.jpg" alt=""></figure>'
            '<figure><div><div><div><div><div><div><div><img src="/i.jpg" alt=""></div></div></div></div></div></div>'
            '</div><figcaption>eight levels up: too far</figcaption></figure>'
            '<figure><div><div><div><div><div><img src="/j.jpg" alt=""></div></div></div></div></div>'
            '<figcaption>six levels up</figcaption></figure>'
            '<figure><template><figcaption>in a template</figcaption></template><img src="/k.jpg" alt=""></figure>')
    got = agrees(html)
    assert [(url, p.caption) for url, p in zip(urls(got), got.pairs)] == [
        ("/a.jpg", "far down a large figure"), ("/b.jpg", "the 65th node of its figure"),
        ("/c.jpg", "the 66th node of its figure"), ("/e.jpg", "after a comment"), ("/g.jpg", "the first one"),
        ("/h.jpg", "nested in a paragraph"), ("/j.jpg", "six levels up")]


def test_a_page_of_many_images():
    rng = random.Random(17)
    body = "".join(f'<p><img src="/m/{rng.randrange(3000)}.jpg" alt="picture number {i} of the river"></p>'
                   f'{"<figure><img alt=IMG_1.JPG><figcaption>a figure of the river</figcaption></figure>" if i % 97 == 0 else ""}'
                   for i in range(5000))
    got = agrees(f"<html><body>{body}</body></html>")
    assert len(got.pairs) + got.reasons["dup_in_page"] + got.reasons["invalid_url"] == 5000 + 52


def test_images_the_plain_rules_take_mid_page():
    """Each shape the page loop's shortcuts hand to the plain rules, between plain images, and all on one page."""
    plain = '<p><img src="/p{0}.jpg" alt="a plain picture number {0}"></p>'
    odd = ['<picture><source srcset="/s.webp 800w"><img src="/q.jpg" alt="a picture element"></picture>',
           '<picture><img src="/q2.jpg" alt="a picture element without sources"></picture>',
           '<img srcset="/x1.jpg 1x, /x2.jpg 2x" alt="densities in a srcset">',
           '<img src="/r.jpg" data-srcset="/r1.jpg 100w, data:,z 900w" alt="a lazy srcset">',
           '<img srcset="data:,a 900w, /y.jpg 10w" alt="a data URI in a srcset">',
           '<figure><div><img src="/f.jpg" alt=""></div><figcaption> a   figure <b>caption</b> </figcaption></figure>',
           '<figure><img src="/f2.jpg" alt="logo"></figure>',
           '<img src=" data:image/gif;base64,R0l" alt="a data URI after a space">',
           '<img src="\u3000/w.jpg" alt="an ideographic space first">',
           '<img src="Data:,x" data-src="/ds.jpg" alt="a data URI in capitals">',
           '<img src="/u.jpg" alt="IMG_0001.JPG">',
           '<img src="javascript:void(0)" alt="a script URL">',
           '<img src="../up.jpg?x=1#frag" alt="a relative URL with a query">',
           '<img src="/p3.jpg" alt="the same URL again, later">',
           '<img src="/é.jpg" alt="café crème brûlée on a table">',
           '<img alt="no URL at all, anywhere">']
    for piece in odd:
        agrees("".join(plain.format(i) for i in range(5)) + piece + "".join(plain.format(i) for i in range(5, 10)))
    mixed = "".join(plain.format(i) + piece for i, piece in enumerate(odd))
    got = agrees(mixed)
    assert len(got.pairs) > len(odd) and {"figcaption", "alt"} == {p.caption_source for p in got.pairs}


def test_bytes_the_parser_passes_through_read_as_selectolax_reads_them():
    """Lexbor keeps bytes that are not UTF-8 as they are: selectolax reads them as U+FFFD."""
    html = (b'<img src="/a\xff.jpg" alt="caf\xe9 au lait on a table">'
            b'<img src="/b.jpg" alt="\xc3\x28 a broken sequence first">'
            b'<img src="/c.jpg" data-src="/c\xed\xa0\x80.jpg" alt="a surrogate in a lazy URL">'
            b'<img src="/d\x00.jpg" alt="a NUL \x00 in both">'
            b'<img src="/e.jpg" d\xffata-src="/no.jpg" alt="a bad byte in a name">')
    got = agrees(html)
    assert "\ufffd" in got.pairs[0].caption and len(got.pairs) == 5


def test_random_attributes_agree():
    """Random images of every attribute the rules read, in any case, repeated, valued or not."""
    rng = random.Random(41)
    names = ["src", "SRC", "Src", "alt", "ALT", "srcset", "SRCSET", "data-src", "DATA-SRC", "data-lazy-src",
             "data-original", "data-lazy", "data-url", "data-echo", "data-hi-res-src", "data-srcset",
             "data-lazy-srcset", "Data-Lazy-Srcset", "class", "width", "sizes", "loading", "data-x", "title"]
    values = ["/a.jpg", "b.jpg", " /c.jpg ", "", "data:,x", "DATA:,y", "/d.jpg 100w, /e.jpg 200w", "/f.jpg 2x",
              "a red kite over the hill", "IMG_1.JPG", "logo", "\xa0/g.jpg", "https://cdn.example.net/h.jpg", None]
    for _ in range(400):
        images = []
        for _ in range(rng.randint(1, 12)):
            attributes = []
            for _ in range(rng.randint(0, 6)):
                name, value = rng.choice(names), rng.choice(values)
                attributes.append(name if value is None else f'{name}="{value}"')
            img = f"<img {' '.join(attributes)}>"
            roll = rng.random()
            if roll < 0.1:
                img = f'<picture><source srcset="{rng.choice(values) or ""}">{img}</picture>'
            elif roll < 0.2:
                img = f"<figure><div>{img}</div><figcaption>{rng.choice(values) or ''}</figcaption></figure>"
            elif roll < 0.25:
                img = f"<template>{img}</template>"
            images.append(img)
        agrees(f"<html><body>{''.join(images)}</body></html>")
