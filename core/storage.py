"""Paths that may be local or ``s3://…``, and writes that readers never see half-done.

Every stage reads and writes through these helpers, so each works unchanged on local
disk and on object storage. The commit rule is the same everywhere:

* local: write to a hidden temporary name in the same folder, fsync, rename — a
  rename is atomic, so a reader sees the old file or the whole new one;
* object storage: a PUT is atomic per object (no partial object is ever visible),
  and a unit made of several objects (a shard: tar, parquet, stats) writes its
  marker object (``_stats.json``) last.

S3 settings come from the environment, as for any AWS client (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), plus ``S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL``) for an S3-compatible server other than AWS.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


S3_RETRIES_ENV = "WEBCLIP_S3_RETRIES"  # attempts per request (botocore's, then s3fs's own retry of a call)
S3_TIMEOUT_ENV = "WEBCLIP_S3_TIMEOUT_S"  # connect and read timeout of one request


def _storage_options(path: str) -> dict[str, Any]:
    """Object-storage client settings: the endpoint, and bounded retries with backoff and jitter.

    botocore's "standard" retry mode retries throttling (503 SlowDown), 5xx answers, reset
    connections and read timeouts, with exponential backoff and full jitter, up to
    ``WEBCLIP_S3_RETRIES`` attempts (else ``AWS_MAX_ATTEMPTS``, else 8); a request that stalls is cut off after
    ``WEBCLIP_S3_TIMEOUT_S`` (default 60 s); s3fs adds its own retries of a call that failed
    transiently. Past that budget the error names the object and the stage stops; a rerun
    redoes only what is not committed.
    """
    if not path.startswith("s3://"):
        return {}
    attempts = _attempts()
    timeout = float(os.environ.get(S3_TIMEOUT_ENV, "60"))
    options: dict[str, Any] = {
        "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}, "connect_timeout": timeout,
                          "read_timeout": timeout},
    }
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    options["session"] = _retry_watch.session()
    return options


def _attempts() -> int:
    return int(os.environ.get(S3_RETRIES_ENV) or os.environ.get("AWS_MAX_ATTEMPTS") or 8)


S3_CALL_RETRIES = 2  # s3fs's own repeats of a call whose requests failed every attempt (its default: 5)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``path`` and the path as that filesystem names it."""
    fs, fs_path = url_to_fs(path, **_storage_options(path))
    if not is_local(path):
        fs.retries = S3_CALL_RETRIES
    return fs, fs_path


class _RetryWatch:
    """Counts object-storage requests that failed and were retried, logs the first per object, and
    remembers the objects whose retries ran out (``core.cli`` names the last in the error).

    A driver's counts include its units' that ran in other processes or on Ray (``core.executor``
    hands them over with each unit's result: ``add_elsewhere``), so one stage's count is one figure.
    """

    def __init__(self) -> None:
        self.failed_attempts = 0
        self.objects: set[str] = set()
        self.objects_elsewhere = 0
        self.gave_up, self.last_gave_up = 0, ""
        self._session = None

    def session(self):
        if self._session is None or self._pid != os.getpid():
            import aiobotocore.session

            self._session = aiobotocore.session.AioSession()
            self._session.register("needs-retry.s3", self.observe)
            self._pid = os.getpid()
        return self._session

    def observe(self, response=None, attempts=0, caught_exception=None, request_dict=None, operation=None,
                **kwargs) -> None:  # fmt: skip
        status = response[0].status_code if response else None
        if caught_exception is None and (status is None or (status < 500 and status != 429)):
            return None
        from urllib.parse import unquote, urlsplit

        where = "s3:/" + unquote(urlsplit((request_dict or {}).get("url", "")).path)
        why = f"HTTP {status}" if caught_exception is None else type(caught_exception).__name__
        self.failed_attempts += 1
        if where not in self.objects and why != "EndpointConnectionError":  # no server at all: the error says so
            self.objects.add(where)
            logging.getLogger("webclip.storage").warning(
                "object storage: %s %s failed (%s, attempt %d): retrying with backoff", getattr(operation, "name", ""),
                where, why, attempts)  # fmt: skip
        if attempts >= _attempts():
            self.gave_up += 1
            self.last_gave_up = f"{where} ({getattr(operation, 'name', '')}: {why} on every one of {attempts} attempts)"
        return None

    def counts(self) -> dict[str, int]:
        return {"storage_retries": self.failed_attempts,
                "storage_retried_objects": len(self.objects) + self.objects_elsewhere}

    def add_elsewhere(self, counts: dict[str, int]) -> None:
        self.failed_attempts += counts.get("storage_retries", 0)
        self.objects_elsewhere += counts.get("storage_retried_objects", 0)


