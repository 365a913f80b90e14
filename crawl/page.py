"""One page's bytes → its extraction, or the one reason it yields nothing.

Shared by the WARC reader and the seed crawler, so an archived page and a fetched
page are judged alike. In order: the byte cap (``page_too_large``), the declared
content type and a sniff for binary bytes (``not_html``), the character encoding
(``bad_encoding``), then the HTML parser (``html_parse_error``). Each failure is a
``SampleError`` with its reason, raised here and counted once by the caller.

Character encoding, decided as a browser would, then checked strictly: a byte-order
mark, else the charset the HTTP header declares, else a ``<meta charset>`` in the
first 1024 bytes; with no usable declaration, UTF-8 if the bytes are valid UTF-8,
else charset-normalizer's guess. Bytes invalid in every declared charset (or, with
none declared, in any guess) are ``bad_encoding``: guessing past a declaration turns
a UTF-8 page with a few stray bytes into Cyrillic mojibake, and a browser's U+FFFD
replacements would end up in captions. Unknown labels and non-text codecs
(``charset=base64``) count as undeclared. UTF-8 pages (most of the web) reach the
parser as their own bytes, with no decode and re-encode in between.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable

from core.reasons import Reason, SampleError
from crawl.extract import PageExtraction, extract_html

HTML_TYPES = ("text/html", "application/xhtml+xml")
SNIFF_BYTES = 1024  # what browsers look at to sniff, and how far a <meta charset> may be
DETECT_BYTES = 65536  # what charset detection reads when nothing declared works
# The HTML standard's "binary data bytes": no text page has them.
_BINARY_BYTES = bytes([*range(0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20)])
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([a-z0-9_:.\-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# Browsers read these labels as windows-1252 (a superset); so do we.
_AS_WINDOWS_1252 = frozenset({"latin_1", "iso8859-1", "ascii", "cp1252"})


def looks_binary(body: bytes) -> bool:
    """Control bytes no text page has, in its first KiB (UTF-16 with a BOM excepted)."""
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    return _has_any_byte(body, SNIFF_BYTES, _BINARY_BYTES)


def _has_any_byte(data: bytes, limit: int, members: bytes) -> bool:
    head = data[:limit]
    return len(head.translate(None, members)) != len(head)  # one C pass; a regex search is ~10x slower


def codec_for(label: str | bytes | None) -> str | None:
    """Python's codec for a charset label, or None for unknown labels and non-text codecs."""
    if not label:
        return None
    if isinstance(label, bytes):
        label = label.decode("ascii", "replace")
    return _codec_for(label)


@functools.lru_cache(maxsize=256)  # a few labels cover the web; a lookup is a few microseconds
def _codec_for(label: str) -> str | None:
    try:
        info = codecs.lookup(label.strip().strip("\"'"))
    except LookupError:
        return None
    if not getattr(info, "_is_text_encoding", True):  # base64, rot13, zlib...: no page is written in those
        return None
    name = info.name
    return "cp1252" if name in _AS_WINDOWS_1252 else name


def _is_utf8(body: bytes) -> bool:
    """Whether ``body`` is valid UTF-8: Python's strict codec decides (a str of the page, thrown away)."""
    if body.isascii():  # a fast scan; ASCII is valid UTF-8
        return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def decode_html(body: bytes, declared: str | None = None) -> str | bytes:
    """The page for the parser: valid UTF-8 as bytes, other encodings decoded; or ``bad_encoding``."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            rest = body[len(bom) :]
            try:
                text = rest.decode(codec)
            except UnicodeDecodeError as exc:
                raise SampleError(Reason.BAD_ENCODING, f"invalid {codec} after its byte-order mark: {exc}") from None
            return rest if codec == "utf-8" else text
    header_codec = codec_for(declared)
    if header_codec == "utf-8" and _is_utf8(body):  # the common case, without the <meta> scan
        return body
    meta = _META_CHARSET.search(body[:SNIFF_BYTES])
    declared_codecs = [c for c in (header_codec, codec_for(meta.group(1) if meta else None)) if c]
    for codec in declared_codecs:
        if codec == "utf-8":
            if _is_utf8(body):
                return body
            continue
        try:
            return body.decode(codec)
        except UnicodeDecodeError:
            continue
    if declared_codecs:
        raise SampleError(Reason.BAD_ENCODING, f"bytes invalid in the declared {' and '.join(declared_codecs)}")
    if _is_utf8(body):
        return body
    from charset_normalizer import from_bytes  # imported late: only undeclared, non-UTF-8 pages pay for it

    guess = from_bytes(body[:DETECT_BYTES]).best()
    if guess is not None:
        try:
            return body.decode(guess.encoding)
        except (UnicodeDecodeError, LookupError):
            pass
    raise SampleError(Reason.BAD_ENCODING, "no charset declared, not UTF-8, and none detected that decodes it")


@functools.lru_cache(maxsize=256)  # a few Content-Type values cover most pages
def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def read_page(
    url: str,
    body: bytes,
    *,
    content_type: str | None,
    charset: str | None,
    max_bytes: int,
    want_links: bool = False,
    disallowed_directives: Iterable[str] = (),
) -> PageExtraction:
    """The page's extraction, or ``SampleError`` with the page's one reason."""
    if len(body) > max_bytes:
        raise SampleError(Reason.PAGE_TOO_LARGE, f"{len(body)} bytes > {max_bytes}")
    media_type = _media_type(content_type)
    if media_type and media_type not in HTML_TYPES:
        raise SampleError(Reason.NOT_HTML, media_type)
    if looks_binary(body):
        raise SampleError(Reason.NOT_HTML, "binary bytes in what claims to be HTML")
    html = decode_html(body, charset)
    try:
        return extract_html(url, html, want_links=want_links, disallowed_directives=disallowed_directives)
    except (ValueError, RuntimeError, MemoryError, UnicodeError) as exc:
        raise SampleError(Reason.HTML_PARSE_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None
