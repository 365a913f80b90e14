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
   ``<figcaption>``; an alt text that is empty or boilerplate by ``core/captions.py``'s
   judgement, the one ingest and the filter apply (a file name ``IMG_1234.jpg``, a
   camera name ``DSC01234``, a generic word ``image``, ``logo``, a bare URL, no
   letters), says nothing: ``alt_meaningless``. The alt wins over a figcaption because it
   was written for this image; a figcaption may describe a group of them.
4. **Dedupe** within the page: the first pair per URL wins, later ones are
   ``dup_in_page`` (a lazy image and its ``<noscript>`` fallback, say). An image
   without a caption does not claim its URL, so a later copy with one still counts.

Plain Python over selectolax's public API: the per-image loop (``_image_rules``) takes
a page's ``<img>`` nodes, or a WAT record's image entries shaped like them.

``<meta name="robots">`` is honoured as X-Robots-Tag is: a disallowed directive
(``noai``, ``noimageai``, ...) opts the page's images out, ``nofollow``/``none``
stops link extraction, and links with ``rel="nofollow"`` are not followed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

from selectolax.lexbor import LexborHTMLParser

from core.captions import is_boilerplate
from core.reasons import Reason

LAZY_SRC_ATTRIBUTES = (
    "data-src", "data-lazy-src", "data-original", "data-lazy", "data-url", "data-echo", "data-hi-res-src",
)
LAZY_SRCSET_ATTRIBUTES = ("data-srcset", "data-lazy-srcset")
_URL_ATTRIBUTES = frozenset(("srcset", *LAZY_SRC_ATTRIBUTES, *LAZY_SRCSET_ATTRIBUTES))  # besides src
MAX_LINKS_PER_PAGE = 1000  # a page of a million links must not flood the frontier
FIGURE_SEARCH_DEPTH = 6  # ancestors searched for an enclosing <figure>
_URL_WHITESPACE = str.maketrans("", "", "\t\n\r")


class Pair(NamedTuple):  # a tuple: a page makes dozens, a WARC millions
    url: str
    caption: str
    caption_source: str  # "alt" or "figcaption"


@dataclass
class PageExtraction:
    """What one page yields: its pairs, its links, and why the rest did not count."""

    pairs: list[Pair] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # absolute http(s), no fragment, first occurrence order
    reasons: Counter = field(default_factory=lambda: Counter.__new__(Counter))  # image-level reason code -> count
    # (Counter.__new__: an empty Counter without __init__'s update of nothing; every page makes one)
    opt_out: str | None = None  # the <meta name=robots> directive that opted the page out


# -- small pure rules ---------------------------------------------------------------------


def clean_text(text: str | None) -> str:
    """Whitespace runs (newlines, tabs, non-breaking spaces) become one space; ends trimmed."""
    return " ".join(text.split()) if text else ""


def is_meaningless(caption: str) -> bool:
    """True for alt texts that say nothing about the image (already ``clean_text``-ed): empty, or
    boilerplate by ``core.captions.is_boilerplate``, the judgement ingest and the filter make."""
    return not caption or is_boilerplate(caption)


def srcset_candidates(value: str) -> list[tuple[str, int, float]]:
    """``(url, width, density)`` per candidate of a srcset; width 0 if absent, density 1.

    Follows the HTML standard's splitting: a URL runs to the next whitespace (so URLs
    may contain commas), a trailing comma ends a candidate without descriptors, and
    commas inside parentheses do not split descriptors.
    """
    if "(" in value:
        return _srcset_by_hand(value)
    tokens = value.split()
    count = len(tokens)
    if count % 2 == 0:  # perhaps the usual "a.jpg 320w, b.jpg 640w": then whitespace alone splits it right
        candidates = []
        for i in range(0, count, 2):
            url, descriptor = tokens[i], tokens[i + 1]
            if url[0] == "," or url[-1] == ",":
                break
            if i + 2 < count:  # a descriptor ends its candidate with one comma, but the last
                if descriptor[-1] != ",":
                    break
                descriptor = descriptor[:-1]
            if "," in descriptor:
                break
            if descriptor[-1:] == "w" and descriptor[:-1].isdecimal():
                candidates.append((url, int(descriptor[:-1]), 1.0))
            else:
                candidates.append(_candidate(url, descriptor))
        else:
            return candidates
    candidates = []  # no parenthesised descriptors: one regex splits the same way, faster
    for url, descriptor in _SRCSET_CANDIDATE.findall(value):
        if not descriptor:
            candidates.append((url, 0, 1.0))
        elif descriptor[-1] == "w" and descriptor[:-1].isdecimal():  # "640w", as _candidate reads it
            candidates.append((url, int(descriptor[:-1]), 1.0))
        else:
            candidates.append(_candidate(url, descriptor))
    return candidates