_retry_watch = _RetryWatch()
RETRY_KEYS = ("storage_retries", "storage_retried_objects")


def retry_counts() -> dict[str, int]:
    """Object-storage requests that failed and were retried, and the objects they were for: in this
    process so far, units it ran elsewhere (``core.executor``) included."""
    return _retry_watch.counts()


def retries_since(mark: dict[str, int]) -> dict[str, int]:
    """``retry_counts()`` less ``mark`` (an earlier ``retry_counts()``): what one run or unit retried."""
    now = retry_counts()
    return {key: now[key] - mark.get(key, 0) for key in RETRY_KEYS}


def add_retries_elsewhere(counts: dict[str, int]) -> None:
    """Count the retries a unit made in another process (its ``retries_since``) as this process's."""
    _retry_watch.add_elsewhere(counts)


def retries_note(counts: dict[str, int]) -> str:
    """'; N object-storage requests retried (M objects)' for a stage's last line, or '' when none were."""
    n = counts.get("storage_retries", 0)
    if not n:
        return ""
    objects = counts.get("storage_retried_objects", 0)
    return f"; {n} object-storage request{'s' * (n != 1)} retried ({objects} object{'s' * (objects != 1)})"


def gave_up_mark() -> int:
    """How many objects this process has given up on so far (for ``exhausted_object(since=...)``)."""
    return _retry_watch.gave_up


def exhausted_object(since: int = 0) -> str | None:
    """The last object whose requests failed every attempt in this process (after the ``since``-th
    give-up: ``gave_up_mark()``); None: none."""
    return _retry_watch.last_gave_up if _retry_watch.gave_up > since else None


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    if is_local(path):
        fs.makedirs(p, exist_ok=True)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    fs.invalidate_cache(p)  # another process may have written it since (s3fs caches listings)
    return fs.exists(p)


def open_file(path: str, mode: str = "rb") -> IO:
    """Open for reading (streaming: nothing is loaded whole)."""
    fs, p = filesystem(path)
    try:
        return fs.open(p, mode)
    except FileNotFoundError:
        if is_local(path):
            raise
        fs.invalidate_cache(p)  # a listing cached here earlier may predate the file (another process wrote it)
        return fs.open(p, mode)


def list_files(folder: str, suffix: str = "") -> list[str]:
    """Full paths (with scheme for remote storage) of files in ``folder`` ending with ``suffix``."""
    fs, p = filesystem(folder)
    fs.invalidate_cache(p)  # listings are cached per process; other processes write shards
    if not fs.exists(p):
        return []
    protocol = "" if is_local(folder) else folder.split("://", 1)[0] + "://"
    names = sorted(fs.ls(p, detail=False))
    return [protocol + n if protocol and not n.startswith(protocol) else n for n in names if n.endswith(suffix)]


