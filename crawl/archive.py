"""One WARC or WAT file → pairs in a part file, and a count for every record that yields none.

Which records are pages: ``response`` records holding an HTTP response
(``application/http``), ``resource`` records (a page stored without its HTTP
exchange, as some archivers do) and WAT ``metadata`` records whose JSON describes an
HTML page. Requests, warcinfo, DNS and revisit records are read past: counted as
records, not as pages. A response page is judged as a fetched page is — HTTP status,
``X-Robots-Tag`` opt-outs, then ``page.read_page`` — so the two inputs agree.
"""

from __future__ import annotations

import functools
import json

from core.reasons import Reason, SampleError, http_reason
from crawl.config import CrawlConfig
from crawl.extract import PageExtraction, extract_wat
from crawl.output import CrawlStats, PairWriter
from crawl.page import HTML_TYPES, read_page
from crawl.warc import WarcRecord, http_payload, iter_warc
from ingest.fetcher import opt_out_directive

HTTP_HEADER_ALLOWANCE = 65536  # a response block holds headers besides the page's bytes


@functools.lru_cache(maxsize=256)  # a few Content-Type values cover most pages
def _charset(content_type: str | None) -> str | None:
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip("\"'") or None
    return None


def _response_page(record: WarcRecord, cfg: CrawlConfig, directives: tuple[str, ...]) -> PageExtraction:
    if not record.complete:  # judge by the headers what the unread rest was
        head = http_payload(record.block, cfg.max_page_bytes, headers_only=True)
        media_type = (head.header("content-type") or "").split(";")[0].strip().lower()
        if media_type and media_type not in HTML_TYPES:
            raise SampleError(Reason.NOT_HTML, media_type)
        raise SampleError(Reason.PAGE_TOO_LARGE, f"record of {record.length} bytes")
    payload = http_payload(record.block, cfg.max_page_bytes)
    if not 200 <= payload.status < 300:
        raise SampleError(http_reason(payload.status), f"archived HTTP {payload.status}")
    robots_tags = payload.headers.get("x-robots-tag")
    directive = opt_out_directive(robots_tags, directives, cfg.user_agent_token) if robots_tags else None
    if directive:
        raise SampleError(Reason.OPT_OUT, f"X-Robots-Tag: {directive}")
    content_type = payload.header("content-type")
    return read_page(record.target_uri, payload.body, content_type=content_type, charset=_charset(content_type),
                     max_bytes=cfg.max_page_bytes, disallowed_directives=directives)


def record_extraction(
    record: WarcRecord, cfg: CrawlConfig, directives: tuple[str, ...] | None = None,
) -> tuple[str | None, PageExtraction | None]:
    """``(page_url, extraction)``; ``(None, None)`` for a record that is no page; ``SampleError`` for a bad page.

    ``directives``: ``cfg.directives()``, computed once per file by the caller.
    """
    if directives is None:
        directives = cfg.directives()
    kind = record.type
    if kind == "response" and record.content_type.startswith("application/http"):
        if not record.target_uri:
            raise SampleError(Reason.WARC_MALFORMED, "response record without WARC-Target-URI")
        return record.target_uri, _response_page(record, cfg, directives)
    if kind == "resource" and record.target_uri and record.target_uri.startswith(("http://", "https://")):
        if not record.complete:
            raise SampleError(Reason.PAGE_TOO_LARGE, f"record of {record.length} bytes")
        return record.target_uri, read_page(
            record.target_uri, record.block, content_type=record.content_type, charset=_charset(record.content_type),
            max_bytes=cfg.max_page_bytes, disallowed_directives=directives,
        )
    if kind == "metadata" and record.content_type.startswith("application/json"):
        if not record.complete:
            raise SampleError(Reason.PAGE_TOO_LARGE, f"WAT record of {record.length} bytes")
        try:
            return extract_wat(json.loads(record.block), directives)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SampleError(Reason.WARC_MALFORMED, f"WAT JSON: {type(exc).__name__}: {exc}"[:200]) from None
    return None, None


def crawl_warc_file(path: str, cfg: CrawlConfig, writer: PairWriter, stats: CrawlStats) -> None:
    """Every record of ``path`` into ``writer`` and ``stats``; a damaged file ends early, counted."""
    directives = cfg.directives()
    try:
        for record in iter_warc(path, cfg.max_page_bytes + HTTP_HEADER_ALLOWANCE):
            take_record(record, cfg, directives, writer, stats)
    except SampleError as error:  # the file itself is damaged: what came before it stands
        stats.count(error.reason.value)


def take_record(record: WarcRecord, cfg: CrawlConfig, directives: tuple[str, ...], writer: PairWriter,
                stats: CrawlStats) -> None:
    """One record: its pairs into ``writer``, or its one reason into ``stats``."""
    stats.records += 1
    try:
        page_url, extraction = record_extraction(record, cfg, directives)
    except SampleError as error:
        stats.pages += 1
        stats.count(error.reason.value)
        return
    if extraction is None:
        return
    stats.pages += 1
    if extraction.opt_out:
        stats.count(Reason.OPT_OUT.value)
        return
    stats.pages_parsed += 1
    stats.pairs += len(extraction.pairs)
    reasons, counted = stats.reasons, stats.reasons.get  # Counter.update, without its isinstance checks
    for reason, n in extraction.reasons.items():
        reasons[reason] = counted(reason, 0) + n
    writer.add(page_url, extraction.pairs)
