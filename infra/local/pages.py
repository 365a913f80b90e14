"""The demo web's HTML pages: the corpus's images, linked the ways real pages link them.

The crawler (``python -m crawl``) is tested against these pages as ingest is against
the images: each page plants one or more things a crawler must get right, and the
ground truth says, for every ``<img>`` and every page, what must come of it.

Planted, under ``/web/`` (depth = link hops from ``/web/index.html``):

* alt texts (HTML-escaped), relative URLs (``../img/x.jpg``), a ``<base href>`` that
  relative image *and* link URLs resolve against, ``srcset`` with three widths and
  with densities (the largest must win), lazy images (``data-src``,
  ``data-lazy-src``, ``data-original``, ``data-srcset`` behind a ``data:``
  placeholder), a ``<noscript>`` fallback repeating a lazy image (``dup_in_page``),
  ``<figure>``/``<figcaption>`` (the caption when the alt says nothing; the alt
  when it does), inline ``data:`` images (``data_uri``), a ``javascript:`` src
  (``unsupported_scheme``) and alt texts that say nothing ("image", "logo",
  "IMG_1234.jpg", none at all: ``alt_meaningless``);
* malformed but repairable HTML (unclosed and mismatched tags, upper-case tags,
  unquoted attributes, a repeated attribute), whose images must still be found;
* a Latin-1 page declared by ``<meta charset>`` and a windows-1252 page declared
  only by its HTTP header, with accented captions;
* pages that yield no pairs, each for its reason: an opt-out ``<meta name=robots
  content=noai>``, binary junk served as text/html, an image served under a page
  name, an oversized page (2.5 MB), an undecodable one (a UTF-16 byte-order mark
  before invalid UTF-16), a missing one (404);
* a redirect to a gallery, a chain of pages two and three hops deep, links leaving
  the site (out of scope, never to be requested);
* ``/robots.txt`` disallowing ``/web/private/`` (whose page links images too) but
  allowing ``/web/private/open.html``, and shutting out another crawler entirely.

Outputs: the page files and ``robots.txt`` under ``site/`` with their routes
(returned, for ``routes.json``), and two ground-truth tables beside the corpus's:
``crawl_pages.parquet`` (path, depth, robots_allowed, expected_reason: null for a
page whose images are read, ``redirect`` for a redirect) and ``crawl_images.parquet``
(page_path, image_path, caption, caption_source, expected_reason: null for a pair).
Paths only, no host: the port may change between runs. ``write_warc`` archives the
pages as WARC response records, for the crawler's archive tests.
"""

from __future__ import annotations

import html
import io
import json
import os
import random
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PAGES_TRUTH = "crawl_pages.parquet"
IMAGES_TRUTH = "crawl_images.parquet"
START_PAGE = "/web/index.html"
ROBOTS_TXT = """\
# The demo web's robots.txt (RFC 9309): the longest matching rule wins.
User-agent: otherbot
Disallow: /

User-agent: *
Disallow: /web/private/
Allow: /web/private/open.html
"""
OVERSIZED_BYTES = 2_500_000  # above the crawler's default page cap (2 MB)
PIXEL = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEKAAEALAAAAAABAAEAAAICTAEAOw=="

PAGES_SCHEMA = pa.schema([("path", pa.string()), ("depth", pa.int32()), ("robots_allowed", pa.bool_()),
                          ("expected_reason", pa.string())])
IMAGES_SCHEMA = pa.schema([("page_path", pa.string()), ("image_path", pa.string()), ("caption", pa.string()),
                           ("caption_source", pa.string()), ("expected_reason", pa.string())])


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


class _Images:
    """Hands out the corpus's images in list order, cycling if the corpus is small."""

    def __init__(self, images: list[tuple[str, str]]):
        self._images = images
        self._next = 0

    def take(self) -> tuple[str, str]:
        image = self._images[self._next % len(self._images)]
        self._next += 1
        return image


