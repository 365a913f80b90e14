"""A hostile little web on loopback, for ingest tests: real sockets, every bad behaviour.

``HostileWeb(host)`` runs an aiohttp server in a background thread (so ingest can
run in the test's own thread, inline or as a subprocess) and keeps an access log of
every request it received — tests use the log to prove what was, and was not,
contacted. Routes:

  /img/{name}.jpg          a small JPEG, the same bytes for the same name; ?delay=S waits first
  /png/{name}              a PNG served as application/octet-stream (a generic type: still an image)
  /bomb.png, /bomb.jpg     tiny files whose headers announce ~10^10 pixels
  /endless                 a chunked body that never ends, as fast as it can
  /endless_slow            a chunked body that never ends, a few bytes at a time
  /drip                    Content-Length 100 kB, 10 bytes every 0.2 s (slow drip)
  /html                    text/html
  /mislabelled.jpg         image/jpeg header, HTML body
  /cut_body.jpg            announces 4000 bytes, sends 1000, closes (truncated)
  /half_image.jpg          the first half of a real JPEG, served complete
  /corrupt.jpg             random bytes as image/jpeg
  /redirect?to=URL         302 to URL
  /loop                    302 to itself, forever
  /status/{code}           that status
  /hang_once/{name}.jpg    the first request hangs (until stop); later ones get the image
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time
import zlib
from collections import defaultdict

from aiohttp import web
from PIL import Image


def jpeg_bytes(name: str, size: tuple[int, int] = (96, 64)) -> bytes:
    rng = random.Random(name)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (8, 8, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR announcing width x height; almost no data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    body = len(ihdr).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    body += (len(idat) - 4).to_bytes(4, "big") + idat + zlib.crc32(idat).to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A real small JPEG whose SOF header is patched to announce width x height."""
    data = bytearray(jpeg_bytes("bomb", (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


class HostileWeb:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.log: list[dict] = []
        self.hanging = threading.Event()  # set when a /hang_once request is being held
        self._seen: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def arm_hang(self) -> None:
        """Make the next /hang_once request of each name hang again."""
        with self._lock:
            self._seen.clear()
        self.hanging.clear()

    def disarm_hang(self, name: str) -> None:
        with self._lock:
            self._seen[name] = max(self._seen[name], 1)

    def paths(self) -> list[str]:
        with self._lock:
            return [entry["path"] for entry in self.log]

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> "HostileWeb":
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"test web server on {self.host} did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
            self.port = runner.addresses[0][1]
            started.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    # -- routes -----------------------------------------------------------------------

    def _app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler):
            with self._lock:
                self.log.append({"time": time.time(), "path": request.path_qs,
                                 "user_agent": request.headers.get("User-Agent", "")})
            return await handler(request)

        async def img(request):
            delay = float(request.query.get("delay", 0))
            if delay:
                await asyncio.sleep(delay)
            return web.Response(body=jpeg_bytes(request.match_info["name"]), content_type="image/jpeg")

        async def png(request):
            return web.Response(body=png_bytes(request.match_info["name"]), content_type="application/octet-stream")

        async def bomb_png(request):
            return web.Response(body=png_bomb(), content_type="image/png")

        async def bomb_jpg(request):
            return web.Response(body=jpeg_bomb(), content_type="image/jpeg")

        async def endless(request, pause: float = 0.0, chunk: bytes = b"\xff" * 65536):
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                while True:
                    await response.write(chunk)
                    await asyncio.sleep(pause)
            except (ConnectionError, asyncio.CancelledError):
                return response

        async def endless_slow(request):
            return await endless(request, pause=0.1, chunk=b"\xff" * 16)

        async def drip(request):
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "100000"})
            await response.prepare(request)
            try:
                for _ in range(10_000):
                    await response.write(b"\xff" * 10)
                    await asyncio.sleep(0.2)
            except (ConnectionError, asyncio.CancelledError):
                pass
            return response

        async def html(request):
            return web.Response(text="<html><body>not an image</body></html>", content_type="text/html")

        async def mislabelled(request):
            return web.Response(body=b"<html><body>oops</body></html>", content_type="image/jpeg")

        async def cut_body(request):
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            response.content_length = 4000
            await response.prepare(request)
            await response.write(jpeg_bytes("cut")[:1000])
            request.protocol.force_close()
            if request.transport is not None:
                request.transport.close()
            return response

        async def half_image(request):
            data = jpeg_bytes("half", (300, 200))
            return web.Response(body=data[: len(data) // 2], content_type="image/jpeg")

        async def corrupt(request):
            return web.Response(body=random.Random(3).randbytes(3000), content_type="image/jpeg")

        async def redirect(request):
            raise web.HTTPFound(request.query["to"])

        async def loop(request):
            raise web.HTTPFound("/loop")

        async def status(request):
            return web.Response(status=int(request.match_info["code"]), text="status")

        async def hang_once(request):
            name = request.match_info["name"]
            with self._lock:
                self._seen[name] += 1
                first = self._seen[name] == 1
            if first:
                self.hanging.set()
                await self._stop.wait()
            return web.Response(body=jpeg_bytes(name), content_type="image/jpeg")

        async def echo_json(request):
            return web.Response(text=json.dumps(dict(request.headers)), content_type="application/json")

        app = web.Application(middlewares=[record])
        app.add_routes([
            web.get("/img/{name}.jpg", img), web.get("/png/{name}", png), web.get("/bomb.png", bomb_png),
            web.get("/bomb.jpg", bomb_jpg), web.get("/endless", endless), web.get("/endless_slow", endless_slow),
            web.get("/drip", drip), web.get("/html", html), web.get("/mislabelled.jpg", mislabelled),
            web.get("/cut_body.jpg", cut_body), web.get("/half_image.jpg", half_image),
            web.get("/corrupt.jpg", corrupt), web.get("/redirect", redirect), web.get("/loop", loop),
            web.get("/status/{code}", status), web.get("/hang_once/{name}.jpg", hang_once),
            web.get("/headers", echo_json),
        ])
        return app
