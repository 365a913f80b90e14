"""One run per output folder: ``_lock.json`` (host, pid, start time, heartbeat), local or on ``s3://``.

Every stage's driver takes the lock of its output folder before it writes
(``core.cli.hold_output``) and gives it back when it ends, however it ends. A second
run on the same folder is refused (``OutputLocked``: exit 2) with a line naming the
other run. A lock left by a run that died (``kill -9``, a lost node) is taken over with
a warning when either

* it names this host and its pid is gone, or
* its heartbeat is older than ``WEBCLIP_LOCK_STALE_S`` seconds (default 300); a
  thread refreshes it every ``WEBCLIP_LOCK_HEARTBEAT_S`` (default 30) while the run lives.

Creation is exclusive: locally a hard link of a complete temporary file (fails if the
name exists); on object storage a conditional PUT (``If-None-Match: *``, which AWS S3
and the S3-compatible test server both honour). Taking over a stale lock deletes it and
creates it again exclusively, so of two runs taking over at once one wins and the other
is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

from core import storage
from core.errors import DataError

LOCK_NAME = "_lock.json"
log = logging.getLogger("webclip.lock")


class OutputLocked(DataError):
    """Another live run holds the output folder (exit 2)."""


def stale_after_s() -> float:
    return float(os.environ.get("WEBCLIP_LOCK_STALE_S", "300"))


def heartbeat_s() -> float:
    return float(os.environ.get("WEBCLIP_LOCK_HEARTBEAT_S", "30"))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class OutputLock:
    """The lock of one output folder, held from ``acquire`` to ``release``."""

    def __init__(self, folder: str, command: str = ""):
        self.folder = folder
        self.path = storage.join(folder, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "heartbeat": _now(),
                       "heartbeat_unix": time.time(), "command": command, "token": self.token}  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- creating and reading -------------------------------------------------------------------

    def _makedirs(self, folder: str) -> None:
        """Create the folder, remembering which levels were new: a run that ends having written nothing
        there (a bad input found after the lock) leaves no empty folders behind."""
        missing = []
        while folder and not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for level in reversed(missing):
            os.makedirs(level, exist_ok=True)
        self._created = missing  # deepest first

    def _create(self) -> bool:
        """Create the lock file exclusively; False when it exists."""
        data = json.dumps(self.record, indent=2).encode() + b"\n"
        if storage.is_local(self.path):
            path = self.path.removeprefix("file://")
            self._makedirs(os.path.dirname(os.path.abspath(path)))
            tmp = f"{path}.{self.token[:8]}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        fs, p = storage.filesystem(self.path)
        try:
            fs.pipe_file(p, data, mode="create")  # PutObject with If-None-Match: *
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.path)
        except (FileNotFoundError, json.JSONDecodeError, ValueError):
            return None

    def _stale(self, other: dict) -> str | None:
        """Why ``other``'s lock is stale (its run is gone), or None while it may be alive."""
        if other.get("host") == socket.gethostname() and not _pid_alive(int(other.get("pid", 0))):
            return f"its process {other.get('pid')} on this host is gone"
        age = time.time() - float(other.get("heartbeat_unix", 0))
        if age > stale_after_s():
            return f"its heartbeat is {age:.0f} s old (more than {stale_after_s():.0f} s)"
        return None

    # -- the lock's life ----------------------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            other = self._read()
            if other is None:  # removed (or half-read) in between: try again
                time.sleep(0.05)
                continue
            why = self._stale(other)
            if why is None:
                raise OutputLocked(
                    f"{self.folder} is being written by another run (host {other.get('host')}, pid "
                    f"{other.get('pid')}, started {other.get('started')}, last heartbeat {other.get('heartbeat')}); "
                    f"wait for it to end or choose another output folder (a dead run's lock is taken over "
                    f"after {stale_after_s():.0f} s)"
                )
            log.warning("%s: taking over the lock of a run that is gone (host %s, pid %s, started %s): %s",
                        self.folder, other.get("host"), other.get("pid"), other.get("started"), why)  # fmt: skip
            if self._read() == other:  # still the same stale lock: remove it, then create ours exclusively
                storage.remove(self.path)
        raise OutputLocked(f"{self.path}: could not take the lock (other runs keep taking it); try again")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="webclip-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            try:
                if (self._read() or {}).get("token") != self.token:
                    log.error("%s: the lock is no longer this run's (taken over?)", self.path)
                    return
                self.record.update(heartbeat=_now(), heartbeat_unix=time.time())
                storage.write_json(self.path, self.record)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("%s: heartbeat not written (%s)", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._give_back()
        for level in getattr(self, "_created", []):  # deepest first; only those left empty
            with contextlib.suppress(OSError):
                os.rmdir(level)

    def _give_back(self) -> None:
        try:
            current = self._read()
            if (current or {}).get("token") == self.token:
                storage.remove(self.path)
            elif current is not None:
                log.warning("%s: the lock now belongs to another run (host %s, pid %s): left to it", self.path,
                            current.get("host"), current.get("pid"))  # fmt: skip
        except OSError as exc:
            if getattr(exc, "errno", None) != errno.ENOENT:
                log.warning("%s: lock not removed (%s); the next run will take it over", self.path, exc)