@dataclass
class _Page:
    path: str
    depth: int
    title: str
    head: str = ""
    body: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    robots_allowed: bool = True
    expected_reason: str | None = None

    def add(self, markup: str, image_path: str | None, caption: str | None, source: str | None,
            reason: str | None = None) -> None:
        """One ``<img>`` (in ``markup``) and what must come of it."""
        self.body.append(markup)
        self.images.append({"page_path": self.path, "image_path": image_path, "caption": caption,
                            "caption_source": source, "expected_reason": reason})

    def plain(self, images: _Images, count: int) -> None:
        for _ in range(count):
            path, caption = images.take()
            self.add(f'<img src="{path}" alt="{_attr(caption)}" width="320">', path, caption, "alt")

    def link(self, href: str, text: str) -> None:
        self.body.append(f'<a href="{_attr(href)}">{html.escape(text)}</a>')

    def render(self, encoding: str = "utf-8", declare: bool = True) -> bytes:
        """The page in ``encoding``, declared by a ``<meta charset>`` or (``declare=False``) not at all."""
        head = f'<meta charset="{encoding}">' if declare else ""
        text = (f"<!doctype html>\n<html><head>{head}<title>{self.title}</title>{self.head}</head>\n<body>\n"
                + "\n".join(self.body) + "\n</body></html>\n")
        return text.encode(encoding)


def _gallery_basics(page: _Page, images: _Images) -> None:
    """g1: plain, relative, srcset (widths and densities), duplicates, meaningless alts, data: and javascript:."""
    page.plain(images, 1)
    first_path, first_caption = page.images[0]["image_path"], page.images[0]["caption"]
    path, caption = images.take()
    page.add(f'<p><img src="..{path}" alt="{_attr(caption)}"></p>', path, caption, "alt")
    (small, _), (medium, _), (large, large_caption) = images.take(), images.take(), images.take()
    page.add(f'<img src="{small}" srcset="{small} 320w, {large} 1280w, {medium} 640w" '
             f'sizes="(max-width: 600px) 320px, 1280px" alt="{_attr(large_caption)}">', large, large_caption, "alt")
    (one_x, _), (two_x, two_x_caption) = images.take(), images.take()
    page.add(f'<img src="{one_x}" srcset="{one_x} 1x, {two_x} 2x" alt="{_attr(two_x_caption)}">',
             two_x, two_x_caption, "alt")
    page.add(f'<img src="{first_path}" alt="{_attr(first_caption)}">', first_path, None, None, "dup_in_page")
    for alt in ("image", "logo", "IMG_1234.jpg", None):
        path, _ = images.take()
        alt_markup = f' alt="{alt}"' if alt is not None else ""
        page.add(f'<img src="{path}"{alt_markup}>', path, None, None, "alt_meaningless")
    page.add(f'<img src="{PIXEL}" alt="a tiny inline pixel">', None, None, None, "data_uri")
    page.add('<img src="javascript:void(0)" alt="a scripted picture">', None, None, None, "unsupported_scheme")


def _gallery_lazy(page: _Page, images: _Images) -> None:
    """g2: a <base href="/img/">, lazy attributes, a <noscript> repeat, figures."""
    page.head = '<base href="/img/">'
    def name(path: str) -> str:  # relative to the <base>
        return path.rsplit("/", 1)[-1]

    path, caption = images.take()
    page.add(f'<img src="{name(path)}" alt="{_attr(caption)}">', path, caption, "alt")
    lazy_path, lazy_caption = images.take()
    page.add(f'<img class="lazyload" src="{PIXEL}" data-src="{lazy_path}" alt="{_attr(lazy_caption)}" '
             'loading="lazy">', lazy_path, lazy_caption, "alt")
    page.add(f'<noscript><img src="{lazy_path}" alt="{_attr(lazy_caption)}"></noscript>', lazy_path, None, None,
             "dup_in_page")
    path, caption = images.take()
    page.add(f'<img data-lazy-src="{name(path)}" alt="{_attr(caption)}">', path, caption, "alt")
    path, caption = images.take()
    page.add(f'<img src="/static/spinner.gif" data-original="{path}" alt="{_attr(caption)}">', path, caption, "alt")
    (small, _), (large, large_caption) = images.take(), images.take()
    page.add(f'<img src="{PIXEL}" data-srcset="{small} 400w, {large} 800w" alt="{_attr(large_caption)}">',
             large, large_caption, "alt")
    path, caption = images.take()
    page.add(f'<figure><img src="{name(path)}" alt=""><figcaption>\n  {html.escape(caption)}\n</figcaption>'
             '</figure>', path, caption, "figcaption")
    path, caption = images.take()
    page.add(f'<figure><img src="{path}" alt="{_attr(caption)}"><figcaption>Figure 2: from the '
             '<em>archive</em></figcaption></figure>', path, caption, "alt")
    path, _ = images.take()
    page.add(f'<figure><div><img src="{path}" alt="photo"></div><figcaption> </figcaption></figure>',
             path, None, None, "alt_meaningless")
    page.add('<img src="data:image/svg+xml;utf8,&lt;svg/&gt;" alt="a decorative swirl">', None, None, None,
             "data_uri")
    page.body.append('<a href="../web/g3.html">next gallery (a link relative to the base)</a>')


