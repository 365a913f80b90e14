"""A crawl worker: the hosts it owns, crawled politely, pairs into its own part file.

Every host belongs to exactly one worker (``owner_of``: a stable hash of the host
name), so its queue, its robots.txt and the time of its last request live in one
place, and the per-host delay holds however many workers run. Inline it runs in the
driver's event loop; on Ray it is an async actor (one CPU): the same class, the same
methods.

The driver talks to it in ``step`` calls: hand over the URLs it routed here, get
back the links found since the last call (already checked for scope and depth) and
whether the worker has gone idle. Between calls the worker keeps crawling.

For each URL, in order: robots.txt of its origin (fetched once, as the host's first
request; its Crawl-delay raises the host's delay), the robots rules, then the page
through ``fetch.PageClient``; a redirect target goes back to the driver as a new
link of the same depth, one hop further.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.reasons import Reason, SampleError
from crawl.config import CrawlConfig
from crawl.fetch import PageClient
from crawl.output import CrawlStats, PairWriter
from crawl.page import read_page
from crawl.politeness import HostScheduler
from crawl.robots import ALLOW_ALL, RobotsPolicy

STEP_SECONDS = 0.5  # longest a step call waits for news before answering
STEP_LINKS = 500  # a step answers early once this many links are waiting


@dataclass(frozen=True)
class Link:
    url: str
    depth: int  # link hops from a seed
    hops: int = 0  # redirect hops that led to this URL


@dataclass(frozen=True)
class StepReport:
    links: list[Link]
    idle: bool  # nothing queued, nothing in flight
    pages: int  # pages decided so far (fetched or refused), for progress
    pairs: int


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def owner_of(host: str, workers: int) -> int:
    """The worker that owns ``host``: stable across processes and runs (not Python's salted hash)."""
    return zlib.crc32(host.encode("utf-8", "replace")) % workers


def in_scope(host: str, domains: tuple[str, ...]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class CrawlWorker:
    def __init__(self, cfg: CrawlConfig, worker_id: int, part_path: str, domains: list[str]):
        self.cfg = cfg
        self.worker_id = worker_id
        self.domains = tuple(domains)
        self.stats = CrawlStats()
        self._writer = PairWriter(part_path)
        self._scheduler: HostScheduler[Link] = HostScheduler(cfg.delay, time.monotonic)
        self._robots: dict[str, RobotsPolicy] = {}
        self._client: PageClient | None = None
        self._outbox: list[Link] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None  # made in the running loop
        self._news: asyncio.Event | None = None
        self._failure: BaseException | None = None

    # -- the driver's side -----------------------------------------------------------

    async def step(self, links: list[Link]) -> StepReport:
        """Take ``links``, crawl for up to STEP_SECONDS, report what was found."""
        if self._runner is None:
            self._wake, self._news = asyncio.Event(), asyncio.Event()
            self._client = await PageClient(self.cfg).__aenter__()
            self._runner = asyncio.create_task(self._run())
        for link in links:
            self._scheduler.push(host_of(link.url), link)
        self._wake.set()
        deadline = asyncio.get_running_loop().time() + STEP_SECONDS
        while self._failure is None and not self._idle() and len(self._outbox) < STEP_LINKS:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._news.clear()
            try:
                await asyncio.wait_for(self._news.wait(), remaining)
            except TimeoutError:
                break
        if self._failure is not None:
            raise RuntimeError(f"crawl worker {self.worker_id} failed") from self._failure
        links, self._outbox = self._outbox, []
        return StepReport(links, self._idle(), self.stats.pages, self.stats.pairs)

    async def finish(self, commit: bool = True) -> dict:
        """Stop, commit the part file (or drop it), and hand back this worker's counts."""
        if self._runner is not None:
            self._runner.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(self._runner, *self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.__aexit__(None, None, None)
        if commit and self._failure is None:
            self._writer.close()
        else:
            self._writer.abort()
        return self.stats.to_dict()

    def _idle(self) -> bool:
        return self._scheduler.queued == 0 and self._in_flight == 0

    # -- the crawl loop ----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                timeout = None
                if self._in_flight < self.cfg.concurrency:
                    ready = self._scheduler.pop_ready()
                    if ready is not None:
                        self._in_flight += 1
                        task = asyncio.create_task(self._visit(*ready))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                        continue
                    timeout = self._scheduler.seconds_until_ready()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: surface it at the next step, never hang
            self._failure = exc
            self._news.set()

    async def _visit(self, host: str, link: Link) -> None:
        requested = False
        try:
            policy = self._robots.get(_origin(link.url)) if self.cfg.obey_robots else ALLOW_ALL
            if policy is None:  # this host's first request is its robots.txt; the page waits its turn
                requested = True
                self.stats.requests += 1
                policy = self._robots[_origin(link.url)] = await self._client.robots(link.url)
                if policy.crawl_delay is not None and policy.crawl_delay <= self.cfg.max_crawl_delay:
                    self._scheduler.set_delay(host, max(self.cfg.delay, policy.crawl_delay))
                self._scheduler.push(host, link, front=True)
                return
            refusal = self._refusal(policy, link)
            if refusal is not None:
                raise refusal
            requested = True
            self.stats.requests += 1
            fetched = await self._client.page(link.url)
            if fetched.location is not None:
                self._redirect(link, fetched.location)
                return
            extraction = read_page(
                link.url, fetched.data, content_type=fetched.content_type, charset=fetched.charset,
                max_bytes=self.cfg.max_page_bytes, want_links=True, disallowed_directives=self.cfg.directives(),
            )
            self.stats.pages += 1
            for url in extraction.links:
                self._offer(url, link.depth + 1)
            if extraction.opt_out:
                self.stats.count(Reason.OPT_OUT.value)
                return
            self.stats.pages_parsed += 1
            self.stats.pairs += len(extraction.pairs)
            self.stats.reasons.update(extraction.reasons)
            self._writer.add(link.url, extraction.pairs)
        except SampleError as error:
            self.stats.pages += 1
            self.stats.count(error.reason.value)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failure = exc
        finally:
            self._scheduler.release(host, requested=requested)
            self._in_flight -= 1
            self._wake.set()
            self._news.set()

    def _refusal(self, policy: RobotsPolicy, link: Link) -> SampleError | None:
        if policy.blocked is not None:
            return SampleError(policy.blocked, policy.blocked_detail)
        if policy.crawl_delay is not None and policy.crawl_delay > self.cfg.max_crawl_delay:
            return SampleError(Reason.CRAWL_DELAY_TOO_LONG, f"Crawl-delay {policy.crawl_delay:g}s")
        if not policy.allows(link.url):
            return SampleError(Reason.ROBOTS_DISALLOWED, link.url)
        return None

    def _redirect(self, link: Link, location: str) -> None:
        if link.hops >= self.cfg.max_redirects:
            raise SampleError(Reason.TOO_MANY_REDIRECTS, f"more than {self.cfg.max_redirects}")
        self._offer(location, link.depth, link.hops + 1, redirect=True)

    def _offer(self, url: str, depth: int, hops: int = 0, *, redirect: bool = False) -> None:
        """A link found (or a redirect target): checked here for scope and depth, routed by the driver."""
        if not in_scope(host_of(url), self.domains):
            if redirect:  # the page itself ends here
                raise SampleError(Reason.OUT_OF_SCOPE, url)
            self.stats.count(Reason.OUT_OF_SCOPE.value)
        elif depth > self.cfg.max_depth:
            self.stats.count(Reason.DEPTH_LIMIT.value)
        else:
            self._outbox.append(Link(url, depth, hops))
            self._news.set()