def _srcset_by_hand(value: str) -> list[tuple[str, int, float]]:
    """The standard's splitting, character by character (parentheses aware)."""
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
            candidates.append(_candidate(url, descriptor))
    return candidates


# A URL (no whitespace, not ending in a comma), then descriptors up to the next comma.
_SRCSET_CANDIDATE = re.compile(r"[\s,]*(\S*[^\s,])(?:\s+([^,]*))?(?=[\s,]|$)")


def _candidate(url: str, descriptor: str) -> tuple[str, int, float]:
    width, density = 0, 1.0
    for token in descriptor.split():
        try:
            if token[-1] in "wW":
                width = int(token[:-1])
            elif token[-1] in "xX":
                density = float(token[:-1])
        except ValueError:
            pass  # an unparseable descriptor: the candidate keeps its defaults
    return url, width, density


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


_PLAIN_NETLOC = re.compile(r"[a-z0-9.\-]+(?::[0-9]{1,4})?")  # no userinfo, IDN, IPv6 or odd port
# A base URL urlsplit would take apart as written: http(s), a plain host, nothing to strip or remove.
_SIMPLE_BASE = re.compile(r"(https?)://([a-z0-9.\-]+(?::[0-9]{1,4})?)(/[^?#\x00-\x20]*)?(?:[?#][^\x00-\x20]*)?")


# The two references pages use most, matched in one go when as plain as can be, else left to Resolver's
# string operations: nothing strip() or urlsplit would remove (whitespace, C0 controls), no fragment, no
# ';', no empty ('//') or dot ('/.') segment, no trailing '?' (see _plain_path); a lower-case plain host.
_NOT_IN_URL = "\\x00-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000#;"
_SEGMENT = rf"[^/.{_NOT_IN_URL}][^/{_NOT_IN_URL}]*"
_PATH = rf"/(?:{_SEGMENT}/)*(?:{_SEGMENT})?(?<!\?)"
_CLEAN_ROOTED = re.compile(_PATH)
_CLEAN_ABSOLUTE = re.compile(rf"https?://[a-z0-9\-][a-z0-9.\-]*(?::[0-9]{{1,4}})?({_PATH})?")


class Resolver:
    """``resolve`` against one base URL, with a fast path for the shapes pages use most.

    ``urljoin`` costs tens of microseconds, and a page has dozens of image URLs: absolute
    ``http(s)://host/path``, ``/path`` and ``dir/file`` references are joined by string
    operations instead; anything else (dot segments, ``//host``, ``?query``, other schemes,
    unusual hosts) takes ``resolve``. Both give the same answer (a test checks).
    """

    def __init__(self, base: str):
        self.base = base
        simple = _SIMPLE_BASE.fullmatch(base)
        if simple is not None:  # what urlsplit would find, without urlsplit
            scheme, netloc, path = simple.group(1), simple.group(2), simple.group(3) or ""
            self._fast = "/." not in path
        else:
            parts = urlsplit(base)
            scheme, netloc, path = parts.scheme, parts.netloc.lower(), parts.path
            self._fast = (scheme in ("http", "https") and _PLAIN_NETLOC.fullmatch(netloc) is not None
                          and "/." not in path)
        self._origin = f"{scheme}://{netloc}"
        path = path or "/"
        self._directory = self._origin + path[: path.rfind("/") + 1]

    def join(self, raw: str) -> tuple[str | None, Reason | None]:
        if self._fast:
            if _CLEAN_ROOTED.fullmatch(raw) is not None:  # "/path": the page's origin + it
                return self._origin + raw, None
            absolute = _CLEAN_ABSOLUTE.fullmatch(raw)
            if absolute is not None:  # "http(s)://host/path": itself ("/" for an empty path)
                return (raw if absolute.group(1) else raw + "/"), None
        url = raw.strip()
        if "\n" in url or "\t" in url or "\r" in url:
            url = url.translate(_URL_WHITESPACE)
        if self._fast and url and url[0] > " " and "/." not in url and url[0] not in ".#":  # urlsplit drops C0 too
            fragment = url.find("#")
            if fragment >= 0:
                url = url[:fragment]
            if url[0] == "/":
                if "//" not in url and ";" not in url and url[-1] != "?":  # see _plain_path
                    return self._origin + url, None
            elif url.startswith(("http://", "https://")):
                start = url.index("//") + 2
                end = len(url)
                for mark in ("/", "?"):
                    found = url.find(mark, start)
                    if 0 <= found < end:
                        end = found
                netloc, rest = url[start:end].lower(), url[end:]
                if _PLAIN_NETLOC.fullmatch(netloc) and netloc[0] != ":" and _plain_path(rest):
                    return f"{url[: start - 3]}://{netloc}{rest if rest[:1] == '/' else '/' + rest}", None
            elif "//" not in url and ";" not in url and url[-1] != "?":
                colon = url.find(":")
                if url[0] != "?" and (colon < 0 or 0 <= url.find("/") < colon):  # no scheme
                    return self._directory + url, None
        return resolve(self.base, raw)

    __call__ = join


