"""A page's HTML (or a WAT record's link list) → (image URL, caption) pairs and links.

Pure functions of the page's URL and text: no I/O, no state, no configuration beyond
their arguments, so every rule below is pinned by a unit test and a WARC record and
a fetched page give the same pairs. Each ``<img>`` ends as exactly one pair or one
reason, decided in this order:

1. **URL**: the largest ``srcset`` candidate (``w`` descriptors rank before ``x``;
   ``data-srcset`` and a ``<picture>``'s ``<source srcset>`` count too), else a
   lazy-loading attribute (``data-src``, ``data-lazy-src``, ``data-original``, ...),
   else ``src``. Lazy pages put a placeholder ``data:`` URI in ``src`` and the real
   URL elsewhere, so ``data:`` URIs are passed over; an image with nothing else is
   ``data_uri``, one with no URL at all ``invalid_url``.
2. **Resolution** against ``<base href>`` (itself resolved against the page URL),
   fragment dropped, scheme and host lower-cased; anything but http(s) is
   ``unsupported_scheme``.
3. **Caption**: the alt text if it says something, else the enclosing ``<figure>``'s
   ``<figcaption>``; an alt text that is empty, a file name (``IMG_1234.jpg``), a
   camera name (``DSC01234``), a generic word (``image``, ``logo``) or has no letters
   says nothing: ``alt_meaningless``. The alt wins over a figcaption because it was
   written for this image; a figcaption may describe a group of them.
4. **Dedupe** within the page: the first pair per URL wins, later ones are
   ``dup_in_page`` (a lazy image and its ``<noscript>`` fallback, say). An image
   without a caption does not claim its URL, so a later copy with one still counts.

``<meta name="robots">`` is honoured as X-Robots-Tag is: a disallowed directive
(``noai``, ``noimageai``, ...) opts the page's images out, ``nofollow``/``none``
stops link extraction, and links with ``rel="nofollow"`` are not followed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from selectolax.lexbor import LexborHTMLParser

from core.reasons import Reason

LAZY_SRC_ATTRIBUTES = (
    "data-src", "data-lazy-src", "data-original", "data-lazy", "data-url", "data-echo", "data-hi-res-src",
)
LAZY_SRCSET_ATTRIBUTES = ("data-srcset", "data-lazy-srcset")
MAX_LINKS_PER_PAGE = 1000  # a page of a million links must not flood the frontier
FIGURE_SEARCH_DEPTH = 6  # ancestors searched for an enclosing <figure>

# Alt texts that describe no image: lower-cased, punctuation stripped from the ends.
GENERIC_ALTS = frozenset({
    "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "pics", "logo", "icon", "banner",
    "thumbnail", "thumb", "untitled", "placeholder", "spacer", "avatar", "blank", "null", "undefined", "none",
    "alt", "loading", "gif", "jpg", "jpeg", "png", "webp", "graphic", "button", "arrow", "spinner", "pixel",
    "advertisement", "ad", "header", "footer", "alt text", "image description", "featured image", "no image",
    "image not found", "photo of", "image of", "picture of", "click here", "read more",
})
_IMAGE_EXTENSIONS = r"(?:jpe?g|jpe|png|gif|webp|bmp|svg|tiff?|avif|heic|heif|ico|jfif)"
_FILE_NAME = re.compile(rf"[\w\-. ()\[\]~+%,]+\.{_IMAGE_EXTENSIONS}", re.IGNORECASE)
_CAMERA_NAME = re.compile(
    r"(?:img|image|dsc[nf]?|dcim|pict?|pxl|mvimg|photo|screenshot|screen ?shot|capture|scan)[\s_\-]*\d[\w\-]*",
    re.IGNORECASE,
)
_END_PUNCTUATION = " \t.,:;-_|*#!?\"'()[]{}<>/\\"
_URL_WHITESPACE = str.maketrans("", "", "\t\n\r")


@dataclass(frozen=True)
class Pair:
    url: str
    caption: str
    caption_source: str  # "alt" or "figcaption"


@dataclass
class PageExtraction:
    """What one page yields: its pairs, its links, and why the rest did not count."""

    pairs: list[Pair] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # absolute http(s), no fragment, first occurrence order
    reasons: Counter = field(default_factory=Counter)  # image-level reason code -> count
    opt_out: str | None = None  # the <meta name=robots> directive that opted the page out


# -- small pure rules ---------------------------------------------------------------------


def clean_text(text: str | None) -> str:
    """Whitespace runs (newlines, tabs, non-breaking spaces) become one space; ends trimmed."""
    return " ".join(text.split()) if text else ""


def is_meaningless(caption: str) -> bool:
    """True for alt texts that say nothing about the image (already ``clean_text``-ed)."""
    if not caption:
        return True
    if not any(c.isalpha() for c in caption):
        return True
    core = caption.lower().strip(_END_PUNCTUATION)
    if core in GENERIC_ALTS:
        return True
    if _FILE_NAME.fullmatch(caption) or _CAMERA_NAME.fullmatch(core):
        return True
    return core.startswith(("http://", "https://", "www."))


def srcset_candidates(value: str) -> list[tuple[str, int, float]]:
    """``(url, width, density)`` per candidate of a srcset; width 0 if absent, density 1.

    Follows the HTML standard's splitting: a URL runs to the next whitespace (so URLs
    may contain commas), a trailing comma ends a candidate without descriptors, and
    commas inside parentheses do not split descriptors.
    """
    candidates = []
    pos, end = 0, len(value)
    while pos < end:
        while pos < end and (value[pos].isspace() or value[pos] == ","):
            pos += 1
        start = pos
        while pos < end and not value[pos].isspace():
            pos += 1
        url = value[start:pos]
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start, depth = pos, 0
            while pos < end and not (value[pos] == "," and depth == 0):
                depth += {"(": 1, ")": -1 if depth else 0}.get(value[pos], 0)
                pos += 1
            descriptor = value[start:pos]
        if url:
            width, density = 0, 1.0
            for token in descriptor.split():
                try:
                    if token[-1] in "wW":
                        width = int(token[:-1])
                    elif token[-1] in "xX":
                        density = float(token[:-1])
                except ValueError:
                    pass  # an unparseable descriptor: the candidate keeps its defaults
            candidates.append((url, width, density))
    return candidates


def _is_data_uri(url: str) -> bool:
    return url[:5].lower() == "data:"


def resolve(base: str, raw: str) -> tuple[str | None, Reason | None]:
    """``raw`` as an absolute http(s) URL without fragment, or the reason it is not one."""
    raw = raw.strip().translate(_URL_WHITESPACE)
    if not raw:
        return None, Reason.INVALID_URL
    try:
        parts = urlsplit(urljoin(base, raw))
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None, Reason.INVALID_URL
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None, Reason.UNSUPPORTED_SCHEME
    if not parts.hostname:
        return None, Reason.INVALID_URL
    return urlunsplit((scheme, parts.netloc.lower(), parts.path or "/", parts.query, "")), None


def pick_image_url(attributes: dict[str, Any], source_srcsets: Iterable[str] = ()) -> tuple[str | None, Reason | None]:
    """The raw URL an ``<img>`` stands for (rule 1 above), or ``data_uri`` / ``invalid_url``."""
    best, best_rank, saw_data = None, (-1, -1.0), False
    srcsets = [attributes.get(name) for name in ("srcset", *LAZY_SRCSET_ATTRIBUTES)]
    for srcset in (*srcsets, *source_srcsets):
        if not srcset:
            continue
        for url, width, density in srcset_candidates(srcset):
            if _is_data_uri(url):
                saw_data = True
            elif (width, density) > best_rank:
                best, best_rank = url, (width, density)
    if best is not None:
        return best, None
    for name in (*LAZY_SRC_ATTRIBUTES, "src"):
        value = (attributes.get(name) or "").strip()
        if not value:
            continue
        if _is_data_uri(value):
            saw_data = True
            continue
        return value, None
    return None, (Reason.DATA_URI if saw_data else Reason.INVALID_URL)


def robots_directives(content: str | None) -> set[str]:
    return {d.strip().lower() for d in (content or "").split(",") if d.strip()}


# -- the collector both HTML and WAT feed -------------------------------------------------


class _Collector:
    """Applies rules 2-4 to each image and keeps the page's outcome."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.result = PageExtraction()
        self._seen_images: set[str] = set()
        self._seen_links: set[str] = set()

    def image(self, raw_url: str | None, url_problem: Reason | None, alt: str | None, figcaption=None) -> None:
        reasons = self.result.reasons
        if raw_url is None:
            reasons[url_problem.value] += 1
            return
        url, problem = resolve(self.base_url, raw_url)
        if url is None:
            reasons[problem.value] += 1
            return
        caption, source = clean_text(alt), "alt"
        if is_meaningless(caption):
            caption, source = clean_text(figcaption() if callable(figcaption) else figcaption), "figcaption"
            if is_meaningless(caption):
                reasons[Reason.ALT_MEANINGLESS.value] += 1
                return
        if url in self._seen_images:
            reasons[Reason.DUP_IN_PAGE.value] += 1
            return
        self._seen_images.add(url)
        self.result.pairs.append(Pair(url, caption, source))

    def link(self, raw_url: str) -> None:
        if len(self._seen_links) >= MAX_LINKS_PER_PAGE:
            return
        url, _ = resolve(self.base_url, raw_url)
        if url is not None and url not in self._seen_links:
            self._seen_links.add(url)
            self.result.links.append(url)


