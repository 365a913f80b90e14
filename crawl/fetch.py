"""Pages and robots.txt over HTTP, through ingest's safety layer — not a second one.

``ingest.fetcher.Fetcher`` already does what a polite, safe client must: the
``--allow_networks`` address check after DNS and on every hop, one overall deadline
per request, a byte cap while reading, ``X-Robots-Tag`` opt-outs before the body,
an honest User-Agent. The crawler uses two of them: one for pages (any content
type; a redirect comes back unfollowed so the scheduler treats its target as a new
URL, with its own robots.txt check and per-host delay) and one for robots.txt
(redirects followed, as RFC 9309 asks; no opt-out headers apply to it).
"""

from __future__ import annotations

from core.reasons import Reason, SampleError
from crawl.config import CrawlConfig
from crawl.robots import ALLOW_ALL, RobotsPolicy, parse_robots, robots_url
from ingest.fetcher import Fetched, Fetcher

# robots.txt failures: "unavailable" (the site has none to give: crawl freely) ...
_ROBOTS_UNAVAILABLE = frozenset({Reason.HTTP_403, Reason.HTTP_404, Reason.HTTP_410, Reason.HTTP_OTHER,
                                 Reason.TOO_MANY_REDIRECTS})
# ... or a host we may not or cannot reach at all: its pages get the same reason.
_HOST_UNUSABLE = frozenset({Reason.SSRF_BLOCKED, Reason.DNS_ERROR, Reason.INVALID_URL, Reason.UNSUPPORTED_SCHEME})


class PageClient:
    """Use as ``async with PageClient(cfg) as client``: ``await client.page(url)``, ``await client.robots(url)``."""

    def __init__(self, cfg: CrawlConfig):
        policy = cfg.network_policy()
        self._pages = Fetcher(cfg.page_fetch_config(), policy)
        self._robots = Fetcher(cfg.robots_fetch_config(), policy)

    async def __aenter__(self) -> "PageClient":
        await self._pages.__aenter__()
        await self._robots.__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._pages.__aexit__(*exc_info)
        await self._robots.__aexit__(*exc_info)

    async def page(self, url: str) -> Fetched:
        """The page's bytes, or a redirect (``location`` set); ``SampleError`` otherwise."""
        try:
            return await self._pages.fetch(url)
        except SampleError as error:
            if error.reason is Reason.TOO_LARGE:  # the page-level name for the same cap
                raise SampleError(Reason.PAGE_TOO_LARGE, error.detail) from None
            raise

    async def robots(self, url: str) -> RobotsPolicy:
        """The robots.txt policy of ``url``'s origin; failures mapped as RFC 9309 says."""
        try:
            fetched = await self._robots.fetch(robots_url(url))
        except SampleError as error:
            if error.reason in _ROBOTS_UNAVAILABLE:
                return ALLOW_ALL
            blocked = error.reason if error.reason in _HOST_UNUSABLE else Reason.ROBOTS_UNREACHABLE
            return RobotsPolicy(blocked=blocked, blocked_detail=f"robots.txt: {error}")
        return parse_robots(fetched.data.decode("utf-8", "replace"))