def _plain_path(path: str) -> bool:
    """No empty segment, ';' parameters or bare trailing '?', which urljoin (unlike browsers) rewrites."""
    return "//" not in path and ";" not in path and not path.endswith("?")


def pick_image_url(attributes: dict[str, Any], source_srcsets: Iterable[str] = ()) -> tuple[str | None, Reason | None]:
    """The raw URL an ``<img>`` stands for (rule 1 above), or ``data_uri`` / ``invalid_url``."""
    raw, problem = _pick_url(attributes, tuple(source_srcsets))
    return raw, (None if problem is None else Reason(problem))


_DATA_URI, _INVALID_URL = Reason.DATA_URI.value, Reason.INVALID_URL.value


def _pick_url(attributes: dict[str, Any], source_srcsets: Sequence[str]) -> tuple[str | None, str | None]:
    """``pick_image_url``, with the reason as its code."""
    get = attributes.get
    if not source_srcsets and _URL_ATTRIBUTES.isdisjoint(attributes):  # the common case: src only
        value = (get("src") or "").strip()
        if value and value[:5].lower() != "data:":
            return value, None
        return None, (_DATA_URI if value else _INVALID_URL)
    srcset = get("srcset")
    if not source_srcsets and not get("data-srcset") and not get("data-lazy-srcset"):
        if not srcset:  # a lazy image: no srcset to read
            return _lazy_then_src(get)
        widest = _widest_usual_candidate(srcset)
        if widest is not None:
            return widest, None
    best, best_width, best_density, saw_data = None, -1, -1.0, False
    for value in (srcset, get("data-srcset"), get("data-lazy-srcset"), *source_srcsets):
        if not value:
            continue
        for url, width, density in srcset_candidates(value):
            if url[:5].lower() == "data:":
                saw_data = True
            elif width > best_width or (width == best_width and density > best_density):  # widths rank first
                best, best_width, best_density = url, width, density
    if best is not None:
        return best, None
    return _lazy_then_src(get, saw_data)


def _lazy_then_src(get: Any, saw_data: bool = False) -> tuple[str | None, str | None]:
    """The first lazy attribute, else ``src``, that holds a URL other than a data: URI (rule 1's end)."""
    for name in _LAZY_THEN_SRC:
        value = get(name)
        if not value:
            continue
        value = value.strip()
        if not value:
            continue
        if value[:5].lower() == "data:":
            saw_data = True
            continue
        return value, None
    return None, (_DATA_URI if saw_data else _INVALID_URL)


_LAZY_THEN_SRC = (*LAZY_SRC_ATTRIBUTES, "src")


def _widest_usual_candidate(srcset: str) -> str | None:
    """The first widest candidate of a srcset of the usual shape, ``"a.jpg 320w, b.jpg 640w"``; else None.

    Usual: whitespace splits it into URL, ``"640w,"`` pairs (the last without its comma),
    no URL begins or ends with a comma or is a data: URI. srcset_candidates reads such a
    srcset token by token and _pick_url then keeps the first widest; this does both in
    one pass. Anything else (densities, odd commas, data: URIs) gets None: the general path.
    """
    tokens = srcset.split()
    count = len(tokens)
    if not count or count % 2:
        return None
    best, best_width, last = None, -1, count - 1
    for i in range(0, count, 2):
        url, descriptor = tokens[i], tokens[i + 1]
        if i + 1 == last:
            if descriptor[-1] != "w":
                return None
            descriptor = descriptor[:-1]
        elif descriptor[-2:] == "w,":
            descriptor = descriptor[:-2]
        else:
            return None
        if not descriptor.isdecimal() or url[0] == "," or url[-1] == "," or (
                url[0] in "dD" and url[:5].lower() == "data:"):
            return None
        width = int(descriptor)
        if width > best_width:
            best, best_width = url, width
    return best


