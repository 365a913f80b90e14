"""The crawl's output: parquet part files of pairs, and counts that explain the rest.

Each unit of work (one WARC file, or one partition's round of a seed crawl)
writes one part file, streamed a row group at a time (memory: one row group,
whatever the archive's size) and visible only once complete (``atomic_write``:
rename locally, one completed upload on S3). A unit's ``*_stats.json`` is written
after its part and marks it done, so a rerun skips it; ``_crawl_stats.json``, the
totals, comes last of all.

The columns are what ``python -m ingest`` reads: ``url`` and ``caption``, plus
``page_url`` and ``caption_source`` to keep with ``--save_additional_columns``.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from crawl.extract import Pair

PAIR_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("page_url", pa.string()),  # the page the image was found on
        ("caption_source", pa.string()),  # "alt" or "figcaption"
    ]
)
ROWS_PER_GROUP = 50_000
STATS_FILE = "_crawl_stats.json"


@dataclass
class CrawlStats:
    """Counts of one unit (or of them all): every page, image and link ends in one of them.

    Page reasons count pages, image reasons ``<img>`` elements; link reasons
    (``out_of_scope``, ``depth_limit``, ``page_limit``) count link occurrences: a link on
    ten pages counts ten times (counting distinct URLs would need memory that grows).
    """

    records: int = 0  # WARC records read (all types)
    pages: int = 0  # pages seen: WARC response/resource/WAT records, fetched or refused URLs
    pages_parsed: int = 0  # pages whose HTML was read for images
    pairs: int = 0
    links_followed: int = 0
    requests: int = 0  # HTTP requests sent, robots.txt included
    reasons: Counter = field(default_factory=Counter)

    def count(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] += n

    def add(self, other: "CrawlStats | dict[str, Any]") -> None:
        other = other if isinstance(other, CrawlStats) else CrawlStats.from_dict(other)
        for name in ("records", "pages", "pages_parsed", "pairs", "links_followed", "requests"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "pages": self.pages, "pages_parsed": self.pages_parsed, "pairs": self.pairs,
            "links_followed": self.links_followed, "requests": self.requests,
            "reasons": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CrawlStats":
        names = ("records", "pages", "pages_parsed", "pairs", "links_followed", "requests")
        return cls(**{n: int(data.get(n, 0)) for n in names}, reasons=Counter(data.get("reasons", {})))

    def lines(self) -> list[str]:
        out = [
            f"{self.pairs} pairs from {self.pages_parsed} of {self.pages} pages "
            f"({self.records} WARC records, {self.requests} HTTP requests, {self.links_followed} links followed)"
        ]
        out += [f"  {reason:<22} {n}" for reason, n in self.to_dict()["reasons"].items()]
        return out


class PairWriter:
    """Pairs into one parquet file, a row group at a time; committed by ``close()``, gone on ``abort()``."""

    def __init__(self, path: str, rows_per_group: int = ROWS_PER_GROUP):
        self.path = path
        self.rows = 0
        self._rows_per_group = rows_per_group
        # This row group's columns, as lists of str: the collector never walks str (a list of 50,000 Pair
        # tuples would be walked by every full collection), plus each page's URL and its number of pairs.
        self._columns: tuple[list[str], list[str], list[str]] = ([], [], [])  # url, caption, caption_source
        self._pages: list[str] = []
        self._counts: list[int] = []
        self._stack = contextlib.ExitStack()
        self._handle = self._stack.enter_context(storage.atomic_write(path, "wb"))
        # Dictionary pages only where values repeat (a page's URL, the caption source): URLs and captions
        # are nearly all distinct, and hashing them into a dictionary only to give up on it costs time.
        # No column statistics: min/max URLs and captions serve no reader (ingest reads the list whole), and
        # computing them is a tenth of the writer's time.
        self._writer = pq.ParquetWriter(self._handle, PAIR_SCHEMA, compression="zstd",
                                        use_dictionary=["page_url", "caption_source"], write_statistics=False)

    def add(self, page_url: str, pairs: list[Pair]) -> None:
        if not pairs:
            return
        urls, captions, sources = self._columns
        page_urls, page_captions, page_sources = zip(*pairs)
        urls += page_urls
        captions += page_captions
        sources += page_sources
        self._pages.append(page_url)
        self._counts.append(len(pairs))
        self.rows += len(pairs)
        if len(urls) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        urls, captions, sources = self._columns
        if urls:
            # each page's URL converted once, then repeated by Arrow
            pages = pa.array(self._pages, pa.string()).take(np.repeat(np.arange(len(self._pages)), self._counts))
            arrays = [pa.array(urls, pa.string()), pa.array(captions, pa.string()), pages,
                      pa.array(sources, pa.string())]
            self._writer.write_table(pa.Table.from_arrays(arrays, schema=PAIR_SCHEMA))
            self._columns, self._pages, self._counts = ([], [], []), [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._stack.close()  # the rename (or the upload's completion): now readers see it

    def abort(self) -> None:
        """Leave nothing behind: no half file is ever visible under the part's name."""
        discard = getattr(self._handle, "discard", None)
        if callable(discard):  # an S3 upload in progress: drop it instead of completing it
            discard()
        with contextlib.suppress(Exception):
            self._writer.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_unit_stats(path: str, stats: CrawlStats, **extra: Any) -> None:
    storage.write_json(path, {**extra, **stats.to_dict(), "written_at": time.time()})
