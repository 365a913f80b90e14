"""The fetcher against a real HTTP server on 127.0.0.1 (aiohttp, in the test's loop)."""

from __future__ import annotations

import asyncio
import gzip
import time

import pytest
from aiohttp import web

from core.reasons import Reason, SampleError
from ingest.fetcher import FetchConfig, Fetcher
from ingest.safety import NetworkPolicy

LOCAL = NetworkPolicy.from_cidrs(["127.0.0.1/32"])
BODY = b"\xff\xd8" + b"x" * 5000


def make_app(hits: dict[str, int]) -> web.Application:
    async def count(request, handler):
        hits[request.path] = hits.get(request.path, 0) + 1
        return await handler(request)

    async def ok(request):
        return web.Response(body=BODY, content_type="image/jpeg")

    async def error(request):
        return web.Response(status=int(request.match_info["code"]))

    async def optout_then_hang(request):
        response = web.StreamResponse(headers={"X-Robots-Tag": "noai", "Content-Type": "image/jpeg"})
        await response.prepare(request)
        await asyncio.sleep(4)  # the body does not come in time: the check must not wait for it
        return response

    async def chunked_big(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x" * 10_000)
        return response

    async def trickle(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "100000"})
        await response.prepare(request)
        for _ in range(30):
            await response.write(b"x" * 100)
            await asyncio.sleep(0.1)
        return response

    async def gzip_bomb(request):  # a small announced length, a large body once decoded
        body = gzip.compress(b"\0" * 1_000_000)
        return web.Response(body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})

    async def page(request):
        return web.Response(text="<html></html>", content_type="text/html")

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    app = web.Application(middlewares=[web.middleware(count)])
    app.add_routes([
        web.get("/ok.jpg", ok), web.get("/status/{code}", error), web.get("/optout", optout_then_hang),
        web.get("/big", chunked_big), web.get("/trickle", trickle), web.get("/redirect", redirect),
        web.get("/page", page), web.get("/bomb", gzip_bomb),
    ])
    return app


async def with_server(check, **fetch_overrides):
    hits: dict[str, int] = {}
    runner = web.AppRunner(make_app(hits))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        policy = fetch_overrides.pop("policy", LOCAL)
        cfg = FetchConfig(**{"timeout": 2.0, **fetch_overrides})
        async with Fetcher(cfg, policy) as fetcher:
            return await check(fetcher, f"http://127.0.0.1:{port}", hits)
    finally:
        await runner.cleanup()


def reason_of(path: str, **overrides) -> Reason:
    return timed_reason_of(path, **overrides)[0]


def timed_reason_of(path: str, **overrides) -> tuple[Reason, float]:
    async def check(fetcher, base, hits):
        start = time.monotonic()
        with pytest.raises(SampleError) as error:
            await fetcher.fetch(base + path)
        return error.value.reason, time.monotonic() - start
    return asyncio.run(with_server(check, **overrides))


def test_success_returns_body_and_hash():
    async def check(fetcher, base, hits):
        return await fetcher.fetch(base + "/ok.jpg")
    fetched = asyncio.run(with_server(check))
    assert fetched.data == BODY and fetched.http_status == 200 and len(fetched.sha256) == 64


@pytest.mark.parametrize("code, reason", [(404, Reason.HTTP_404), (403, Reason.HTTP_403), (500, Reason.HTTP_5XX),
                                          (503, Reason.HTTP_5XX), (429, Reason.HTTP_429), (418, Reason.HTTP_OTHER)])
def test_http_errors(code, reason):
    assert reason_of(f"/status/{code}") is reason


def test_opt_out_is_decided_before_the_body_is_read():
    reason, seconds = timed_reason_of("/optout", timeout=10.0)
    assert reason is Reason.OPT_OUT and seconds < 2


def test_byte_cap_applies_to_streamed_bodies():
    assert reason_of("/big", max_bytes=50_000) is Reason.TOO_LARGE


def test_byte_cap_applies_to_the_decoded_body_of_a_compressed_response():
    assert reason_of("/bomb", max_bytes=50_000) is Reason.TOO_LARGE


def test_overall_deadline_stops_a_trickling_server():
    reason, seconds = timed_reason_of("/trickle", timeout=1.0)
    assert reason is Reason.TIMEOUT and seconds < 2


def test_non_image_content_type():
    assert reason_of("/page") is Reason.NOT_IMAGE


def test_redirect_to_a_refused_address_is_never_followed():
    assert reason_of("/redirect?to=http://127.0.0.2:9/x.jpg") is Reason.SSRF_BLOCKED
    assert reason_of("/redirect?to=http://169.254.169.254/latest/meta-data/") is Reason.SSRF_BLOCKED
    assert reason_of("/redirect?to=file:///etc/passwd") is Reason.UNSUPPORTED_SCHEME


def test_redirect_limit():
    assert reason_of("/redirect?to=/redirect?to=/redirect?to=/ok.jpg", max_redirects=1) is Reason.TOO_MANY_REDIRECTS


def test_hostnames_are_checked_after_resolution():
    """'localhost' resolves to loopback: refused under the default policy, before connecting."""
    async def check(fetcher, base, hits):
        with pytest.raises(SampleError) as error:
            await fetcher.fetch(base.replace("127.0.0.1", "localhost") + "/ok.jpg")
        return error.value.reason, hits
    reason, hits = asyncio.run(with_server(check, policy=NetworkPolicy()))
    assert reason is Reason.SSRF_BLOCKED and hits == {}


def test_retries_only_retryable_failures():
    async def check(fetcher, base, hits):
        for path in ("/status/503", "/status/404"):
            with pytest.raises(SampleError):
                await fetcher.fetch(base + path)
        return hits
    hits = asyncio.run(with_server(check, retries=2))
    assert hits == {"/status/503": 3, "/status/404": 1}


def test_user_agent_is_honest():
    cfg = FetchConfig(user_agent_token="alice@example.org")
    assert cfg.user_agent.startswith("webclip/") and cfg.user_agent.endswith("alice@example.org")