def robots_directives(content: str | None) -> set[str]:
    return {d.strip().lower() for d in (content or "").split(",") if d.strip()}


# -- rules 1-4, for the images of an HTML page or a WAT record --------------------------

# Lexbor's element kinds, as its tree reports them (by name, whatever the namespace).
_TAG_IDS = {node.tag: node.tag_id for node in LexborHTMLParser(
    "<picture><source srcset><img></picture><figure><figcaption></figcaption></figure><a></a><area><base><meta>"
).css("*")}
_IMG, _SOURCE, _PICTURE = _TAG_IDS["img"], _TAG_IDS["source"], _TAG_IDS["picture"]
_FIGURE, _FIGCAPTION = _TAG_IDS["figure"], _TAG_IDS["figcaption"]
_BASE, _META = _TAG_IDS["base"], _TAG_IDS["meta"]
# A src beginning with one of these takes _pick_url: a data: URI, or whitespace that strip() removes
# (so that " data:..." is a data URI too). Every str.isspace() character is below U+3001 (a test checks).
_CAREFUL_FIRST = frozenset("dD" + "".join(c for c in map(chr, range(0x3001)) if c.isspace()))
_ALT_MEANINGLESS, _DUP_IN_PAGE = Reason.ALT_MEANINGLESS.value, Reason.DUP_IN_PAGE.value


def _link_hrefs(nodes: Iterable[Any]) -> list[str]:
    """The ``href`` of each ``a``/``area`` among ``nodes`` (document order), unless ``rel`` says ``nofollow``."""
    hrefs = []
    for node in nodes:
        attributes = node.attributes
        if "nofollow" not in (attributes.get("rel") or "").lower():
            hrefs.append(attributes.get("href") or "")
    return hrefs


def _picture_srcsets(picture: Any, img: Any) -> tuple[str, ...]:
    """The ``<source srcset>`` values that count for ``img``, a child of ``picture``.

    Walking ``css("img, source[srcset]")`` in document order, an image's candidates are
    the sources of the picture whose sources came last before it, if that picture is
    the image's. The same is found by walking the picture alone: every source before
    the image in document order that could change that state is inside the picture.
    """
    target, last, sources = img.mem_id, None, []
    for node in picture.traverse():
        tag = node.tag_id
        if tag == _SOURCE:
            attributes = node.attributes
            if "srcset" not in attributes:
                continue
            parent = node.parent
            if parent is not None and parent.tag_id == _PICTURE:
                if parent.mem_id != last:
                    last, sources = parent.mem_id, []
                sources.append(attributes.get("srcset") or "")
        elif tag == _IMG and node.mem_id == target:
            break
    return tuple(sources) if sources and last == picture.mem_id else ()


