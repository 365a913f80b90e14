"""A real HTTP server for the demo corpus: the messy web, on loopback.

The downloader is tested against real sockets, not mocks, so that timeouts,
truncated bodies, redirect handling and header checks exercise the same code paths
they meet on the web. This server plays back the behaviours the corpus generator
planted, exactly as ``site/routes.json`` describes them (see ``infra.local.corpus``
for the route spec): status, headers, content type, a delay before the headers, a
body trickled slowly, a body cut short with a real early close, and redirects.

It is asynchronous (aiohttp) so that one trickling response never holds up the
others, and it binds 127.0.0.1 by default; nothing here is meant to face a network.

Run it as ``python -m infra.local.webserver --root DIR/site [--port 0]``, or, from
tests and scripts, with the ``serve(root)`` context manager, which starts it as a
subprocess and hands back its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Iterator

from aiohttp import web

DEFAULT_HOST = "127.0.0.1"
TRICKLE_CHUNK_BYTES = 100
TRICKLE_INTERVAL_S = 0.5
ROUTE_KEYS = ("file", "status", "content_type", "headers", "delay_s", "trickle", "truncate_to", "location")


@dataclass(frozen=True)
class Route:
    """How the server answers one URL path (one entry of routes.json)."""

    file: str | None = None  # relative to the site root; None: a short status page
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the headers; with trickle: how long the body takes
    trickle: bool = False
    truncate_to: int | None = None  # send this many body bytes, then close
    location: str | None = None  # "{port}" is replaced by the port the request came in on

    @classmethod
    def from_json(cls, path: str, spec: dict) -> "Route":
        if not isinstance(spec, dict):
            raise ValueError(f"route {path!r}: expected an object, got {type(spec).__name__}")
        unknown = set(spec) - set(ROUTE_KEYS)
        if unknown:
            raise ValueError(f"route {path!r}: unknown keys {sorted(unknown)}; known: {', '.join(ROUTE_KEYS)}")
        route = cls(**spec)
        if route.trickle and route.truncate_to is not None:
            raise ValueError(f"route {path!r}: trickle and truncate_to cannot be combined")
        return route


def load_routes(site_root: str | os.PathLike) -> dict[str, Route]:
    """Read and check ``routes.json``; every file it names must exist under the root."""
    root = Path(site_root)
    routes_path = root / "routes.json"
    if not routes_path.is_file():
        raise FileNotFoundError(
            f"{routes_path} not found: --root must be the site/ folder of a corpus made by "
            "`python -m infra.local.corpus`"
        )
    with open(routes_path, encoding="utf-8") as f:
        raw = json.load(f)
    routes = {path: Route.from_json(path, spec) for path, spec in raw.items()}
    missing = [r.file for r in routes.values() if r.file is not None and not (root / r.file).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files named in {routes_path} are missing, e.g. {missing[:3]}")
    return routes


class AccessLog:
    """JSON lines, one per request, flushed as written (tests read it while serving)."""

    def __init__(self, stream: IO[str] | None):
        self._stream = stream

    def write(self, request: web.BaseRequest, status: int) -> None:
        if self._stream is None:
            return
        record = {
            "time": round(time.time(), 6),
            "method": request.method,
            "path": request.path_qs,
            "status": status,
            "remote": request.remote,
            "user_agent": request.headers.get("User-Agent"),
        }
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()


def _status_page(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"<html><body><h1>{status} {phrase}</h1></body></html>\n".encode()


def _request_port(request: web.BaseRequest) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else 0


def make_app(site_root: str | os.PathLike, access_log: AccessLog | None = None) -> web.Application:
    """The aiohttp application that plays back ``routes.json`` from ``site_root``."""
    root = Path(site_root)
    routes = load_routes(root)
    log = access_log or AccessLog(None)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        route = routes.get(request.path)
        if route is None:
            return web.Response(status=404, body=_status_page(404), content_type="text/html")
        return await _answer(request, route, root)

    @web.middleware
    async def log_request(request: web.Request, handler) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # 405 and friends, raised by the router
            status = exc.status
            raise
        finally:
            log.write(request, status)

    app = web.Application(middlewares=[log_request])
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


async def _answer(request: web.Request, route: Route, root: Path) -> web.StreamResponse:
    if route.delay_s and not route.trickle:
        await asyncio.sleep(route.delay_s)
    body = (root / route.file).read_bytes() if route.file else _status_page(route.status)
    headers = dict(route.headers)
    headers["Content-Type"] = route.content_type if route.file else "text/html"
    if route.location is not None:
        headers["Location"] = route.location.replace("{port}", str(_request_port(request)))
    if route.truncate_to is not None:
        return await _send_truncated(request, route, headers, body)
    if route.trickle:
        return await _send_trickled(request, route, headers, body)
    return web.Response(status=route.status, headers=headers, body=body)


async def _send_truncated(request: web.Request, route: Route, headers: dict, body: bytes) -> web.StreamResponse:
    """Announce the full length, send a part, then close the connection for real."""
    response = web.StreamResponse(status=route.status, headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: route.truncate_to])
    request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then FIN: a short body
    return response


async def _send_trickled(request: web.Request, route: Route, headers: dict, body: bytes) -> web.StreamResponse:
    """Headers at once, then a trickle of the body for ``delay_s`` seconds, then the rest.

    The last byte is held back until the time is up, so even a small body takes the
    full ``delay_s``. The response does finish (a slow server, not a dead one): a
    patient client gets the image, an impatient one times out.
    """
    response = web.StreamResponse(status=route.status, headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    deadline = time.monotonic() + route.delay_s
    sent = 0
    try:
        while time.monotonic() < deadline:
            chunk = body[sent : min(sent + TRICKLE_CHUNK_BYTES, len(body) - 1)]
            if chunk:
                await response.write(chunk)
                sent += len(chunk)
            await asyncio.sleep(TRICKLE_INTERVAL_S)
        await response.write(body[sent:])
        await response.write_eof()
    except ConnectionError:
        pass  # the client gave up waiting: exactly what a slow route is for
    return response


async def run_server(
    site_root: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = 0,
    port_file: str | os.PathLike | None = None,
    access_log_path: str | os.PathLike | None = None,
    parent_pid: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or ``parent_pid`` dies); announce the address once listening."""
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open(access_log_path, "a", encoding="utf-8")) if access_log_path else None
        app = make_app(site_root, AccessLog(stream))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=1024).start()
            bound_port = runner.addresses[0][1]
            if port_file:
                _write_atomically(Path(port_file), f"{bound_port}\n")
            print(f"serving http://{host}:{bound_port}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            watcher = asyncio.create_task(_stop_when_orphaned(parent_pid, stop)) if parent_pid else None
            await stop.wait()
            if watcher is not None:
                watcher.cancel()
        finally:
            await runner.cleanup()


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """A killed test run must not leave its server behind: stop once the parent is gone."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    stop.set()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- a subprocess for tests and scripts ------------------------------------------------


class ServerStartError(RuntimeError):
    """The corpus server did not come up; the message carries its stderr."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve(
    root: str | os.PathLike,
    port: int = 0,
    *,
    access_log: str | os.PathLike | None = None,
    startup_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Run the server as a subprocess on 127.0.0.1; yield its base URL; stop it on exit.

    A separate process, so the server's event loop is not the test's, and a hung test
    cannot hang the server (or the other way round).
    """
    with tempfile.TemporaryDirectory(prefix="webclip-webserver-") as tmp:
        port_file = Path(tmp) / "port"
        stderr_path = Path(tmp) / "stderr.log"
        command = [sys.executable, "-m", "infra.local.webserver", "--root", str(root), "--host", DEFAULT_HOST,
                   "--port", str(port), "--port-file", str(port_file), "--parent-pid", str(os.getpid())]
        if access_log is not None:
            command += ["--access-log", str(access_log)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_repo_root()), env.get("PYTHONPATH")]))
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            yield _wait_until_healthy(process, port_file, stderr_path, startup_timeout_s)
        finally:
            _stop(process)


def _wait_until_healthy(process: subprocess.Popen, port_file: Path, stderr_path: Path, timeout_s: float) -> str:
    # Loopback only, and never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"corpus server exited with code {process.returncode} before serving:\n{_tail(stderr_path)}"
            )
        if port_file.exists():
            base_url = f"http://{DEFAULT_HOST}:{int(port_file.read_text())}"
            try:
                with opener.open(base_url + "/healthz", timeout=1.0) as reply:
                    if reply.status == 200:
                        return base_url
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)
    raise ServerStartError(
        f"corpus server did not answer /healthz within {timeout_s:.0f} s:\n{_tail(stderr_path)}"
    )


def _tail(path: Path, limit: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:] or "(no output on stderr)"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.webserver",
        description="Serve a demo corpus site (made by `python -m infra.local.corpus`) over HTTP, "
        "playing back the behaviours in its routes.json.",
    )
    parser.add_argument("--root", required=True, help="the corpus's site/ folder (holds routes.json)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--access-log", help="append one JSON line per request to this file")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the caller) is gone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        server = run_server(args.root, args.host, args.port, args.port_file, args.access_log, args.parent_pid)
        asyncio.run(server)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