class DiskFull(OSError):
    """A local write that found no space left (or hit the file-size limit): names the path and the space."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.ENOSPC, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # travels back from a worker process whole
        return DiskFull, (self.message, self.filename)


NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", size: int | None = None) -> Iterator[IO]:
    """Write ``path`` so that readers see either nothing or the complete file.

    ``size``: the bytes to be written, when known, for the error of a full disk (``DiskFull``,
    which names the path, the space needed and the space free; the partial file is removed).
    """
    fs, p = filesystem(path)
    if not is_local(path):
        with fs.open(p, mode) as handle:  # a single PUT when closed: atomic per object
            yield handle
        return
    folder, name = os.path.split(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    written = 0
    try:
        with open(tmp, mode) as handle:
            try:
                yield handle
                written = handle.tell()
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                written = written or _tell(handle)
                raise disk_full(p, folder, exc, size, written) from None
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tell(handle: IO) -> int:
    try:
        return handle.tell()
    except (OSError, ValueError):
        return 0


def disk_full(path: str, folder: str, exc: OSError, size: int | None = None, written: int = 0) -> DiskFull:
    """The ``DiskFull`` of a write to ``path`` (in ``folder``) that failed with ``exc`` (errno in ``NO_SPACE``):
    ``size`` the bytes it needed when known, else ``written`` the bytes written before it failed."""
    import shutil

    free = shutil.disk_usage(folder).free
    need = f"needs {size:,} bytes" if size else f"needs more than the {written:,} bytes written before it failed"
    why = "the file-size limit" if exc.errno == errno.EFBIG else "no space left on the device"
    return DiskFull(f"{path}: {why} ({need}; {free:,} bytes free in {folder}); nothing of it was kept: free "
                    "space and rerun the same command", path)


def write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, default=str)
        handle.write("\n")


def read_json(path: str) -> Any:
    with open_file(path, "r") as handle:
        return json.load(handle)


def _normalised(path: str) -> str:
    if is_local(path):
        return os.path.realpath(path.removeprefix("file://")).rstrip("/") + "/"
    return path.rstrip("/") + "/"


def contains(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (local paths resolved, links followed)."""
    return bool(folder) and bool(path) and _normalised(path).startswith(_normalised(folder))


def refuse_overlap(output_option: str, output: str, inputs: dict[str, str | list[str] | None]) -> None:
    """A ``ConfigError`` when the output folder is, or holds, an input (deleting or rewriting it would lose it).
    An output in a subfolder of an input folder is allowed: stages read their input folders flat."""
    from core.errors import ConfigError

    problems = []
    for name, values in inputs.items():
        for value in [values] if isinstance(values, str) else (values or []):
            if contains(output, value):
                problems.append(f"{output_option}={output!r} holds the input {name}={value!r}: writing there could "
                                f"destroy it; choose another {output_option}")
    if problems:
        raise ConfigError(problems)


def describe_contents(folder: str) -> str:
    """'N files (B bytes)' in ``folder``, for a message about deleting it."""
    fs, p = filesystem(folder)
    if not fs.exists(p):
        return "nothing"
    files = fs.find(p, detail=True)
    size = sum(int(info.get("size") or 0) for info in files.values())
    return f"{len(files)} files ({size / 1e6:,.1f} MB)"


@contextlib.contextmanager
def parquet_errors(path: str, what: str = "") -> Iterator[None]:
    """Inside: a file that is not parquet, or lacks a column asked for, is a ``DataError`` naming ``path``."""
    import pyarrow as pa

    from core.errors import DataError

    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowKeyError) as exc:
        detail = str(exc).split("\n")[0]
        raise DataError(f"{path}: {'not a readable parquet file' if 'magic' in detail.lower() else 'cannot read'} "
                        f"({detail}){'; ' + what if what else ''}") from None


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def clear_folder(folder: str, keep: tuple[str, ...] = ("_lock.json",)) -> None:
    """Remove everything in ``folder`` but the names in ``keep`` (the run's own lock)."""
    fs, p = filesystem(folder)
    fs.invalidate_cache(p)
    if not fs.exists(p):
        return
    for entry in fs.ls(p, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(entry, recursive=True)


def sha256_of(path: str) -> tuple[str, int]:
    """(sha256 hex, bytes) of a file, streamed."""
    digest, size = hashlib.sha256(), 0
    with open_file(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fingerprint(path: str) -> dict[str, Any]:
    """What identifies a file's contents, for manifests.

    Local files: their sha256 (read once). Object storage: size, ETag and modification
    time from the store, without downloading the object (an ETag is the MD5 of a
    single-part upload and a version tag otherwise: it changes whenever the object does).
    """
    if is_local(path):
        sha, size = sha256_of(path)
        return {"path": path, "bytes": size, "sha256": sha}
    fs, p = filesystem(path)
    info = fs.info(p)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"') or None
    modified = info.get("LastModified") or info.get("mtime")
    return {"path": path, "bytes": info.get("size"), "etag": etag, "modified": str(modified) if modified else None}
