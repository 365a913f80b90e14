"""A run that did little or nothing says so: the dominant reason and the likely fix.

``verdict`` judges a stage's result from its counts per reason code (``core.reasons``):

* nothing kept (downloaded, decided keep, paired) out of some rows: ``EmptyResult`` is
  raised (``core.cli`` prints it and exits 1), its message naming the dominant reason,
  how many rows it took and what to change;
* fewer than ``LOW_YIELD`` (20 %) of the rows kept: a warning of the same form on stderr,
  exit code unchanged (the result is usable, but probably not what was meant).
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Callable

from core.cli import EmptyResult

LOW_YIELD = 0.2  # below this fraction of rows kept, a run warns (documented in README, "When a run goes wrong")

_HINTS: dict[str, str] = {
    "ssrf_blocked": "the addresses are private or loopback: add --allow_networks with their network "
                    "(e.g. 127.0.0.1/32 for a server on this machine)",
    "invalid_url": "no URL could be read from the rows: is --input_format right (the default is txt), "
                   "and --url_col the column holding the URLs?",
    "unsupported_scheme": "the URLs are not http(s): is --url_col the column holding the URLs?",
    "dns_error": "the host names do not resolve: check the URLs and this machine's DNS",
    "connection_error": "the servers refused or dropped the connections: are they up?",
    "timeout": "the servers answered too slowly: raise --timeout",
    "http_403": "the servers refused (403): check the URLs, or --user_agent_token",
    "http_404": "the URLs do not exist (404): check the URL list",
    "http_429": "the servers rate-limited the requests: lower --per_host_limit / --thread_count",
    "opt_out": "the images opt out of AI use (X-Robots-Tag)",
    "not_image": "the URLs do not serve images: is --url_col the image URL column?",
    "caption_missing": "the rows have no caption: give --caption_col (the column holding the captions)",
    "caption_short": "the captions are too short: check --caption_col, or lower --min_caption_chars / "
                     "--min_caption_words",
    "caption_boilerplate": "the captions are file names or generic words: check --caption_col, or "
                           "--reject_boilerplate_captions false",
    "dup_url": "the rows repeat earlier (URL, caption) pairs",
    "language": "the captions are in other languages than --languages (ISO 639-1 codes, e.g. en)",
    "low_clip_score": "the CLIP scores are below --clip_threshold: lower it or use --clip_top_fraction",
    "clip_score_missing": "no CLIP score was found for the samples: are --clip_scores / --embeddings made from "
                          "this pool?",
    "too_small": "the images are smaller than --min_image_size",
    "aspect_ratio": "the images are more elongated than --max_aspect_ratio",
    "near_blank": "the images are near-blank: lower --min_luma_std",
    "decode_error": "the bodies are not decodable images",
    "robots_disallowed": "the sites' robots.txt disallows our User-Agent: crawl other sites",
    "robots_unreachable": "the sites' robots.txt could not be fetched: are the servers up?",
    "alt_meaningless": "the images have no meaningful alt text to use as a caption",
    "out_of_scope": "the links lead outside --allowed_domains",
    "depth_limit": "the images are deeper than --max_depth: raise it",
    "not_html": "the seeds are not HTML pages: give page URLs as --seeds",
    "warc_malformed": "the files are not WARC/WAT archives",
    "image_missing": "the samples have no image member: are these image-text shards (key.jpg beside key.txt)?",
    "too_many_pixels": "the images announce more pixels than --max_image_pixels",
    "shard_error": "the tar files cannot be read to the end: run python -m shards.verify on them",
    "hash_missing": "the pool rows lack sha256/pHash: was the pool written by `python -m ingest`?",
}


def hint(reason: str, example: str | None = None) -> str:
    """What to do about ``reason``; with an example error message, as precise as it allows."""
    if reason == "ssrf_blocked" and example:
        match = re.match(r"\s*([0-9a-fA-F.:]+) is ", example)
        if match:
            with_prefix = ipaddress.ip_network(match.group(1))  # one address: /32 or /128
            return f"add --allow_networks {with_prefix} (if you trust that server: {example})"
    return _HINTS.get(reason, f"core/reasons.py says what {reason!r} means")


def verdict(stage: str, rows: int, kept: int, reasons: dict[str, int], kept_word: str,
            example: Callable[[str], str | None] | None = None) -> None:
    """Raise ``EmptyResult`` when ``kept`` is 0 of ``rows`` (or there were no rows); warn when the yield is low."""
    if rows == 0:
        raise EmptyResult(f"the input has no rows; nothing was {kept_word}")
    if kept and kept >= LOW_YIELD * rows:
        return
    dominant, count = max(reasons.items(), key=lambda kv: kv[1]) if reasons else ("unknown", rows - kept)
    what = "all" if count == rows else f"{count} of the"
    message = (f"{kept} of {rows} rows {kept_word}; {what} {rows} rows {dominant}: "
               f"{hint(dominant, example(dominant) if example else None)}")
    if not kept:
        raise EmptyResult(message)
    print(f"{stage}: warning: {message} (fewer than {LOW_YIELD:.0%} {kept_word})", file=sys.stderr)