# -- HTML ------------------------------------------------------------------------------


def _enclosing_figcaption(node) -> str:
    for _ in range(FIGURE_SEARCH_DEPTH):
        node = node.parent
        if node is None:
            return ""
        if node.tag == "figure":
            caption = node.css_first("figcaption")
            return caption.text(deep=True, separator=" ") if caption is not None else ""
    return ""


def _picture_srcsets(img) -> list[str]:
    parent = img.parent
    if parent is None or parent.tag != "picture":
        return []
    return [s.attributes.get("srcset") or "" for s in parent.iter() if s.tag == "source"]


def extract_html(
    page_url: str,
    html: str | bytes,
    *,
    want_links: bool = False,
    disallowed_directives: Iterable[str] = ("noai", "noimageai", "noindex", "noimageindex"),
) -> PageExtraction:
    """Pairs (and, with ``want_links``, links) of one page; bytes must be UTF-8.

    The parser is an HTML5 one (Lexbor): malformed markup is repaired the way a
    browser repairs it, never refused. ``page_url`` must be absolute.
    """
    tree = LexborHTMLParser(html)
    selector = "img, base[href], meta[name], a[href], area[href]" if want_links else "img, base[href], meta[name]"
    collector = _Collector(page_url)
    base_seen = False
    directives: set[str] = set()
    images = []
    for node in tree.css(selector):
        tag = node.tag
        if tag == "img":
            images.append(node)
        elif tag == "base":
            if not base_seen:  # only the first <base href> counts, as in browsers
                base_seen = True
                base, _ = resolve(page_url, node.attributes.get("href") or "")
                collector.base_url = base or page_url
        elif tag == "meta":
            if (node.attributes.get("name") or "").lower() in ("robots", "webclip"):
                directives |= robots_directives(node.attributes.get("content"))
        elif "nofollow" not in (node.attributes.get("rel") or "").lower():
            collector.link(node.attributes.get("href") or "")
    result = collector.result
    if "none" in directives:  # shorthand for both
        directives |= {"noindex", "nofollow"}
    if "nofollow" in directives:
        result.links.clear()
    opted_out = sorted(directives.intersection(disallowed_directives))
    if opted_out:
        result.opt_out = opted_out[0]
        return result
    for img in images:
        attributes = img.attributes
        raw, problem = pick_image_url(attributes, _picture_srcsets(img))
        collector.image(raw, problem, attributes.get("alt"), lambda img=img: _enclosing_figcaption(img))
    return result


