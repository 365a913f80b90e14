"""Seed crawls against real servers on loopback: ground truth, politeness, hostile hosts, Ray.

The demo web's pages are crawled and the output compared with the page generator's
ground truth; the server's access log proves the crawl polite: robots.txt fetched
once and first, nothing under the disallowed path requested, no two requests to the
host closer than the delay. A small in-thread server plays the hosts that misbehave
(robots.txt failing, asking for long delays, redirect loops, hanging).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from core.config import ConfigError, DataError, from_dict
from crawl.config import CrawlConfig
from crawl.politeness import HostScheduler
from crawl.run import run_crawl
from infra.local.pages import START_PAGE, load_truth, write_warc

DELAY_S = 0.25


def crawl(output, **options):
    cfg = from_dict(CrawlConfig, {"output_folder": str(output), "distributor": "inline", "progress": False,
                                  "allow_networks": ["127.0.0.1/32", "::1/128"], "timeout": 3, **options})
    return run_crawl(cfg)


def output_pairs(folder) -> set:
    rows = [row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    return {(urlsplit(r["page_url"]).hostname, urlsplit(r["page_url"]).path, urlsplit(r["url"]).path, r["caption"],
             r["caption_source"]) for r in rows}


def expected(corpus_dir, host: str, max_depth: int, start: str = START_PAGE, start_depth: int = 0):
    """Pairs and reasons the demo web must give from ``start`` (at ``start_depth`` in the truth)."""
    page_rows, image_rows = load_truth(corpus_dir)
    depth = {r["path"]: r["depth"] - start_depth for r in page_rows}
    if start != START_PAGE:  # a deeper start reaches only its own chain: g4 -> d1 -> d2
        depth = {path: d for path, d in depth.items() if path in (start, "/web/deep/d1.html", "/web/deep/d2.html")}
    reached = {r["path"]: r["expected_reason"] for r in page_rows if r["path"] in depth and 0 <= depth[r["path"]] <= max_depth}
    parsed = {path for path, reason in reached.items() if reason is None}
    pairs = {(host, r["page_path"], r["image_path"], r["caption"], r["caption_source"])
             for r in image_rows if r["page_path"] in parsed and r["expected_reason"] is None}
    reasons = Counter(r["expected_reason"] for r in image_rows if r["page_path"] in parsed and r["expected_reason"])
    reasons.update(reason for reason in reached.values() if reason not in (None, "redirect"))
    return pairs, reasons, set(reached)


def access_log(corpus_dir, token: str) -> list[dict]:
    lines = (corpus_dir / "access.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if token in (r.get("user_agent") or "")]


def test_seed_crawl_matches_the_ground_truth_and_is_polite(small_corpus, tmp_path):
    corpus_dir, base_url = small_corpus
    token = f"crawl-test-{uuid.uuid4().hex[:8]}"
    stats = crawl(tmp_path / "out", seeds=[base_url + START_PAGE], max_depth=2, delay=DELAY_S, user_agent_token=token)
    pairs, reasons, reached = expected(corpus_dir, "127.0.0.1", max_depth=2)
    assert output_pairs(tmp_path / "out") == pairs and stats.pairs == len(pairs)
    assert Counter(stats.reasons) == reasons + Counter({"depth_limit": 1, "out_of_scope": 1})
    totals = json.loads((tmp_path / "out" / "_crawl_stats.json").read_text())
    assert totals["pairs"] == len(pairs) and totals["reasons"] == dict(stats.reasons)

    log = access_log(corpus_dir, token)
    paths = [r["path"] for r in log]
    assert paths[0] == "/robots.txt" and paths.count("/robots.txt") == 1  # once per host, before anything else
    assert not [p for p in paths if p.startswith("/web/private/") and p != "/web/private/open.html"]
    assert "/web/private/open.html" in paths  # allowed by the longer Allow rule
    assert len(paths) == len(set(paths))  # each page once (the fragment link to g1 included)
    assert set(paths) == reached - {"/web/private/p1.html"} | {"/robots.txt"}
    gaps = [b["time"] - a["time"] for a, b in zip(log, log[1:])]
    assert min(gaps) >= DELAY_S, f"two requests {min(gaps):.3f}s apart; the delay is {DELAY_S}s"
    assert all(r["user_agent"].startswith("webclip/") for r in log)


def test_ray_crawl_of_two_hosts_and_an_archive_in_one_run(small_corpus, tmp_path):
    corpus_dir, base_url = small_corpus
    port = urlsplit(base_url).port
    write_warc(tmp_path / "pages.warc.gz", corpus_dir / "site", base_url)
    token = f"crawl-ray-{uuid.uuid4().hex[:8]}"
    seeds = [base_url + START_PAGE, f"http://localhost:{port}/web/g4.html"]  # two host names: two workers
    stats = crawl(tmp_path / "out", seeds=seeds, warc=[str(tmp_path / "pages.warc.gz")], distributor="ray",
                  workers=2, max_depth=1, delay=DELAY_S, user_agent_token=token)
    from_ip, _, _ = expected(corpus_dir, "127.0.0.1", max_depth=1)
    from_name, _, _ = expected(corpus_dir, "localhost", max_depth=1, start="/web/g4.html", start_depth=1)
    parts = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert parts == ["seeds-00000.parquet", "seeds-00001.parquet", "warc-00000.parquet"]
    seeds_pairs = set()
    for name in parts[:2]:
        rows = pq.read_table(tmp_path / "out" / name).to_pylist()
        seeds_pairs |= {(urlsplit(r["page_url"]).hostname, urlsplit(r["page_url"]).path, urlsplit(r["url"]).path,
                         r["caption"], r["caption_source"]) for r in rows}
        assert len({urlsplit(r["page_url"]).hostname for r in rows}) == 1  # a host lives in one worker only
    assert seeds_pairs == from_ip | from_name
    warc_rows = pq.read_table(tmp_path / "out" / "warc-00000.parquet").num_rows
    assert stats.pairs == len(seeds_pairs) + warc_rows and warc_rows > len(from_ip)
    log = access_log(corpus_dir, token)
    assert [r["path"] for r in log].count("/robots.txt") == 2  # one per host name
    assert not [r for r in log if r["path"] == "/web/private/p1.html"]


# -- hosts that misbehave -------------------------------------------------------------------


class Site:
    """An aiohttp server on 127.0.0.1 in a background thread; ``routes`` maps a path to a handler."""

    def __init__(self, routes: dict):
        self.log: list[tuple[float, str]] = []
        self.hosts: list[str] = []  # the Host header of each request in ``log``
        self._routes = routes
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Site":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.run(self._main())  # cancels handlers still hanging when it stops

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        async def handle(request: web.Request) -> web.StreamResponse:
            self.log.append((time.time(), request.path_qs))
            self.hosts.append(request.host.rsplit(":", 1)[0])
            handler = self._routes.get(request.path)
            return await handler(request) if handler else web.Response(status=404)

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    @property
    def paths(self) -> list[str]:
        return [path for _, path in self.log]


def text(body: str, status: int = 200, content_type: str = "text/html", **headers):
    async def handler(request):
        return web.Response(text=body, status=status, content_type=content_type, headers=headers)
    return handler


PAGE = '<img src="/a.jpg" alt="a kingfisher on a branch"><a href="/p2.html">2</a><a href="/p3.html">3</a>'


def test_robots_txt_failures_follow_rfc_9309(tmp_path):
    with Site({"/robots.txt": text("busy", status=503), "/p1.html": text(PAGE)}) as site:
        stats = crawl(tmp_path / "a", seeds=[site.url + "/p1.html"], delay=0)
        assert site.paths == ["/robots.txt"] and stats.reasons == {"robots_unreachable": 1}
    with Site({"/p1.html": text(PAGE)}) as site:  # robots.txt 404: no rules, crawl freely
        stats = crawl(tmp_path / "b", seeds=[site.url + "/p1.html"], delay=0, max_depth=0)
        assert site.paths == ["/robots.txt", "/p1.html"] and stats.pairs == 1
    with Site({"/robots.txt": text("User-agent: *\nCrawl-delay: 100\n", content_type="text/plain"),
               "/p1.html": text(PAGE)}) as site:
        stats = crawl(tmp_path / "c", seeds=[site.url + "/p1.html"], delay=0, max_crawl_delay=30)
        assert site.paths == ["/robots.txt"] and stats.reasons == {"crawl_delay_too_long": 1}
    with Site({"/robots.txt": text("User-agent: webclip\nDisallow: /\n\nUser-agent: *\nAllow: /\n"),
               "/p1.html": text(PAGE)}) as site:  # a group naming us beats the * group
        stats = crawl(tmp_path / "d", seeds=[site.url + "/p1.html"], delay=0, obey_robots=True)
        assert site.paths == ["/robots.txt"] and stats.reasons == {"robots_disallowed": 1}


def test_a_robots_crawl_delay_slows_the_crawl(tmp_path):
    pages = {f"/p{i}.html": text(PAGE) for i in (1, 2, 3)}
    with Site({"/robots.txt": text("User-agent: *\nCrawl-delay: 0.4\n", content_type="text/plain"), **pages}) as site:
        stats = crawl(tmp_path / "out", seeds=[site.url + "/p1.html"], delay=0.05, max_depth=1)
        times = [t for t, _ in site.log]
    assert stats.pages_parsed == 3 and len(times) == 4
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.4


def test_hostile_pages_and_hosts_are_counted_never_crash(tmp_path):
    async def hang(request):
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def loop(request):
        raise web.HTTPFound("/loop")  # to itself: ends at its first repeat (dup_url)

    def hop_to(target: str):
        async def handler(request):
            raise web.HTTPFound(target)
        return handler

    async def to_blocked(request):
        raise web.HTTPFound("http://127.0.0.2:9/x.html")  # loopback, but outside 127.0.0.1/32

    links = "".join(f'<a href="{p}">x</a>' for p in ("/slow.html", "/loop", "/chain/0", "/blocked", "/noai.html",
                                                     "/moved", "/gone.html", "/pdf"))
    routes = {
        "/start.html": text(PAGE.replace('<a href="/p2.html">2</a><a href="/p3.html">3</a>', links)),
        "/slow.html": hang, "/loop": loop, "/blocked": to_blocked,
        "/noai.html": text(PAGE, **{"X-Robots-Tag": "noai"}),
        "/moved": text("", status=301, Location="/final.html"), "/final.html": text(PAGE),
        "/pdf": text("%PDF-1.4", content_type="application/pdf"),
        **{f"/chain/{i}": hop_to(f"/chain/{i + 1}") for i in range(10)},
    }
    with Site(routes) as site:
        stats = crawl(tmp_path / "out", seeds=[site.url + "/start.html", "http://10.1.2.3/private.html"], delay=0,
                      max_depth=2, timeout=1, max_redirects=3,
                      allowed_domains=["127.0.0.1", "127.0.0.2", "10.1.2.3"])
    assert stats.reasons["timeout"] == 1 and stats.reasons["too_many_redirects"] == 1 and stats.reasons["dup_url"] == 1
    assert stats.reasons["ssrf_blocked"] == 2  # the redirect target's host, and the private seed
    assert stats.reasons["opt_out"] == 1 and stats.reasons["not_html"] == 1 and stats.reasons["http_404"] >= 1
    assert stats.pairs == 2  # /start.html and /final.html (through its redirect)
    assert site.paths.count("/loop") == 1 and "/chain/3" in site.paths and "/chain/4" not in site.paths


def test_the_page_budget_holds(tmp_path):
    many = "".join(f'<a href="/n{i}.html">n</a>' for i in range(20))
    with Site({"/start.html": text(many), **{f"/n{i}.html": text("<p>a leaf</p>") for i in range(20)}}) as site:
        stats = crawl(tmp_path / "out", seeds=[site.url + "/start.html"], delay=0, max_pages=5, max_depth=3)
    assert len(site.paths) == 1 + 5  # robots.txt and five pages
    assert stats.links_followed == 5 and stats.reasons == {"page_limit": 16}  # the seed and 4 of 20 links fit


def linked_hosts(port: int) -> dict:
    """Pages on two host names of one server (127.0.0.1 and localhost), linking across: a1 → a2, b2;
    a2 → b1; b1 → a3, b2; b2 → a1; a3 → b3."""
    a, b = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    links = {"a1": [f"{a}/a2.html", f"{b}/b2.html"], "a2": [f"{b}/b1.html"], "b1": [f"{a}/a3.html", f"{b}/b2.html"],
             "b2": [f"{a}/a1.html"], "a3": [f"{b}/b3.html"], "b3": []}

    def page(name: str):
        async def handler(request):
            if request.host.startswith("localhost") != name.startswith("b"):  # a page lives on one host name
                return web.Response(status=404)
            body = f'<img src="/{name}.jpg" alt="the picture on page {name}">'
            body += "".join(f'<a href="{url}">x</a>' for url in links[name])
            return web.Response(text=body, content_type="text/html")
        return handler

    return {f"/{name}.html": page(name) for name in links}


def test_two_partitions_crawl_in_rounds_politely_each_url_once(tmp_path):
    with Site({}) as site:
        port = int(site.url.rsplit(":", 1)[1])
        site._routes.update(linked_hosts(port))
        seeds = [f"http://127.0.0.1:{port}/a1.html", f"http://localhost:{port}/b1.html"]
        stats = crawl(tmp_path / "out", seeds=seeds, distributor="processes", workers=2, delay=0.3, max_depth=3)
        requests = [(host, path, t) for host, (t, path) in zip(site.hosts, site.log)]
    assert stats.pairs == 6 and stats.pages_parsed == 6 and stats.links_followed == 6
    seen = [(host, path) for host, path, _ in requests]
    assert len(seen) == len(set(seen)) == 8  # six pages and two robots.txt, each once: across partitions, rounds
    for host in ("127.0.0.1", "localhost"):
        mine = [(path, t) for h, path, t in requests if h == host]
        assert mine[0][0] == "/robots.txt"
        assert min(b[1] - a[1] for a, b in zip(mine, mine[1:])) >= 0.3  # the delay holds across rounds too
    marker = json.loads((tmp_path / "out" / "seeds_stats.json").read_text())
    assert marker["workers"] == 2 and marker["rounds"] == 3 and marker["units"] == 4  # a1,b1 | a3 | b3
    for part in sorted((tmp_path / "out").glob("seeds-*.parquet")):
        assert len({urlsplit(r["page_url"]).hostname for r in pq.read_table(part).to_pylist()}) <= 1

    with Site({}) as site:  # the page budget is the crawl's, shared by the partitions
        port = int(site.url.rsplit(":", 1)[1])
        site._routes.update(linked_hosts(port))
        seeds = [f"http://127.0.0.1:{port}/a1.html", f"http://localhost:{port}/b1.html"]
        stats = crawl(tmp_path / "budget", seeds=seeds, distributor="processes", workers=2, delay=0, max_depth=3,
                      max_pages=4)
        pages = [path for path in site.paths if path != "/robots.txt"]
    assert sorted(pages) == ["/a1.html", "/a2.html", "/b1.html", "/b2.html"]
    assert stats.links_followed == 4 and stats.reasons["page_limit"] == 1  # a3, found over the budget


def test_a_unit_waits_the_delay_before_its_first_request_to_a_host():
    clock = {"now": 100.0}
    scheduler = HostScheduler(delay=1.0, clock=lambda: clock["now"], since=100.0)
    scheduler.push("a", "a1")
    assert scheduler.pop_ready() is None  # a request by another unit may have just ended
    assert scheduler.seconds_until_ready() == 1.0
    scheduler.set_delay("b", 3.0)  # a Crawl-delay learnt in an earlier round
    scheduler.push("b", "b1")
    clock["now"] = 101.0
    assert scheduler.pop_ready() == ("a", "a1") and scheduler.pop_ready() is None
    clock["now"] = 103.0
    assert scheduler.pop_ready() == ("b", "b1")
    clock["now"] = 200.0
    scheduler.push("c", "c1")  # a host first met long after the unit started: no wait
    assert scheduler.pop_ready() == ("c", "c1")


def test_the_former_option_names_still_run(tmp_path):
    cfg = from_dict(CrawlConfig, {"output_folder": str(tmp_path), "seeds": ["http://x/"], "processes_count": 3,
                                  "max_unit_retry": 1})
    assert (cfg.workers, cfg.max_retries, cfg.distributor) == (3, 1, "auto")


def test_config_errors_name_the_option(tmp_path):
    for options, words in (({}, "nothing to crawl"), ({"seeds": ["ftp://x/"]}, "seeds"),
                           ({"seeds": ["http://x/"], "delay": -1}, "delay"),
                           ({"seeds": ["http://x/"], "distributor": "spark"}, "distributor"),
                           ({"seeds": ["http://x/"], "allow_networks": ["nonsense"]}, "allow_networks")):
        with pytest.raises(ConfigError, match=words):
            from_dict(CrawlConfig, {"output_folder": str(tmp_path), **options})
    with pytest.raises(DataError, match="seed_file"):
        crawl(tmp_path / "x", seed_file=str(tmp_path / "missing.txt"))

