"""Fetch one URL's bytes over async HTTP, safely, or raise ``SampleError``.

Why it is built this way:

* one ``aiohttp`` session per shard worker: connection reuse, a per-host
  connection cap, and a DNS cache;
* every address is checked against the ``NetworkPolicy`` *after* resolution (a
  resolver wrapper, so a hostname that resolves to 10.0.0.1 is refused before any
  connection) and IP-literal hosts are checked before the request; redirects are
  followed by hand so each hop's URL and address get the same checks;
* one overall deadline per request (redirects and body included), so a server
  that trickles bytes cannot hold a worker longer than ``timeout``;
* opt-out headers and the announced length are checked before the body is read;
  a body of announced length (and no content coding) is read at once, any other in
  chunks, counted against the byte cap as it decodes (a gzip bomb stops at the cap);
* retries with exponential backoff only for failures a retry can fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from core.reasons import Reason, SampleError, http_reason
from core import __version__
from ingest.safety import NetworkPolicy, check_url

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRYABLE = frozenset(
    {Reason.TIMEOUT, Reason.CONNECTION_ERROR, Reason.TRUNCATED, Reason.HTTP_429, Reason.HTTP_5XX}
)
NON_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript")


@dataclass(frozen=True)
class FetchConfig:
    timeout: float = 10.0
    retries: int = 0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    concurrency: int = 64
    per_host_limit: int = 16
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # The crawler fetches pages and robots.txt through this same safety layer: it accepts
    # every type (refused_types=()) and schedules each redirect itself (follow_redirects=False),
    # so that a redirect target gets its own robots.txt check and per-host delay.
    refused_types: tuple[str, ...] = NON_IMAGE_TYPES  # answered as not_image, before the body
    follow_redirects: bool = True  # False: a 3xx comes back as Fetched(location=...), unfollowed

    @property
    def user_agent(self) -> str:
        agent = f"webclip/{__version__} (image-text dataset downloader; opt out with X-Robots-Tag: noai)"
        return f"{agent} {self.user_agent_token}" if self.user_agent_token else agent


@dataclass(frozen=True)
class Fetched:
    data: bytes
    http_status: int
    sha256: str
    content_type: str | None = None  # media type as announced, parameters dropped
    final_url: str = ""  # the URL the body came from, after redirects
    charset: str | None = None  # the Content-Type's charset parameter, if any
    location: str | None = None  # with follow_redirects=False: the absolute redirect target


class _GuardedResolver(AbstractResolver):
    """Resolves as usual, then refuses the host if any address is not allowed."""

    def __init__(self, policy: NetworkPolicy):
        self._policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check_address(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def opt_out_directive(header_values: list[str], disallowed: tuple[str, ...], agent_token: str | None) -> str | None:
    """The first disallowed X-Robots-Tag directive that applies to us, if any.

    A directive may be scoped to a user agent (``otherbot: noai``); it applies to us
    when unscoped, scoped to ``*``, or scoped to our token.
    """
    ours = {"*", "webclip"} | ({agent_token.lower()} if agent_token else set())
    for value in header_values:
        scope = None
        for part in value.split(","):
            part = part.strip().lower()
            if ":" in part:
                scope, part = (s.strip() for s in part.split(":", 1))
            if part in disallowed and (scope is None or scope in ours):
                return part
    return None


class Fetcher:
    """Use as ``async with Fetcher(cfg, policy) as f: await f.fetch(url)``."""

    def __init__(self, cfg: FetchConfig, policy: NetworkPolicy):
        self.cfg = cfg
        self.policy = policy
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Fetcher":
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host_limit,
            ttl_dns_cache=300,
            resolver=_GuardedResolver(self.policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.cfg.user_agent},
            auto_decompress=True,
            trust_env=False,  # never route through a proxy the environment names
            cookie_jar=aiohttp.DummyCookieJar(),  # image URLs need no cookies; parsing them costs CPU
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> Fetched:
        """The body of ``url`` (following redirects), retrying retryable failures."""
        attempt = 0
        while True:
            try:
                return await self._fetch_once(url)
            except SampleError as error:
                if error.reason not in RETRYABLE or attempt >= self.cfg.retries:
                    raise
            attempt += 1
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))

    async def _fetch_once(self, url: str) -> Fetched:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                return await self._follow(url)
        except TimeoutError:
            raise SampleError(Reason.TIMEOUT, f"no complete response within {self.cfg.timeout:g}s") from None
        except aiohttp.ClientPayloadError as exc:
            raise SampleError(Reason.TRUNCATED, str(exc)[:200]) from None
        except aiohttp.ClientConnectorDNSError as exc:
            raise SampleError(Reason.DNS_ERROR, str(exc)[:200]) from None
        except aiohttp.InvalidURL as exc:
            raise SampleError(Reason.INVALID_URL, str(exc)[:200]) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SampleError(Reason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None

    async def _follow(self, url: str) -> Fetched:
        assert self._session is not None, "use Fetcher as an async context manager"
        for _hop in range(self.cfg.max_redirects + 1):
            check_url(url, self.policy)
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise SampleError(Reason.HTTP_OTHER, f"{response.status} without Location")
                    target = urljoin(url, location)
                    if not self.cfg.follow_redirects:
                        return Fetched(b"", response.status, hashlib.sha256(b"").hexdigest(), final_url=url,
                                       location=target)
                    url = target
                    continue
                return await self._read(response, url)
        raise SampleError(Reason.TOO_MANY_REDIRECTS, f"more than {self.cfg.max_redirects}")

    async def _read(self, response: aiohttp.ClientResponse, url: str) -> Fetched:
        if not 200 <= response.status < 300:
            raise SampleError(http_reason(response.status), f"HTTP {response.status}")
        directive = opt_out_directive(
            response.headers.getall("X-Robots-Tag", []),
            self.cfg.disallowed_header_directives,
            self.cfg.user_agent_token,
        )
        if directive:
            raise SampleError(Reason.OPT_OUT, f"X-Robots-Tag: {directive}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type.startswith(self.cfg.refused_types):
            raise SampleError(Reason.NOT_IMAGE, content_type)
        if response.content_length is not None and response.content_length > self.cfg.max_bytes:
            raise SampleError(Reason.TOO_LARGE, f"Content-Length {response.content_length}")
        framing = ("Content-Encoding", "Transfer-Encoding")
        if response.content_length is not None and not any(h in response.headers for h in framing):
            # the announced length bounds what aiohttp reads (and it is within the cap, above): one read
            data = await response.read()
        else:  # unannounced, chunked or compressed: the size is unknown, so count while reading
            data = await self._read_capped(response)
        return Fetched(
            data=data,
            http_status=response.status,
            sha256=hashlib.sha256(data).hexdigest(),
            content_type=content_type or None,
            final_url=url,
            charset=response.charset,
        )

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in response.content.iter_chunked(65536):
            body += chunk
            if len(body) > self.cfg.max_bytes:
                raise SampleError(Reason.TOO_LARGE, f"more than {self.cfg.max_bytes} bytes")
        return bytes(body)
