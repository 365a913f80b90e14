"""Crawl: pages parsed per second per core on WARC input, against the parser's own limit.

The issue's bar: our WARC → pairs path, on one process, runs at >= 80% of a plain
single-threaded loop that reads the same records and parses them with the same HTML
parser (Lexbor via selectolax) and nothing else — the speed any extractor built on
that parser could reach. The loops over the same file, in this one process:

* **read**: crawl/'s WARC reader (gunzip, record headers) and HTTP split, nothing else;
* **parse**: read, then ``LexborHTMLParser(body).tags("img")`` and nothing else: the
  parser's own cost, below which no extractor on it can go;
* **plain** (the limit): read, then ``LexborHTMLParser(body).tags("img")`` (the fastest
  way Lexbor lists elements; ``css("img")`` costs more) and each ``<img>``'s ``src`` and
  ``alt`` read: the same records, the same parser, nothing else;
* **ours**: what one Ray task of ``python -m crawl --warc`` runs for one file
  (``crawl.archive.crawl_warc_file``): read, the page checks (status, X-Robots-Tag,
  byte cap, content type, binary sniff, charset), the parse, the rules of
  ``crawl/extract.py`` (``<base>``, meta robots, srcset and lazy attributes, figure
  captions, caption rules, URL resolution, dedupe) and the parquet part, written;
* **ours_wat** (``--wat false`` drops it): the same task over a WAT file of the same
  pages (``write_wat``: one ``metadata`` record per page, its JSON shaped like Common
  Crawl's — WARC and HTTP headers, ``<head>`` metadata, every ``<a>`` and image URL
  attribute as a link entry with its alt text): no HTML parse, the image rules over
  the link entries (``crawl.extract.extract_wat``). Pages per CPU-second here are the
  WAT records' own; the WAT holds fewer pairs (no figure captions).

The ratio is plain's CPU time over ours (``time.process_time``: the machine may be
shared, and other jobs' time is not ours), per round; a round runs the loops
once each, in an order that alternates (read, parse, plain, ours, ...; then the
reverse) so that drift in the machine's load falls on both sides alike. The summary
gives the median of the per-round ratios (the figure quoted), their range, the ratio
of each loop's best round, the wall-time ratio, where the time goes (µs per page:
reading, parse, ``<img>`` attributes, our extra) and the ratio against parse alone.
After the rounds, ``--page_by_page`` passes (2) run the loops page by page instead
(``page_by_page``: each record handed to every loop in a rotating order, reading timed
once): a steadier figure where the machine's speed drifts between whole loops. The pages are synthetic but shaped like real ones (``--page_kb`` of HTML each, with navigation, scripts, text, 20-ish
images in the usual mix of plain, srcset, lazy, figure and junk forms, ~150 links),
written once with warcio into ``--workdir``, one gzip member per record.

    .venv/bin/python -m bench.crawl_parse --repeat 21      # 2,000 pages of ~50 KB (BENCHMARKS.md)
    .venv/bin/python -m bench.crawl_parse --page_kb 5      # small pages: fixed costs weigh more
"""

from __future__ import annotations

import argparse
import io
import json
import os

# One thread for numpy's BLAS (imported with the parquet writer), as Ray sets it for a one-CPU task:
# its idle threads would otherwise spin now and then, and process time counts every thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import random
import statistics
import time
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

from bench.measure import save_result
from crawl.warc import http_payload, iter_warc

REPO = Path(__file__).resolve().parents[1]
# English, with the non-ASCII that English pages carry too (an accent, typographic apostrophes and
# dashes; ~2% of the bytes): the UTF-8 check does not stop at the first non-ASCII byte, as on most pages.
WORDS = ["river", "stone", "light", "garden", "market", "winter", "harbour", "small", "old", "city", "red", "blue", "green", "bright", "quiet", "morning", "street", "house", "bridge", "tower", "field", "forest", "window", "market", "evening", "coffee", "table", "paper", "summer", "yellow", "café", "it’s", "—"]
PAGES_VERSION = 2  # in the WARC's file name: bump when the pages change (1: ASCII only)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _image(rng: random.Random, page: int, k: int) -> str:
    src = f"/media/{page}/{k}.jpg"
    alt = _words(rng, rng.randint(3, 9))
    roll = rng.random()
    if roll < 0.45:
        return f'<img src="{src}" alt="{alt}" width="640" height="480">'
    if roll < 0.65:
        return (f'<img src="{src}" srcset="/media/{page}/{k}-320.jpg 320w, /media/{page}/{k}-640.jpg 640w, '
                f'/media/{page}/{k}-1280.jpg 1280w" sizes="(max-width: 640px) 100vw, 640px" alt="{alt}">')
    if roll < 0.80:
        return (f'<img class="lazyload" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="{src}" '
                f'alt="{alt}"><noscript><img src="{src}" alt="{alt}"></noscript>')
    if roll < 0.90:
        return f'<figure class="wp-block-image"><img src="{src}" alt=""><figcaption>{alt}</figcaption></figure>'
    return f'<img src="{src}" alt="{rng.choice(["logo", "image", "IMG_4032.JPG", ""])}">'


