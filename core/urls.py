"""One spelling per URL, so that a duplicate is recognised however it was written.

Ingest (before download, to save bandwidth) and the filter (after) both dedupe by
URL; they must agree on when two URLs are the same, so the rule lives here once.
It is the conservative, RFC 3986 §6.2.2 kind of normalisation: only changes that
can never point the URL at another resource. Dot segments, query order, trailing
slashes and ``www.`` are left alone — servers do treat those differently.

Ingest normalises every input row in one driver process, so speed matters: most
web URLs are already in normal form, and one regex recognises them; the rest of
plain http(s) URLs are split by another; only the unusual ones (IPv6, user info,
other schemes, whitespace inside) take ``urllib``. All three give the same answer
(tests/test_ingest_plan.py fuzzes them against each other).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Already normal: lower-case http(s) scheme and host, no port, a path, no escapes,
# no fragment, no empty query. Normalising such a URL leaves it unchanged.
_NORMAL_HTTP = re.compile(r"https?://[a-z0-9.\-]+/[^?#%\s]*(?:\?[^#%\s]+)?")
# Plain http(s) in any case, with port, escapes or fragment; no user info, no IPv6.
_PLAIN_HTTP = re.compile(
    r"(?P<scheme>[Hh][Tt][Tt][Pp][Ss]?)://(?P<host>[A-Za-z0-9.\-_~%!$&'()*+,;=]+)(?::(?P<port>[0-9]{0,5}))?"
    r"(?P<path>/[^?#\s]*)?(?:\?(?P<query>[^#\s]*))?(?:#\S*)?"
)


def _normalize_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _normalize_escapes(text: str) -> str:
    """``%7e`` → ``~`` (an unreserved character needs no escape); ``%2f`` → ``%2F``."""
    return _PERCENT_ESCAPE.sub(_normalize_escape, text) if "%" in text else text


def normalize_url(url: str) -> str:
    """The URL in its normal form: equal for URLs a server cannot tell apart.

    Surrounding whitespace is stripped; scheme and host go to lower case; the
    scheme's default port (80, 443) and the fragment (never sent to the server) are
    dropped; an empty path becomes ``/``; percent-escapes are upper-cased and those
    of unreserved characters decoded. User info, path and query keep their case.

    Raises ``ValueError`` for text ``urllib`` cannot split (an unclosed IPv6
    bracket, a port that is not a number from 0 to 65535): callers dedupe such
    rows by their raw text, and the fetcher reports them as ``invalid_url``.
    """
    url = url.strip()
    if _NORMAL_HTTP.fullmatch(url):
        return url
    plain = _PLAIN_HTTP.fullmatch(url)
    if plain is None or int(plain["port"] or 0) > 65535:
        return normalize_url_by_urlsplit(url)
    scheme = plain["scheme"].lower()
    netloc = plain["host"].lower()
    if plain["port"] and int(plain["port"]) != DEFAULT_PORTS[scheme]:
        netloc += f":{int(plain['port'])}"
    path, query = _normalize_escapes(plain["path"] or "/"), _normalize_escapes(plain["query"] or "")
    return f"{scheme}://{netloc}{path}?{query}" if query else f"{scheme}://{netloc}{path}"


def normalize_url_by_urlsplit(url: str) -> str:
    """``normalize_url`` for any URL, by ``urllib.parse.urlsplit``: slower, the reference."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    if netloc:
        host = (parts.hostname or "").lower()  # IPv6 brackets removed; lower() again for a "%zone"
        if ":" in host:
            host = f"[{host}]"
        port = parts.port  # raises ValueError for a bad port
        userinfo = netloc.rpartition("@")[0]
        netloc = (f"{userinfo}@" if "@" in netloc else "") + host
        if port is not None and port != DEFAULT_PORTS.get(scheme):
            netloc += f":{port}"
    path = _normalize_escapes(parts.path) or ("/" if netloc else "")
    return urlunsplit((scheme, netloc, path, _normalize_escapes(parts.query), ""))