def _image_rules(images: Sequence[Any], resolver: Resolver, result: PageExtraction) -> None:
    """Rules 1-4 for each of ``images`` (``<img>`` nodes in document order), into ``result``.

    An image whose parent is a ``<picture>`` takes that picture's ``<source srcset>``s as
    candidates too (``_picture_srcsets``); a WAT's images have no parent.

    This runs for every image of every page, so it works a page at a time: first each
    image's URL is chosen (rule 1; ``src`` alone, the common case, inline), then the
    page's URLs are resolved (rule 2) and its alt texts cleaned with one check over
    all of them joined (the common case: plain rooted paths, alt texts already clean),
    then captions are judged (rule 3: ``core.captions.is_boilerplate``) and pairs
    deduplicated (rule 4). Each shortcut falls back on the plain rule (``_pick_url``,
    ``Resolver``, ``clean_text``) whenever it is not sure; a test checks the whole against
    the plain rules applied one by one (tests/test_crawl_extract.py).
    """
    reasons = result.reasons
    counted = reasons.get  # the Counter as a dict: no __missing__ call
    url_attributes, careful_first, picture_tag = _URL_ATTRIBUTES, _CAREFUL_FIRST, _PICTURE
    raws: list[str] = []
    alts: list[str] = []
    kept: list[Any] = []
    # 1. URL
    for node in images:
        attributes = node.attributes
        sources = ()
        parent = node.parent
        if parent is not None and parent.tag_id == picture_tag:
            sources = _picture_srcsets(parent, node)
        raw = attributes.get("src")
        if sources or not raw or raw[0] in careful_first or not url_attributes.isdisjoint(attributes):
            raw, problem = _pick_url(attributes, sources)
            if raw is None:
                reasons[problem] = counted(problem, 0) + 1
                continue
        raws.append(raw)
        alts.append(attributes.get("alt") or "")
        kept.append(node)
    count = len(raws)
    if not count:
        return
    # 2. resolution: one check that every URL is a plain rooted path (what Resolver.join's first test
    # finds one by one): joined by spaces, which no such path holds, see _all_plain_rooted.
    if resolver._fast and _all_plain_rooted(" ".join(raws), count):
        origin = resolver._origin
        urls = [origin + raw for raw in raws]
    else:
        urls = []
        join = resolver.join
        failed = False
        for raw in raws:
            url, problem = join(raw)
            if url is None:
                problem = problem.value
                reasons[problem] = counted(problem, 0) + 1
                failed = True
            urls.append(url)
        if failed:
            keep = [i for i, url in enumerate(urls) if url is not None]
            urls, alts, kept = [urls[i] for i in keep], [alts[i] for i in keep], [kept[i] for i in keep]
    # 3. caption: the alt texts cleaned (clean_text), unless one check finds them all clean already
    joined = "\n".join(alts)
    if not (joined.count("\n") == len(alts) - 1 and "  " not in joined and " \n" not in joined
            and "\n " not in joined and joined[:1] != " " and joined[-1:] != " "
            and joined.replace("\n", "-").isprintable()):
        # (every whitespace character but the space is unprintable, a test checks: printable text without
        # a newline, a double space or a space at either end is what clean_text leaves as it is)
        alts = [" ".join(alt.split()) for alt in alts]
    pairs = result.pairs
    seen: set[str] = set()
    boilerplate = is_boilerplate
    new_pair = tuple.__new__
    for url, caption, node in zip(urls, alts, kept):
        if caption and not boilerplate(caption):  # is_meaningless
            source = "alt"
        else:
            text = _enclosing_figcaption(node)
            caption, source = " ".join(text.split()) if text else "", "figcaption"  # clean_text
            if not caption or boilerplate(caption):
                reasons[_ALT_MEANINGLESS] = counted(_ALT_MEANINGLESS, 0) + 1
                continue
        # 4. dedupe
        if url in seen:
            reasons[_DUP_IN_PAGE] = counted(_DUP_IN_PAGE, 0) + 1
            continue
        seen.add(url)
        pairs.append(new_pair(Pair, (url, caption, source)))


def _all_plain_rooted(joined: str, count: int) -> bool:
    """Whether each of ``count`` URLs joined by single spaces matches ``_CLEAN_ROOTED``.

    ``_CLEAN_ROOTED``: a '/', then segments neither empty (no '//', though the last may
    be) nor beginning with '.' (no '/.'), no character of ``_NOT_IN_URL`` (which
    includes the space: so ``count - 1`` spaces are the separators, each followed by a
    URL's '/'), no '?' at the end. ASCII and printable (space aside) leaves, of
    ``_NOT_IN_URL``, '#' and ';'; anything else (non-ASCII, say) is left to the
    regex: False here only costs time.
    """
    return (joined[0] == "/" and joined.count(" ") == count - 1 == joined.count(" /") and joined.isascii()
            and joined.isprintable() and "//" not in joined and "/." not in joined and "#" not in joined
            and ";" not in joined and "? " not in joined and joined[-1] != "?")


class _Links:
    """A page's links: resolved, deduplicated, capped."""

    def __init__(self, resolve: Resolver, links: list[str]):
        self.resolve = resolve
        self.links = links
        self._seen: set[str] = set()

    def add(self, raw_url: str) -> None:
        if len(self._seen) >= MAX_LINKS_PER_PAGE:
            return
        url, _ = self.resolve(raw_url)
        if url is not None and url not in self._seen:
            self._seen.add(url)
            self.links.append(url)


# -- HTML ------------------------------------------------------------------------------


