"""A seed-crawl unit: one partition's hosts, crawled politely until nothing is left to do.

Every host belongs to exactly one partition (``owner_of``: a stable hash of the host
name), and a partition to one unit at a time, so the host's queue and the pause
between its requests live in one place, and the per-host delay holds however many
units run. crawl/run.py runs a seed crawl in rounds of such units on ``core.executor``
(inline, local processes or Ray tasks): a unit is handed the links of its partition
that the driver admitted (``Assignment``), crawls them and, at once, the links it
finds to its own hosts, up to its share of the page budget; what it cannot take — links
to other partitions' hosts, links over its budget — goes back to the driver
(``Outcome``), which routes them into the next round. What a partition learnt (the
URLs it scheduled, its origins' robots.txt) travels with its next assignment, so
robots.txt is fetched once per origin and a URL scheduled once per crawl.

For each URL, in order: robots.txt of its origin (fetched once, as the host's first
request; its Crawl-delay raises the host's delay), the robots rules, then the page
through ``fetch.PageClient``; a redirect target is routed like a found link, of the
same depth, one hop further. A unit's first request to a host waits the host's delay
(``HostScheduler(since=...)``): the request before it may have been the previous
round's, or a failed try's of this very unit.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from core.executor import report
from core.reasons import Reason, SampleError
from crawl.config import CrawlConfig
from crawl.fetch import PageClient
from crawl.output import CrawlStats, PairWriter
from crawl.page import read_page
from crawl.politeness import HostScheduler
from crawl.robots import ALLOW_ALL, RobotsPolicy


@dataclass(frozen=True)
class Link:
    url: str
    depth: int  # link hops from a seed
    hops: int = 0  # redirect hops that led to this URL


@dataclass
class Assignment:
    """One unit of a seed crawl: a partition's links for this round, and what it learnt before."""

    part: int  # the unit's number: its part file is seeds-{part:05d}.parquet
    partition: int
    partitions: int
    links: list[Link]  # admitted by the driver: each is crawled
    budget: int  # URLs this unit may schedule itself, beyond ``links``
    scheduled: set[str] = field(default_factory=set)  # its hosts' URLs scheduled before (``links`` included)
    robots: dict[str, RobotsPolicy] = field(default_factory=dict)  # origin -> policy, fetched before


@dataclass
class Outcome:
    """What a unit hands back: its counts, the links for the driver, and what it learnt."""

    partition: int
    stats: dict
    links: list[Link]  # to other partitions' hosts, or over this unit's budget
    scheduled: list[str]  # URLs this unit scheduled itself
    robots: dict[str, RobotsPolicy]  # policies it fetched


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def owner_of(host: str, partitions: int) -> int:
    """The partition that owns ``host``: stable across processes and runs (not Python's salted hash)."""
    return zlib.crc32(host.encode("utf-8", "replace")) % partitions


