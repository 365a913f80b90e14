"""The rules a pool row must pass to be kept: the place a sample is rejected, and why.

Each rule looks at one row's metadata (never the image: decisions are cheap to
recompute) and returns the ``Reason`` it fails, or None. ``Deduper`` holds the
only cross-row state: what has been seen earlier in key order, so the first copy
is kept and later ones are rejected — the same decision whatever the order work
is done in, as long as rows are offered in key order.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from core.reasons import Reason
from filter.config import FilterConfig


def normalize_url(url: str) -> str:
    """Scheme and host in lower case, default port and fragment dropped."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port in (None, default) else f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))


def download_reason(row: dict[str, Any]) -> Reason | None:
    """Rows that failed in ingest keep their ingest reason."""
    if row["status"] == "success":
        return None
    try:
        return Reason(row["reason"])
    except ValueError:
        return Reason.DECODE_ERROR if row["status"] == "failed_to_resize" else Reason.CONNECTION_ERROR


def caption_reason(caption: str | None, cfg: FilterConfig) -> Reason | None:
    text = (caption or "").strip()
    if not text:
        return Reason.CAPTION_MISSING
    if len(text) < cfg.min_caption_chars or len(text.split()) < cfg.min_caption_words:
        return Reason.CAPTION_SHORT
    return None


def image_reason(row: dict[str, Any], cfg: FilterConfig) -> Reason | None:
    width = row.get("original_width") or row.get("width")
    height = row.get("original_height") or row.get("height")
    if not width or not height:
        return Reason.DECODE_ERROR
    if min(width, height) < cfg.min_image_size:
        return Reason.TOO_SMALL
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return Reason.ASPECT_RATIO
    return None


class Deduper:
    """Remembers URLs and image hashes of earlier rows (in key order)."""

    def __init__(self) -> None:
        self._urls: set[str] = set()
        self._hashes: set[str] = set()

    def url_reason(self, url: str | None) -> Reason | None:
        if not url:
            return None
        try:
            key = normalize_url(url)
        except ValueError:
            key = url
        if key in self._urls:
            return Reason.DUP_URL
        self._urls.add(key)
        return None

    def exact_reason(self, sha256: str | None) -> Reason | None:
        if not sha256:
            return None
        if sha256 in self._hashes:
            return Reason.DUP_EXACT
        self._hashes.add(sha256)
        return None


def decide(row: dict[str, Any], cfg: FilterConfig, seen: Deduper) -> Reason | None:
    """The first failing reason for ``row``, or None to keep it.

    Order matters and is part of the contract: a failed download keeps its ingest
    reason; a repeated URL is rejected before its caption or image is judged; the
    exact-duplicate check only counts copies that passed every other rule, so the
    kept copy is the first acceptable one.
    """
    reason = download_reason(row)
    if reason is None and cfg.dedupe_url:
        reason = seen.url_reason(row.get("url"))
    if reason is None:
        reason = caption_reason(row.get("caption"), cfg) or image_reason(row, cfg)
    if reason is None and cfg.dedupe_exact:
        reason = seen.exact_reason(row.get("sha256"))
    return reason