# -- WAT (Common Crawl's metadata of a page: its links, already parsed) -------------------

_WAT_IMAGE_ATTRIBUTES = frozenset(("src", "srcset", *LAZY_SRC_ATTRIBUTES, *LAZY_SRCSET_ATTRIBUTES))


def extract_wat(
    metadata: dict,
    disallowed_directives: Iterable[str] = ("noai", "noimageai", "noindex", "noimageindex"),
) -> tuple[str | None, PageExtraction | None]:
    """``(page_url, extraction)`` from one WAT record's JSON; ``(None, None)`` if it is no HTML page.

    A WAT keeps each ``<img>`` attribute as a link entry (``{"path": "IMG@/src",
    "url": ..., "alt": ...}``), unresolved, with the page's ``<base>`` in its head
    metadata; each entry is one image here (a WAT has no figure captions).
    Raises ``KeyError``/``TypeError``/``AttributeError`` on a record of the wrong shape.
    """
    envelope = metadata["Envelope"]
    page_url = envelope["WARC-Header-Metadata"].get("WARC-Target-URI")
    response = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata")
    html = response.get("HTML-Metadata") if isinstance(response, dict) else None
    if not page_url or not isinstance(html, dict):
        return None, None
    disallowed = set(disallowed_directives)
    head = html.get("Head") or {}
    collector = _Collector(page_url)
    if head.get("Base"):
        base, _ = resolve(page_url, str(head["Base"]))
        collector.base_url = base or page_url
    directives: set[str] = set()
    for meta in head.get("Metas") or []:
        if str(meta.get("name", "")).lower() in ("robots", "webclip"):
            directives |= robots_directives(str(meta.get("content", "")))
    opted_out = sorted(directives & disallowed)
    if opted_out:
        return page_url, PageExtraction(opt_out=opted_out[0])
    for link in html.get("Links") or []:
        tag, _, attribute = str(link.get("path", "")).partition("@/")
        if tag.upper() != "IMG" or attribute.lower() not in _WAT_IMAGE_ATTRIBUTES:
            continue
        raw = str(link.get("url") or "")
        problem = None
        if attribute.lower().endswith("srcset"):
            raw, problem = pick_image_url({"srcset": raw})
        elif not raw.strip() or _is_data_uri(raw.strip()):
            raw, problem = None, (Reason.DATA_URI if raw.strip() else Reason.INVALID_URL)
        collector.image(raw, problem, link.get("alt"))
    return page_url, collector.result