def _enclosing_figcaption(node) -> str:
    """The text of the first ``<figcaption>`` (document order) of the nearest enclosing ``<figure>``."""
    for _ in range(FIGURE_SEARCH_DEPTH):
        node = node.parent
        if node is None:
            return ""
        if node.tag_id == _FIGURE:
            caption = _first_figcaption(node)
            return caption.text(deep=True, separator=" ") if caption is not None else ""
    return ""


def _first_figcaption(figure):
    """``figure.css_first("figcaption")``: a figure is small, and a walk in Python beats a query's setup."""
    for seen, node in enumerate(figure.traverse()):
        if node.tag_id == _FIGCAPTION:
            return node
        if seen == 64:  # a large figure: the query walks the rest faster
            return figure.css_first("figcaption")
    return None


def extract_html(
    page_url: str,
    html: str | bytes,
    *,
    want_links: bool = False,
    disallowed_directives: Iterable[str] = ("noai", "noimageai", "noindex", "noimageindex"),
) -> PageExtraction:
    """Pairs (and, with ``want_links``, links) of one page; bytes must be UTF-8.

    The parser is an HTML5 one (Lexbor): malformed markup is repaired the way a
    browser repairs it, never refused. ``page_url`` must be absolute. ``<base>`` and
    ``<meta name=robots>`` are read from ``<head>`` (where the parser puts them unless
    a page writes them after its content); then Lexbor's tag walk (``tags("img")``)
    lists the images, and (``want_links``) a CSS query the links. Each walk over the
    whole tree costs a few percent of the parse, a CSS query more.
    """
    tree = LexborHTMLParser(html)
    directives: set[str] = set()
    base_url = page_url
    head = tree.head
    # what css("base[href], meta[name]") finds in <head>, in document order: a walk of a head costs a
    # third of that query's setup (a head holds tens of elements, few of them <base> or <meta>)
    for node in head.traverse() if head is not None else ():
        tag = node.tag_id
        if tag == _META:
            attributes = node.attributes
            name = attributes.get("name")
            if name and name.lower() in ("robots", "webclip"):
                directives |= robots_directives(attributes.get("content"))
        elif tag == _BASE and base_url is page_url:  # the first <base href> counts, as in browsers
            attributes = node.attributes
            if "href" in attributes:
                base_url = resolve(page_url, attributes["href"] or "")[0] or page_url
    if "none" in directives:  # shorthand for both
        directives |= {"noindex", "nofollow"}
    result = PageExtraction()
    resolver = Resolver(base_url)
    opted_out = sorted(directives.intersection(disallowed_directives)) if directives else None
    if opted_out:
        result.opt_out = opted_out[0]
    else:
        # Lexbor's tag walk (a third of a CSS query's cost); an image in a <picture> finds the picture's
        # <source srcset>s itself (_picture_srcsets).
        images = tree.tags("img")
        if images:
            _image_rules(images, resolver, result)
    if want_links and "nofollow" not in directives:
        links = _Links(resolver, result.links)
        for href in _link_hrefs(tree.css("a[href], area[href]")):
            links.add(href)
    return result


# -- WAT (Common Crawl's metadata of a page: its links, already parsed) -------------------

_WAT_IMAGE_ATTRIBUTES = frozenset(("src", "srcset", *LAZY_SRC_ATTRIBUTES, *LAZY_SRCSET_ATTRIBUTES))


class _WatImage(NamedTuple):
    """A WAT image entry, shaped like the parser's ``<img>`` node as ``_image_rules`` reads it."""

    attributes: dict[str, Any]
    tag_id: int = _IMG
    parent: None = None  # no tree: no <picture>, no <figure>



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
    base_url = (resolve(page_url, str(head["Base"]))[0] or page_url) if head.get("Base") else page_url
    directives: set[str] = set()
    for meta in head.get("Metas") or []:
        if str(meta.get("name", "")).lower() in ("robots", "webclip"):
            directives |= robots_directives(str(meta.get("content", "")))
    opted_out = sorted(directives & disallowed)
    if opted_out:
        return page_url, PageExtraction(opt_out=opted_out[0])
    images: list[_WatImage] = []
    for link in html.get("Links") or []:
        tag, _, attribute = str(link.get("path", "")).partition("@/")
        attribute = attribute.lower()
        if tag.upper() == "IMG" and attribute in _WAT_IMAGE_ATTRIBUTES:  # as if the img had only that attribute
            images.append(_WatImage({attribute: str(link.get("url") or ""), "alt": link.get("alt")}))
    result = PageExtraction()
    _image_rules(images, Resolver(base_url), result)
    return page_url, result