def in_scope(host: str, domains: tuple[str, ...]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Budget:
    """URLs that may still be scheduled: one for the whole crawl in the driver, a share in a unit."""

    left: int


class Frontier:
    """Which URLs of a partition's hosts are scheduled, and whether the budget takes another:
    the one rule, in the driver and in a unit. ``scheduled`` is the set it adds to."""

    def __init__(self, budget: Budget, scheduled: set[str], stats: CrawlStats):
        self.budget, self.scheduled, self.stats = budget, scheduled, stats

    def admit(self, link: Link) -> bool | None:
        """True: scheduled now; False: scheduled before; None: over the budget (nothing counted).

        A redirect whose target was already scheduled ends its page as ``dup_url``: the
        target is (or was) crawled on its own, and a redirect loop ends at its first repeat.
        """
        if link.url in self.scheduled:
            if link.hops:  # a redirect to a URL already scheduled (a loop, or a known page): its page ends here
                self.stats.pages += 1
                self.stats.count(Reason.DUP_URL.value)
            return False
        if self.budget.left <= 0:
            return None
        self.scheduled.add(link.url)
        self.budget.left -= 1
        self.stats.links_followed += 1
        return True


class CrawlWorker:
    """Crawls one ``Assignment`` into its part file: ``Outcome = await CrawlWorker(...).crawl()``."""

    def __init__(self, cfg: CrawlConfig, assignment: Assignment, part_path: str, domains: list[str]):
        self.cfg = cfg
        self.assignment = assignment
        self.domains = tuple(domains)
        self.stats = CrawlStats()
        self._frontier = Frontier(Budget(assignment.budget), set(assignment.scheduled), self.stats)
        self._new: list[str] = []  # URLs scheduled here
        self._out: list[Link] = []  # links for the driver
        self._part_path = part_path
        self._scheduler: HostScheduler[Link] = HostScheduler(cfg.delay, time.monotonic, since=time.monotonic())
        self._robots: dict[str, RobotsPolicy] = {}
        for origin, policy in assignment.robots.items():
            self._learn(origin, policy)
        self._client: PageClient | None = None
        self._writer: PairWriter | None = None
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None  # made in the running loop
        self._failure: BaseException | None = None

    async def crawl(self) -> Outcome:
        """Crawl until nothing is queued or in flight; commit the part file (or leave none) and report."""
        self._wake = asyncio.Event()
        self._writer = PairWriter(self._part_path)
        try:
            async with PageClient(self.cfg) as self._client:
                for link in self.assignment.links:
                    self._scheduler.push(host_of(link.url), link)
                await self._run()
        except BaseException:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._writer.abort()
            raise
        self._writer.close()
        report(self.stats.pages, pairs=self.stats.pairs)
        learnt = {o: p for o, p in self._robots.items() if o not in self.assignment.robots}
        return Outcome(self.assignment.partition, self.stats.to_dict(), self._out, self._new, learnt)

    def _idle(self) -> bool:
        return self._scheduler.queued == 0 and self._in_flight == 0

    def _learn(self, origin: str, policy: RobotsPolicy) -> None:
        """An origin's robots.txt policy; its Crawl-delay, when honoured, raises the host's delay."""
        self._robots[origin] = policy
        if policy.crawl_delay is not None and policy.crawl_delay <= self.cfg.max_crawl_delay:
            self._scheduler.set_delay(host_of(origin), max(self.cfg.delay, policy.crawl_delay))

    # -- the crawl loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while self._failure is None:
            timeout = None
            if self._in_flight < self.cfg.concurrency:
                ready = self._scheduler.pop_ready()
                if ready is not None:
                    self._in_flight += 1
                    task = asyncio.create_task(self._visit(*ready))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    continue
                if self._idle():
                    return
                timeout = self._scheduler.seconds_until_ready()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
        raise RuntimeError(f"crawl unit {self.assignment.part} failed") from self._failure

    async def _visit(self, host: str, link: Link) -> None:
        requested = False
        try:
            policy = self._robots.get(_origin(link.url)) if self.cfg.obey_robots else ALLOW_ALL
            if policy is None:  # this host's first request is its robots.txt; the page waits its turn
                requested = True
                self.stats.requests += 1
                self._learn(_origin(link.url), await self._client.robots(link.url))
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
        except BaseException as exc:  # a bug: the unit fails (and is retried), never hangs
            self._failure = exc
        finally:
            self._scheduler.release(host, requested=requested)
            self._in_flight -= 1
            self._wake.set()
            report(self.stats.pages, pairs=self.stats.pairs)

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
        """A link found (or a redirect target): checked for scope and depth, then crawled here or handed back."""
        if not in_scope(host_of(url), self.domains):
            if redirect:  # the page itself ends here
                raise SampleError(Reason.OUT_OF_SCOPE, url)
            self.stats.count(Reason.OUT_OF_SCOPE.value)
            return
        if depth > self.cfg.max_depth:
            self.stats.count(Reason.DEPTH_LIMIT.value)
            return
        link = Link(url, depth, hops)
        host = host_of(url)
        if owner_of(host, self.assignment.partitions) != self.assignment.partition:
            self._out.append(link)  # another partition's host
            return
        admitted = self._frontier.admit(link)
        if admitted:
            self._new.append(url)
            self._scheduler.push(host, link)
        elif admitted is None:
            self._out.append(link)  # over this unit's share of the budget: another unit's may be left