def synthetic_page(rng: random.Random, page: int, target_bytes: int) -> bytes:
    nav = "".join(f'<li><a href="/section/{rng.randrange(500)}.html">{_words(rng, 2)}</a></li>' for _ in range(60))
    head = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>' + _words(rng, 6) + '</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="stylesheet" href="/css/site.css"><script>window.dataLayer=window.dataLayer||[];'
            + "function f(a,b){return a+b};" * 40 + "</script></head>")
    parts = [head, f'<body><header><nav><ul>{nav}</ul></nav></header><main><article>']
    images = max(2, round(rng.randint(12, 28) * target_bytes / 51200))  # ~20 per 50 KiB, as on real pages
    size = sum(map(len, parts))
    k = 0
    while size < target_bytes - 2000:
        block = f"<p>{_words(rng, rng.randint(30, 90))} <a href=\"/post/{rng.randrange(10**5)}.html\">more</a></p>"
        if k < images and rng.random() < 0.5:
            block += _image(rng, page, k)
            k += 1
        parts.append(block)
        size += len(block)
    while k < images:
        parts.append(_image(rng, page, k))
        k += 1
    footer = "".join(f'<a href="https://partner{rng.randrange(40)}.example/">{_words(rng, 2)}</a>' for _ in range(30))
    parts.append(f"</article></main><footer>{footer} © {2000 + page % 26}</footer></body></html>")
    return "".join(parts).encode()


def write_pages(path: Path, pages: int, page_kb: int, seed: int) -> int:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    total = 0
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for page in range(pages):
            body = synthetic_page(rng, page, page_kb * 1024)
            total += len(body)
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                f"https://site{page % 97}.example/articles/{page}.html", "response", payload=io.BytesIO(body),
                http_headers=http))
    return total


def write_wat(warc: Path, path: Path) -> None:
    """A WAT of ``warc``'s pages: per response, the metadata record Common Crawl would write (what the crawl reads)."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for record in iter_warc(str(warc), 10_000_000):
            if record.type != "response":
                continue
            payload = http_payload(record.block, 10_000_000)
            tree = LexborHTMLParser(payload.body)
            links = [{"path": "A@/href", "url": a.attributes.get("href") or "", "text": a.text(deep=True)}
                     for a in tree.css("a[href]")]
            for img in tree.tags("img"):
                attributes = img.attributes
                links += [{"path": f"IMG@/{name}", "url": value, "alt": attributes.get("alt") or ""}
                          for name, value in attributes.items() if name in ("src", "srcset", "data-src") and value]
            head = {"Title": tree.css_first("title").text(), "Metas": [
                {"name": m.attributes.get("name"), "content": m.attributes.get("content")}
                for m in tree.css("meta[name]")], "Link": [{"path": "LINK@/href", "url": "/css/site.css"}]}
            envelope = {"Envelope": {
                "Format": "WARC", "WARC-Header-Length": "300", "Block-Digest": "sha1:" + "A" * 32,
                "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": record.target_uri,
                                         "WARC-Date": "2026-12-07T00:00:00Z", "Content-Length": str(len(record.block))},
                "Payload-Metadata": {"Actual-Content-Type": "application/http; msgtype=response",
                                     "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": str(payload.status), "Version": "HTTP/1.1", "Reason": "OK"},
                    "Headers": dict(payload.headers), "Headers-Length": "80",
                    "Entity-Length": str(len(payload.body)),
                    "HTML-Metadata": {"Head": head, "Links": links}}}}}
            writer.write_record(writer.create_warc_record(
                record.target_uri, "metadata", payload=io.BytesIO(json.dumps(envelope).encode()),
                warc_content_type="application/json"))


def each_page(path: str, page) -> int:
    """``page(record)`` for each response record of ``path``: the read, parse and plain loops."""
    pages = 0
    for record in iter_warc(path, 10_000_000):
        if record.type != "response":
            continue
        page(record)
        pages += 1
    return pages


def read_page(record) -> None:
    """The reading every loop shares: crawl/'s WARC reader (in ``each_page``) and HTTP split."""
    http_payload(record.block, 10_000_000)


