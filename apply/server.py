"""The HTTP side of ``python -m apply.search --serve``: a JSON API and a page to search and browse.

Routes (GET; anything else is 404)::

    /                       the page (apply/search_page.html: inline CSS and JS, nothing external)
    /api/info               the index: rows, kind, recall, model; whether browsing has decisions
    /api/search?q=TEXT&k=K  text -> images          {"query", "results": [{rank, score, key, caption,
    /api/similar?key=KEY&k=K  images like a sample      url, shard, image_width, image_height}], "took_ms"}
    /api/browse?seed=S&n=N  random kept samples and, given --pool and --decisions, up to N examples of
                            each rejection reason (a duplicate with the copy that was kept)
    /image?key=KEY          a sample's image, read from its tar

What may be read: the server takes keys, never paths. A key is served only when it is a row
of the index (its image is read from the tar named in the index) or a pool sample that
``/api/browse`` showed (read from the pool shard its decisions file belongs to); anything
else is 404, so no request can reach another file. Images go out with their image type and
``nosniff``; the page with a Content-Security-Policy that allows only its own inline script
and style (by hash) and requests to this server. Captions and URLs are web data: the page
puts them in the DOM as text, never as HTML. On a loopback address, requests naming
another Host are refused (403), so a web page elsewhere cannot reach the data through DNS
rebinding.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.resources
import json
import logging
import re
import tarfile
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apply.search import MAX_TOP_K, SearchConfig, Searcher
from core import storage
from core.config import ConfigError, DataError
from core.layout import IMAGE_EXTENSIONS, shard_id_of
from core.tarreader import split_member_name

log = logging.getLogger(__name__)

CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
MAX_IMAGE_BYTES = 32 << 20
TAR_MAPS_CACHED = 64  # tars whose member offsets are kept
BROWSE_MAX = 48
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


# -- images, by key --------------------------------------------------------------------------------


class SampleImages:
    """Key -> image bytes, for the keys of the index and the pool samples registered by browsing."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self._pool_tars: dict[str, str] = {}  # pool key -> its pool tar (registered by browse)
        self._maps: OrderedDict[str, dict[str, tuple[int, int, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, keys_to_tars: dict[str, str]) -> None:
        with self._lock:
            self._pool_tars.update(keys_to_tars)

    def tar_of(self, key: str) -> str | None:
        row = self.searcher.index.row_of_key(key)
        if row is not None:
            return self.searcher.index.rows["shard"][row].as_py()
        with self._lock:
            return self._pool_tars.get(key)

    def _members(self, tar: str) -> dict[str, tuple[int, int, str]]:
        """key -> (data offset, size, extension) of each image member of ``tar``; read once, then cached."""
        with self._lock:
            if tar in self._maps:
                self._maps.move_to_end(tar)
                return self._maps[tar]
        members: dict[str, tuple[int, int, str]] = {}
        with storage.open_file(tar, "rb") as handle, tarfile.open(fileobj=handle, mode="r:*") as archive:
            for info in archive:  # headers only: the data is skipped by seeking
                key, ext = split_member_name(info.name)
                if info.isfile() and ext in IMAGE_EXTENSIONS and key not in members:
                    members[key] = (info.offset_data, info.size, ext)
        with self._lock:
            self._maps[tar] = members
            while len(self._maps) > TAR_MAPS_CACHED:
                self._maps.popitem(last=False)
        return members

    def get(self, key: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of ``key``'s image, or None when the key is not one that may be served."""
        tar = self.tar_of(key)
        if tar is None or not storage.exists(tar):
            return None
        entry = self._members(tar).get(key)
        if entry is None or entry[1] > MAX_IMAGE_BYTES:
            return None
        offset, size, ext = entry
        with storage.open_file(tar, "rb") as handle:
            if tar.endswith(".tar"):
                handle.seek(offset)
                data = handle.read(size)
            else:  # compressed: through tarfile
                with tarfile.open(fileobj=handle, mode="r:*") as archive:
                    data = next(archive.extractfile(m).read() for m in archive
                                if m.offset_data == offset)  # fmt: skip
        return CONTENT_TYPES[ext], data


# -- browsing ---------------------------------------------------------------------------------------


class Browse:
    """Random samples to look at: kept ones and examples of each rejection reason (with --decisions)."""

    def __init__(self, searcher: Searcher, images: SampleImages, pool: str = "", decisions: str = ""):
        self.searcher, self.images, self.pool, self.decisions = searcher, images, pool, decisions
        self.files = storage.list_files(decisions, ".parquet") if decisions else []
        self.files = [f for f in self.files if shard_id_of(f) is not None]
        if decisions and not self.files:
            raise DataError(f"--decisions {decisions}: no decision files ({{shard}}.parquet) there")
        if pool and not storage.exists(pool):
            raise DataError(f"--pool {pool}: no such folder")

    def sample(self, seed: int, n: int) -> dict[str, Any]:
        if not self.files:
            return self._from_index(seed, n)
        return self._from_decisions(seed, n)

    def _from_index(self, seed: int, n: int) -> dict[str, Any]:
        index = self.searcher.index
        rows = np.random.default_rng(seed).choice(index.index.ntotal, min(n, index.index.ntotal), replace=False)
        kept = [_sample(index.row(int(r))) for r in rows]
        return {"source": "index", "kept": kept, "reasons": [],
                "note": "samples of the index; start the server with --pool and --decisions to see rejections"}

    def _from_decisions(self, seed: int, n: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        best: dict[str | None, list[tuple[float, str, str | None, int]]] = {}  # group -> (priority, key, dup_of, shard)
        counts: dict[str, int] = {}
        for path in self.files:
            shard = shard_id_of(path)
            with storage.open_file(path, "rb") as handle:
                table = pq.read_table(handle, columns=["key", "keep", "reason", "dup_of"])
            priority = rng.random(table.num_rows)
            keep = table["keep"].to_numpy(zero_copy_only=False)
            reasons = table["reason"].to_pylist()
            keys, dups = table["key"].to_pylist(), table["dup_of"].to_pylist()
            groups = [None if k else r for k, r in zip(keep, reasons)]
            for i, group in enumerate(groups):
                if group is not None:
                    counts[group] = counts.get(group, 0) + 1
                best.setdefault(group, []).append((priority[i], keys[i], dups[i], shard))
            for group, items in best.items():  # keep the n smallest priorities: a uniform sample
                if len(items) > n:
                    best[group] = sorted(items)[:n]
        wanted = {key: shard for items in best.values() for _, key, _, shard in items}
        dup_keys = {dup for items in best.values() for _, _, dup, _ in items if dup}
        wanted.update(self._shards_of(dup_keys - set(wanted)))
        described = self._describe(wanted)
        self.images.register({k: self._tar(s) for k, s in wanted.items()})

        def entry(key: str, dup: str | None) -> dict[str, Any]:
            item = described.get(key, {"key": key, "caption": None, "url": None})
            return {**item, "dup_of": described.get(dup, {"key": dup}) if dup else None}

        kept = [entry(key, None) for _, key, _, _ in sorted(best.get(None, []))]
        reasons = [{"reason": group, "count": counts[group],
                    "examples": [entry(key, dup) for _, key, dup, _ in sorted(items)]}
                   for group, items in sorted(best.items(), key=lambda kv: -counts.get(kv[0] or "", 0))
                   if group is not None]  # fmt: skip
        return {"source": "decisions", "kept": kept, "reasons": reasons, "kept_count": len(kept)}

    def _tar(self, shard: int) -> str:
        return storage.join(self.pool, f"{shard:05d}.tar")

    def _shards_of(self, keys: set[str]) -> dict[str, int]:
        """The pool shard of each of ``keys`` (duplicates' kept copies), from the decision files."""
        found: dict[str, int] = {}
        for path in self.files:
            if len(found) == len(keys):
                break
            with storage.open_file(path, "rb") as handle:
                column = pq.read_table(handle, columns=["key"])["key"]
            for key in column.filter(pc.is_in(column, value_set=_string_array(keys))).to_pylist():
                found[key] = shard_id_of(path)
        return found

    def _describe(self, wanted: dict[str, int]) -> dict[str, dict[str, Any]]:
        """key -> {key, caption, url} from the pool parquet of each key's shard."""
        out: dict[str, dict[str, Any]] = {}
        by_shard: dict[int, set[str]] = {}
        for key, shard in wanted.items():
            by_shard.setdefault(shard, set()).add(key)
        for shard, keys in by_shard.items():
            path = storage.join(self.pool, f"{shard:05d}.parquet")
            if not storage.exists(path):
                continue
            with storage.open_file(path, "rb") as handle:
                table = pq.read_table(handle, columns=["key", "url", "caption", "status"])
            table = table.filter(pc.is_in(table["key"], value_set=_string_array(keys)))
            for row in table.to_pylist():
                out[row["key"]] = {"key": row["key"], "caption": row["caption"], "url": row["url"],
                                   "has_image": row["status"] == "success"}  # fmt: skip
        return out


def _string_array(values: set[str]) -> pa.Array:
    return pa.array(sorted(values), pa.string())


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in ("key", "caption", "url", "shard", "image_width", "image_height")}


# -- the page -------------------------------------------------------------------------------------


def _page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy (its inline script and style allowed by hash)."""
    html = importlib.resources.files("apply").joinpath("search_page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    policy = (f"default-src 'none'; img-src 'self'; connect-src 'self'; script-src {hashes('script')}; "
              f"style-src {hashes('style')}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), policy


# -- the server -----------------------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "webclip-search"
    app: App  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        app = self.app
        host = _hostname(self.headers.get("Host", ""))
        if app.loopback and host not in LOOPBACK_HOSTS:
            return self._json(403, {"error": f"Host {host!r} refused: this server answers 127.0.0.1 / localhost"})
        url = urllib.parse.urlsplit(self.path)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if url.path in ("/", "/index.html"):
                return self._send(200, app.page, "text/html; charset=utf-8",
                                  {"Content-Security-Policy": app.policy, "Cache-Control": "no-store"})
            if url.path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")  # no icon; and no 404 in the browser's console
            if url.path == "/image":
                found = app.images.get(params.get("key", ""))
                if found is None:
                    return self._json(404, {"error": "no such image"})
                return self._send(200, found[1], found[0], {"Cache-Control": "max-age=3600"})
            if url.path == "/api/info":
                return self._json(200, app.info())
            if url.path == "/api/search":
                text = params.get("q", "").strip()
                if not text:
                    return self._json(400, {"error": "q: the text to search for is required"})
                return self._json(200, app.searcher.text(text, _count(params, "k", 12, MAX_TOP_K)))
            if url.path == "/api/similar":
                try:
                    return self._json(200, app.searcher.similar(params.get("key", ""), _count(params, "k", 12,
                                                                                               MAX_TOP_K)))
                except KeyError:
                    return self._json(404, {"error": "no such key in the index"})
            if url.path == "/api/browse":
                seed = _count(params, "seed", 0, 2**31 - 1, minimum=0)
                return self._json(200, app.browse.sample(seed, _count(params, "n", 12, BROWSE_MAX)))
            return self._json(404, {"error": "not found"})
        except BadRequest as exc:
            return self._json(400, {"error": str(exc)})
        except (ConfigError, DataError) as exc:
            return self._json(503, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("%s", self.path)
            return self._json(500, {"error": f"{type(exc).__name__}"})


def _hostname(header: str) -> str:
    try:
        return urllib.parse.urlsplit("//" + header).hostname or ""
    except ValueError:
        return ""


class BadRequest(ValueError):
    pass


def _count(params: dict[str, str], name: str, default: int, maximum: int, minimum: int = 1) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    if not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise BadRequest(f"{name}={raw[:20]!r}: an integer from {minimum} to {maximum}")
    return int(raw)


class App:
    """What the handler answers with: the searcher, the images it may serve, browsing, the page."""

    def __init__(self, searcher: Searcher, host: str, pool: str = "", decisions: str = ""):
        self.searcher = searcher
        self.images = SampleImages(searcher)
        self.browse = Browse(searcher, self.images, pool, decisions)
        self.page, self.policy = _page()
        self.loopback = host in LOOPBACK_HOSTS or host.startswith("127.")

    def info(self) -> dict[str, Any]:
        info = self.searcher.index.info
        return {"rows": info["rows"], "type": info["type"], "recall_at_10": info["recall_at_10"]["value"],
                "model": info.get("model"), "checkpoint": info.get("checkpoint"), "step": info.get("step"),
                "browse": "decisions" if self.browse.files else "index"}  # fmt: skip


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 0, pool: str = "",
                decisions: str = "") -> http.server.ThreadingHTTPServer:
    """A server bound to (host, port), not yet serving: call ``serve_forever``."""
    handler = type("BoundHandler", (Handler,), {"app": App(searcher, host, pool, decisions)})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(searcher: Searcher, cfg: SearchConfig) -> int:
    """Load the model, then serve until Ctrl-C; exit code 0."""
    searcher.model  # noqa: B018 - fail now, not on the first query, when it cannot load
    try:
        server = make_server(searcher, cfg.host, cfg.port, cfg.pool, cfg.decisions)
    except OSError as exc:
        raise ConfigError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {searcher.index.info['rows']:,} images of {searcher.index.folder} on http://{shown}:{port}/ "
          "(Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