def _gallery_malformed(page: _Page, images: _Images) -> None:
    """g3: markup a browser repairs; every image in it must still be found."""
    (a, ca), (b, cb), (c, cc), (d, cd) = (images.take() for _ in range(4))
    page.add(f'<div><p>Gallery three<table><tr><td><IMG SRC="{a}" ALT="{_attr(ca)}"></td>', a, ca, "alt")
    page.add(f"<td><img src={b} alt='{_attr(cb)}'></div></span>", b, cb, "alt")
    page.add(f'<p><b><i>unbalanced</b></i><img src="{c}" alt="{_attr(cc)}" alt="a second alt, ignored">',
             c, cc, "alt")
    page.add(f'<img src="{d}" alt="{_attr(cd)}" / > <!-- a comment --> </table>', d, cd, "alt")


def build_pages(images: list[tuple[str, str]], seed: int) -> tuple[dict[str, bytes], dict[str, dict], list[dict],
                                                                   list[dict]]:
    """(files, routes, page rows, image rows) of the demo pages, from (path, caption) images."""
    rng = random.Random(f"{seed}:pages")
    take = _Images(images)
    pages: list[_Page] = []

    def page(path: str, depth: int, title: str, **kwargs) -> _Page:
        made = _Page(path, depth, title, **kwargs)
        pages.append(made)
        return made

    index = page(START_PAGE, 0, "Demo web: galleries")
    index.plain(take, 2)
    _gallery_basics(page("/web/g1.html", 1, "Gallery one"), take)
    _gallery_lazy(page("/web/g2.html", 1, "Gallery two"), take)
    _gallery_malformed(page("/web/g3.html", 1, "Gallery three"), take)
    g4 = page("/web/g4.html", 1, "Gallery four")
    g4.plain(take, 2)
    g4.link("deep/d1.html", "deeper")
    d1 = page("/web/deep/d1.html", 2, "Two hops deep")
    d1.plain(take, 2)
    d1.link("d2.html", "deeper still")
    page("/web/deep/d2.html", 3, "Three hops deep").plain(take, 2)
    page("/web/g5.html", 1, "Gallery five (moved)").plain(take, 2)
    page("/web/private/p1.html", 1, "Private", robots_allowed=False, expected_reason="robots_disallowed").plain(take, 3)
    page("/web/private/open.html", 1, "Private but allowed").plain(take, 2)
    latin1 = page("/web/latin1.html", 1, "Latin-1")
    path, caption = take.take()
    latin1.add(f'<img src="{path}" alt="{_attr(caption)}, café crème">', path, f"{caption}, café crème", "alt")
    cp1252 = page("/web/cp1252.html", 1, "Windows-1252, declared by the header only")
    path, caption = take.take()
    cp1252.add(f'<img src="{path}" alt="{_attr(caption)} “naïve” art">', path, f"{caption} “naïve” art", "alt")
    noai = page("/web/noai.html", 1, "Opted out", expected_reason="opt_out")
    noai.head = '<meta name="robots" content="noai, noimageai">'
    noai.plain(take, 2)

    html_type = "text/html; charset=utf-8"
    files: dict[str, bytes] = {}
    routes: dict[str, dict] = {}
    # Pages that yield nothing, each for its reason (bodies made here, no <img> to plant).
    hostile = {
        "/web/binary.html": (b"\x00\x01\x02" + rng.randbytes(3000), "not_html"),
        "/web/huge.html": (b"<!doctype html><p>" + b"big " * (OVERSIZED_BYTES // 4) + b"</p>", "page_too_large"),
        "/web/badenc.html": (b"\xff\xfe" + "<p>x</p>".encode("utf-16-le") + b"\x00\xd8\x41\x00", "bad_encoding"),
    }
    for path, (body, reason) in hostile.items():
        files[path.lstrip("/")] = body
        routes[path] = _route(path.lstrip("/"), html_type)
        page(path, 1, "", expected_reason=reason)
    routes["/web/photo.html"] = _route(images[0][0].lstrip("/"), "image/jpeg")  # an image under a page's name
    page("/web/photo.html", 1, "", expected_reason="not_html")
    page("/web/missing.html", 1, "", expected_reason="http_404")  # no route: the server's own 404
    routes["/web/old-gallery.html"] = _route(None, "text/html", status=301, location="/web/g5.html")
    page("/web/old-gallery.html", 1, "", expected_reason="redirect")

    for target in [p.path for p in pages if p.depth == 1 and p.path != "/web/g5.html"]:  # g5: by its redirect
        index.link(target.removeprefix("/web/"), target)
    index.link("http://example.com/elsewhere.html", "a site we must not visit")
    index.link("mailto:webmaster@example.com", "mail us")
    index.link("g1.html#top", "gallery one again (a fragment)")

    encodings = {"/web/latin1.html": ("iso-8859-1", True, "text/html"),
                 "/web/cp1252.html": ("cp1252", False, "text/html; charset=windows-1252")}
    for made in pages:
        if made.title:  # a page with content (the hostile ones have their bodies already)
            encoding, declare, content_type = encodings.get(made.path, ("utf-8", True, html_type))
            files[made.path.lstrip("/")] = made.render(encoding, declare)
            routes[made.path] = _route(made.path.lstrip("/"), content_type)

    files["robots.txt"] = ROBOTS_TXT.encode()
    routes["/robots.txt"] = _route("robots.txt", "text/plain; charset=utf-8")
    page_rows = [{"path": p.path, "depth": p.depth, "robots_allowed": p.robots_allowed,
                  "expected_reason": p.expected_reason} for p in pages]
    image_rows = [row for p in pages for row in p.images]
    return files, routes, page_rows, image_rows


def _route(file: str | None, content_type: str, status: int = 200, location: str | None = None) -> dict:
    return {"file": file, "status": status, "content_type": content_type, "headers": {}, "delay_s": 0,
            "trickle": False, "truncate_to": None, "location": location}


def write_pages(site_dir: str | os.PathLike, out_dir: str | os.PathLike, images: list[tuple[str, str]],
                seed: int) -> dict[str, dict]:
    """Write the pages into ``site_dir`` and their truth into ``out_dir``; return their routes.

    ``images``: (URL path, caption) of images the server serves (the corpus's clean
    rows). With none, no pages are written.
    """
    if not images:
        return {}
    files, routes, page_rows, image_rows = build_pages(images, seed)
    site = Path(site_dir)
    for name, data in files.items():
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    out = Path(out_dir)
    for name, rows, schema in ((PAGES_TRUTH, page_rows, PAGES_SCHEMA), (IMAGES_TRUTH, image_rows, IMAGES_SCHEMA)):
        tmp = out / f".{name}.partial"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, out / name)
    return routes


def write_warc(out_path: str | os.PathLike, site_dir: str | os.PathLike, base_url: str, *,
               compress: bool = True) -> int:
    """The demo pages as a crawler would have archived them: one WARC response record each.

    Every route under ``/web/`` (and ``/web/missing.html``, as the 404 it is) becomes
    an HTTP response record with the route's status and headers, as a Common Crawl
    WARC holds them. Written with warcio (a test dependency), so crawl/'s own reader
    is checked against another implementation. Returns the number of records.
    """
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    site = Path(site_dir)
    routes = json.loads((site / "routes.json").read_text())
    routes.setdefault("/web/missing.html", _route(None, "text/html", status=404))
    count = 0
    with open(out_path, "wb") as handle:
        writer = WARCWriter(handle, gzip=compress)
        for path, route in sorted(routes.items()):
            if not path.startswith("/web/"):
                continue
            body = (site / route["file"]).read_bytes() if route["file"] else f"<h1>{route['status']}</h1>".encode()
            headers = [("Content-Type", route["content_type"]), *route["headers"].items()]
            if route["location"]:
                headers.append(("Location", route["location"]))
            status = f"{route['status']} {HTTPStatus(route['status']).phrase}"
            http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
            record = writer.create_warc_record(base_url.rstrip("/") + path, "response", payload=io.BytesIO(body),
                                               http_headers=http)
            writer.write_record(record)
            count += 1
    return count


def load_truth(out_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(page rows, image rows) of a corpus made with pages."""
    out = Path(out_dir)
    return pq.read_table(out / PAGES_TRUTH).to_pylist(), pq.read_table(out / IMAGES_TRUTH).to_pylist()