def parse_page(record) -> None:
    LexborHTMLParser(http_payload(record.block, 10_000_000).body).tags("img")


def plain_page(record) -> None:
    """One record of the limit: its HTTP body parsed, each ``<img>``'s ``src`` and ``alt`` read."""
    for img in LexborHTMLParser(http_payload(record.block, 10_000_000).body).tags("img"):  # faster than css()
        attributes = img.attributes
        attributes.get("src"), attributes.get("alt")


def our_loop(path: str, out: str) -> int:
    """What one Ray task of ``python -m crawl --warc`` runs for one file."""
    from core.config import from_dict
    from crawl.archive import crawl_warc_file
    from crawl.config import CrawlConfig
    from crawl.output import CrawlStats, PairWriter

    cfg = from_dict(CrawlConfig, {"warc": [path], "output_folder": out, "distributor": "inline"})
    stats = CrawlStats()
    writer = PairWriter(f"{out}/part.parquet")
    crawl_warc_file(path, cfg, writer, stats)
    writer.close()
    return stats.pages_parsed


def page_by_page(path: str, out: str, passes: int) -> dict:
    """The loops page by page: each record handed to parse, plain and ours in a rotating order.

    A steadier measure on a shared machine than whole loops: a change in the machine's
    speed falls on every loop within microseconds, not seconds. Reading is shared: timed
    once per record and counted for every loop. The part files are written and closed as
    in ``our_loop`` (their close counted too).
    """
    from core.config import from_dict
    from crawl.archive import HTTP_HEADER_ALLOWANCE, take_record
    from crawl.config import CrawlConfig
    from crawl.output import CrawlStats, PairWriter

    cfg = from_dict(CrawlConfig, {"warc": [path], "output_folder": out, "distributor": "inline"})
    directives = cfg.directives()
    ours = ["ours"]
    names = ["parse", "plain", *ours]
    orders = [names[k:] + names[:k] for k in range(len(names))]
    orders += [order[::-1] for order in orders]
    cpu = dict.fromkeys(["read", *names], 0.0)
    clock, pages = time.process_time, 0
    for _ in range(passes):
        writers = {name: PairWriter(f"{out}/part-{name}.parquet") for name in ours}
        stats = {name: CrawlStats() for name in ours}
        records = iter_warc(path, cfg.max_page_bytes + HTTP_HEADER_ALLOWANCE)
        while True:
            start = clock()
            record = next(records, None)
            cpu["read"] += clock() - start
            if record is None:
                break
            if record.type != "response":
                continue
            for name in orders[pages % len(orders)]:
                if name == "parse":
                    start = clock()
                    parse_page(record)
                elif name == "plain":
                    start = clock()
                    plain_page(record)
                else:
                    start = clock()
                    take_record(record, cfg, directives, writers[name], stats[name])
                cpu[name] += clock() - start
            pages += 1
        for name, writer in writers.items():
            start = clock()
            writer.close()
            cpu[name] += clock() - start
    us = {name: round(c / pages * 1e6, 1) for name, c in cpu.items()}
    return {"passes": passes, "us_per_page": us,
            **{f"ratio_{name}": round((cpu["read"] + cpu["plain"]) / (cpu["read"] + cpu[name]), 3) for name in ours},
            "ratio_ours_to_parse": round((cpu["read"] + cpu["parse"]) / (cpu["read"] + cpu["ours"]), 3)}


