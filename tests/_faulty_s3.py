"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3-compatible test server (issue 21).

A seeded fraction of requests (default 5%) gets one of four faults, chosen in turn by
the same seeded generator:

* ``slowdown``: 503 with S3's ``SlowDown`` error body (throttling);
* ``error500``: 500 ``InternalError``;
* ``reset``: the real answer's status and headers and half its body, then a TCP reset;
* ``stall``: nothing at all for ``stall_s`` (set it past the client's read timeout), then a close.

Every other request is forwarded unchanged. ``counts`` says how many of each were injected,
``injected`` which (fault, method, path); ``only`` limits faults to paths holding a string.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "error500", "reset", "stall")
_ERROR = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'


class FaultyProxy:
    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 0, stall_s: float = 2.0,
                 faults: tuple[str, ...] = FAULTS, only: str = ""):  # fmt: skip
        self.upstream = urlsplit(upstream)
        self.rate, self.stall_s, self.faults = rate, stall_s, faults
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.requests = 0
        self.injected: list[tuple[str, str, str]] = []  # (fault, method, path)
        self.armed = True
        self.only = only  # faults only for paths holding this (e.g. one object's name)

    def draw(self, method: str = "", path: str = "") -> str | None:
        with self.lock:
            self.requests += 1
            if not self.armed or self.only not in path or self.rng.random() >= self.rate:
                return None
            fault = self.faults[self.rng.randrange(len(self.faults))]
            self.counts[fault] += 1
            self.injected.append((fault, method, path))
            return fault

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the empty line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                body = _ERROR.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw(self.command, self.path)
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    self._reset()
                    return
                if fault == "slowdown":
                    self._error(503, "SlowDown", "Please reduce your request rate.")
                    return
                if fault == "error500":
                    self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                    return
                status, headers, data = self._forward(body)
                self.send_response_only(status)
                head = self.command == "HEAD"  # its Content-Length is the object's: kept
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection") and (
                            head or name.lower() != "content-length"):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "reset":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
