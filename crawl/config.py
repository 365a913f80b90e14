"""CrawlConfig: every option of the crawl stage, checked before any work starts.

Names follow ingest where the meaning is the same (``output_folder``,
``allow_networks``, ``user_agent_token``, ``timeout``, ``retries``,
``max_redirects``, ``incremental_mode``), so one habit serves both stages; where
units run is ``core.executor.Execution``, the options every stage shares
(``distributor``, ``workers``, ``max_retries``, ``max_in_flight``, ``ray_address``,
``progress``), with the crawl's former names for two of them accepted (``ALIASES``):
``processes_count`` = workers, ``max_unit_retry`` = max_retries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from core.config import ConfigError, at_least, option, problem
from core.executor import Execution
from ingest.fetcher import FetchConfig
from ingest.safety import NetworkPolicy

DEFAULT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to read at least 500 KiB


@dataclass
class CrawlConfig(Execution):
    ALIASES: ClassVar[dict[str, str]] = {"processes_count": "workers", "max_unit_retry": "max_retries"}

    workers: int = option(
        0, "units run at once, one CPU each: WARC files read, and partitions of the seed crawl's hosts "
        "(0: one per CPU of this machine, or of the Ray cluster)"
    )
    seeds: list[str] = option([], "seed page URLs to crawl from (comma-separated or '[\"u1\",\"u2\"]')")
    seed_file: str = option("", "a text file of seed URLs, one per line (local or s3://); added to --seeds")
    warc: list[str] = option(
        [], "WARC or WAT files, or folders of them (.warc, .warc.gz, .wat, .wat.gz; local or s3://)"
    )
    output_folder: str = option(
        "", "where the URL list goes (local or s3://): part files *.parquet with url, caption, page_url, "
        "caption_source, and _crawl_stats.json (counts per reason), written last"
    )
    max_depth: int = option(2, "links followed from a seed: 0 fetches the seeds only")
    max_pages: int = option(1000, "pages requested at most, over the whole crawl (robots.txt not counted)")
    allowed_domains: list[str] = option(
        [], "hosts a crawl may visit, each with its subdomains (none: the seeds' own hosts)"
    )
    delay: float = option(1.0, "seconds between the end of one request to a host and the start of the next")
    max_crawl_delay: float = option(
        30.0, "a robots.txt Crawl-delay up to this is honoured (it raises --delay for that host); a host asking "
        "for more is not crawled (crawl_delay_too_long), rather than crawled faster than it asked"
    )
    obey_robots: bool = option(True, "fetch and honour each host's robots.txt (turn off only for sites you run)")
    concurrency: int = option(16, "page requests in flight per crawl worker, never more than one per host")
    max_page_bytes: int = option(2_000_000, "pages (and WARC records) larger than this are page_too_large")
    timeout: float = option(10.0, "overall deadline per request in seconds, body included")
    retries: int = option(0, "retries per page for retryable failures (timeouts, resets, 429, 5xx)")
    max_redirects: int = option(5, "redirect hops followed per page; each hop is scheduled like a new page")
    allow_networks: list[str] = option(
        [], "CIDRs exempt from the private/loopback/link-local/metadata block, e.g. 127.0.0.1/32"
    )
    user_agent_token: str | None = option(None, "your contact or project name, added to the User-Agent")
    disallowed_header_directives: list[str] = option(
        DEFAULT_DIRECTIVES,
        "X-Robots-Tag and <meta name=robots> directives that opt a page's images out; '[]' honours none",
    )
    incremental_mode: str = option(
        "incremental", "incremental: skip WARC files (and a seed crawl) already committed; overwrite: start afresh"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output_folder:
            problem("output_folder: required")
        if not (self.seeds or self.seed_file or self.warc):
            problem("nothing to crawl: give --seeds, --seed_file and/or --warc")
        for seed in self.seeds:
            parts = urlsplit(seed)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problem(f"seeds: {seed!r} is not an absolute http(s) URL")
        if self.incremental_mode not in ("incremental", "overwrite"):
            problem(f"incremental_mode={self.incremental_mode!r}: choose incremental or overwrite")
        at_least(self, 1, "max_pages", "concurrency", "max_page_bytes")
        at_least(self, 0, "max_depth", "retries", "max_redirects")
        for name in ("delay", "max_crawl_delay"):
            if getattr(self, name) < 0:
                problem(f"{name}={getattr(self, name)}: must be zero or more seconds")
        if not self.timeout > 0:
            problem(f"timeout={self.timeout}: must be a positive number of seconds")
        self.allowed_domains = [d.strip().lower().strip(".") for d in self.allowed_domains if d.strip()]
        self.network_policy()  # its own check, now

    def network_policy(self) -> NetworkPolicy:
        try:
            return NetworkPolicy.from_cidrs(self.allow_networks)
        except ValueError as exc:
            raise ConfigError(f"allow_networks: {exc}") from None

    def page_fetch_config(self) -> FetchConfig:
        """Pages: any content type (we check it), redirects handed back to the scheduler."""
        return FetchConfig(
            timeout=self.timeout,
            retries=self.retries,
            max_bytes=self.max_page_bytes,
            max_redirects=self.max_redirects,
            concurrency=self.concurrency,
            per_host_limit=1,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=self.directives(),
            refused_types=(),
            follow_redirects=False,
        )

    def robots_fetch_config(self) -> FetchConfig:
        """robots.txt: redirects followed (RFC 9309: at least five), no opt-out headers apply."""
        return dataclasses.replace(
            self.page_fetch_config(),
            max_bytes=ROBOTS_MAX_BYTES,
            max_redirects=max(5, self.max_redirects),
            disallowed_header_directives=(),
            follow_redirects=True,
        )

    def directives(self) -> tuple[str, ...]:
        return tuple(d.lower() for d in self.disallowed_header_directives)