def timed(fn, *args) -> tuple[int, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    pages = fn(*args)
    return pages, time.process_time() - cpu, time.perf_counter() - wall


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crawl_parse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--page_kb", type=int, default=50, help="HTML per page, in KiB")
    parser.add_argument("--repeat", type=int, default=11, help="rounds (each runs every loop once)")
    parser.add_argument("--page_by_page", type=int, default=2,
                        help="passes of the page-by-page measure after the rounds (see page_by_page; 0: none)")
    parser.add_argument("--wat", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="also time ours over a WAT of the same pages (ours_wat; default true)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(REPO / "data" / "bench" / "crawl"))
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    warc = work / f"pages-{args.pages}x{args.page_kb}k-{args.seed}-v{PAGES_VERSION}.warc.gz"
    if not warc.exists():
        print(f"writing {args.pages} pages of ~{args.page_kb} KiB to {warc} ...", flush=True)
        write_pages(warc, args.pages, args.page_kb, args.seed)
    loops = {"read": (each_page, str(warc), read_page), "parse": (each_page, str(warc), parse_page),
             "plain": (each_page, str(warc), plain_page), "ours": (our_loop, str(warc), str(work))}
    if args.wat:
        wat = warc.with_name(warc.name.replace(".warc.gz", ".wat.gz"))
        if not wat.exists():
            print(f"writing the WAT of those pages to {wat} ...", flush=True)
            write_wat(warc, wat)
        loops["ours_wat"] = (our_loop, str(wat), str(work))
    for fn, *fn_args in loops.values():  # warm-up: imports, caches, the file in the page cache
        fn(*fn_args)
    load_before = os.getloadavg()
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    wall: dict[str, list[float]] = {name: [] for name in loops}
    pages = 0
    for round_ in range(args.repeat):
        for name in (list(loops) if round_ % 2 == 0 else list(reversed(loops))):
            fn, *fn_args = loops[name]
            pages, cpu_s, wall_s = timed(fn, *fn_args)
            cpu[name].append(cpu_s)
            wall[name].append(wall_s)
        ratio = cpu["plain"][-1] / cpu["ours"][-1]
        wat_rate = f", ours_wat {pages / cpu['ours_wat'][-1]:.0f}" if "ours_wat" in cpu else ""
        print(f"round {round_ + 1}: read {pages / cpu['read'][-1]:.0f}, parse {pages / cpu['parse'][-1]:.0f}, "
              f"plain {pages / cpu['plain'][-1]:.0f}, ours {pages / cpu['ours'][-1]:.0f}{wat_rate} pages/CPU-s: "
              f"ratio {ratio:.2f}", flush=True)
    ratios = [p / o for p, o in zip(cpu["plain"], cpu["ours"])]
    us = {name: _median([c / pages * 1e6 for c in values]) for name, values in cpu.items()}
    summary = {
        "pages": pages, "page_kb": args.page_kb, "warc_bytes": warc.stat().st_size, "rounds": args.repeat,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "pages_per_cpu_s_median": {name: round(pages / _median(values)) for name, values in cpu.items()},
        "pages_per_cpu_s_range": {name: [round(pages / max(values)), round(pages / min(values))]
                                  for name, values in cpu.items()},
        "ratio_cpu_median": round(_median(ratios), 3),
        "ratio_cpu_range": [round(min(ratios), 3), round(max(ratios), 3)],
        # On a shared machine the best round of each loop is the least disturbed one.
        "ratio_of_best": round(min(cpu["plain"]) / min(cpu["ours"]), 3),
        "ratio_wall_median": round(_median([p / o for p, o in zip(wall["plain"], wall["ours"])]), 3),
        "us_per_page_median": {"reading": round(us["read"], 1), "parse": round(us["parse"] - us["read"], 1),
                               "img_attributes": round(us["plain"] - us["parse"], 1),
                               "our_extra": round(us["ours"] - us["plain"], 1)},
        "ratio_to_parse_cpu_median": round(_median([p / o for p, o in zip(cpu["parse"], cpu["ours"])]), 3),
        **({"wat_bytes": wat.stat().st_size,
            "wat_over_warc_cpu_median": round(_median([o / w for o, w in zip(cpu["ours"], cpu["ours_wat"])]), 3)}
           if args.wat else {}),
        "cpu_s": {name: [round(c, 4) for c in values] for name, values in cpu.items()},
    }
    if args.page_by_page:
        summary["page_by_page"] = page_by_page(str(warc), str(work), args.page_by_page)
        print(f"page by page: {summary['page_by_page']}", flush=True)
    save_result(f"crawl_parse_{args.page_kb}k", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
