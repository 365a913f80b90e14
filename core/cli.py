"""How every ``python -m <stage>`` command ends: one line for a mistake, a documented exit code.

``run(prog, body)`` runs a command's body and turns what a user can cause into one or
two lines on stderr that name the file, column, key, bucket or endpoint and what to do:

* exit 0: done; 1: the work failed (a damaged input found while working, a unit that
  failed every try, an empty result: see ``EmptyResult``); 2: bad usage or bad inputs
  (``ConfigError``, ``DataError``, a missing file, no permission, no object-storage
  credentials, an endpoint that does not answer, a file that is not parquet);
  130: interrupted (Ctrl-C), with what is committed and the command that resumes.
* a traceback only with ``--debug`` (every command's flag, ``core.config``) or
  ``WEBCLIP_DEBUG=1`` in the environment.

It also keeps logs quiet: third-party warnings a user cannot act on are dropped, and
nothing writes colour codes when stderr is not a terminal (``quiet_logs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from core.errors import ConfigError, DataError

DEBUG_ENV = "WEBCLIP_DEBUG"
EXIT_CODES = "exit codes: 0 done, 1 the work failed or found nothing to keep, 2 bad usage or bad inputs, " \
             "130 interrupted; --debug (or WEBCLIP_DEBUG=1) shows the traceback of an error"

_context: dict[str, Any] = {"config": None, "committed": None, "resume": None}


class EmptyResult(RuntimeError):
    """A run that finished but kept or downloaded nothing: exit 1, with the reason and the likely fix."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def using(config: Any, committed: Callable[[], str] | None = None, resume: str | None = None) -> None:
    """Tell ``run`` the command's config (to name its buckets), how to say what is committed after
    Ctrl-C, and the command that resumes (default: the same command again)."""
    _context.update(config=config, committed=committed, resume=resume)


def resume_command() -> str:
    """The command line that started this process, as a user would type it again."""
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else None
    if module and module.endswith(".__main__"):
        module = module.removesuffix(".__main__")
    head = f"python -m {module}" if module else shlex.quote(sys.argv[0])
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def quiet_logs() -> None:
    """Warnings a user can act on, and nothing else from third parties; no colour without a terminal."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's notice that token authentication is on for the local instance it starts: nothing to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # log files get no colour codes (bars are off then: core.executor)
        os.environ.setdefault("NO_COLOR", "1")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for pattern in (".*[Tt]oken.*", ".*pkg_resources.*", ".*TypedStorage is deprecated.*",
                    ".*QuickGELU mismatch.*", ".*No pretrained weights loaded.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("open_clip").addFilter(_drop_pretrained_notice)
    logging.getLogger().addFilter(_drop_pretrained_notice)


def _drop_pretrained_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")


def hold_output(folder: str) -> None:
    """Take the output folder's lock (``core.lock``) before writing there; ``run`` gives it back at the end.

    Another live run on the folder: ``OutputLocked``, exit 2, naming that run."""
    from core.lock import OutputLock

    lock = OutputLock(folder, resume_command())
    lock.acquire()
    _held.append(lock)


_held: list[Any] = []  # the locks this command holds (core.lock.OutputLock)


def _release_locks() -> None:
    while _held:
        _held.pop().release()


_main_pid = os.getpid()


def _sigterm_as_interrupt(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    if os.getpid() != _main_pid:  # a forked worker inherited the handler: die as SIGTERM says
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (what Slurm, Kubernetes and ``kill`` send) ends the command as Ctrl-C does: in the main
    thread of the main process, a ``KeyboardInterrupt``; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _main_pid
    _main_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(prog: str, body: Callable[[], int | None]) -> int:
    """``body()``'s exit code, or the exit code of what it raised, explained in one or two lines."""
    quiet_logs()
    try:
        with _sigterm_interrupts():
            try:
                return body() or 0
            finally:
                _release_locks()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted. {_committed()}", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a stage's own "cannot start" message: an input to fix
            if debug():
                traceback.print_exc()
            message = exc.code if exc.code.startswith(prog.split()[-1].split(".")[0]) else f"{prog}: {exc.code}"
            print(message, file=sys.stderr)
            return 2
        raise
    except BaseException as exc:  # noqa: BLE001 - every error ends in one explained line
        if debug():
            traceback.print_exc()
        code, message = explain(exc)
        print(f"{prog}: error: {message}", file=sys.stderr)
        if code == 1 and not isinstance(exc, EmptyResult) and not debug():
            print(f"(rerun with --debug, or {DEBUG_ENV}=1, for the traceback)", file=sys.stderr)
        return code


def _committed() -> str:
    note = ""
    if _context["committed"] is not None:
        try:
            note = _context["committed"]().rstrip(".") + ". "
        except Exception:  # noqa: BLE001 - the note is a courtesy; the exit must not fail
            note = ""
    return f"{note}Resume with: {_context['resume'] or resume_command()}"


# -- explaining an error ------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _remote_paths() -> list[str]:
    """The object-storage paths of the registered config (to name the bucket in a storage error)."""
    config = _context["config"]
    out: list[str] = []

    def visit(obj: Any) -> None:
        if is_dataclass(obj):
            for f in fields(obj):
                visit(getattr(obj, f.name))
        elif isinstance(obj, str) and "://" in obj and not obj.startswith(("http://", "https://", "file://")):
            out.append(obj)
        elif isinstance(obj, list):
            for item in obj:
                visit(item)

    visit(config)
    if not out:
        out = [a for a in sys.argv[1:] if a.startswith("s3://")]
    return out


def _buckets() -> str:
    names = sorted({p.split("://", 1)[1].split("/", 1)[0] for p in _remote_paths()})
    return ", ".join(f"s3://{n}" for n in names) or "object storage"


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"


_STORAGE_ERRORS = ("ClientError", "ReadTimeoutError", "ConnectTimeoutError", "ClientPayloadError",
                   "ResponseStreamingError", "ServerDisconnectedError", "EndpointConnectionError")


def _exhausted_object(exc: BaseException) -> str | None:
    """The object whose retries ran out: named by the unit that raised ``exc`` (``core.executor``: it may
    have run in another process or on Ray), else the last one of this process."""
    for link in _chain(exc):
        if getattr(link, "storage_object", None):
            return link.storage_object
    storage = sys.modules.get("core.storage")  # only a process that used storage can have given up on an object
    return storage.exhausted_object() if storage is not None else None


def _storage_error(link: BaseException) -> bool:
    if getattr(link, "storage_object", None):  # a unit's error, raised where it gave up on an object
        return True
    names = {type(link).__name__, type(getattr(link, "cause", None)).__name__}  # a Ray task's error: its cause
    return isinstance(link, OSError) or bool(names & set(_STORAGE_ERRORS))


def explain(exc: BaseException) -> tuple[int, str]:
    """(exit code, one or two lines) for an error."""
    if isinstance(exc, (ConfigError, DataError)):
        return 2, str(exc)
    if isinstance(exc, EmptyResult):
        return 1, str(exc)
    for link in _chain(exc):
        if "DiskFull" in type(link).__name__:  # core.storage's, maybe from a unit elsewhere: path and space
            return 1, str(getattr(link, "message", link))
    gone = _exhausted_object(exc)
    unreachable = any(type(link).__name__ in ("EndpointConnectionError", "ConnectTimeoutError") for link in _chain(exc))
    if gone and not unreachable and any(_storage_error(link) for link in _chain(exc)):
        return 1, (f"object storage: gave up on {gone}, the retry budget spent (WEBCLIP_S3_RETRIES); rerun the "
                   "same command: what is committed is kept")
    for link in _chain(exc):
        name = type(link).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return 2, (f"no credentials for {_buckets()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(or AWS_PROFILE) in the environment")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ServerDisconnectedError") or (
                isinstance(link, ConnectionError) and _remote_paths()):
            return 2, (f"cannot reach the object store at {_endpoint()} (for {_buckets()}): is the server up? "
                       "set S3_ENDPOINT_URL to the right endpoint")
        if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or "InvalidAccessKeyId" in str(link):
            return 2, f"the object store at {_endpoint()} refused the credentials for {_buckets()}: check AWS_ACCESS_KEY_ID"
        if name == "NoSuchBucket" or "NoSuchBucket" in str(link) or "bucket does not exist" in str(link).lower():
            return 2, f"no such bucket: {_buckets()} (at {_endpoint()}); create it or fix the path"
    if isinstance(exc, FileNotFoundError):
        return 2, f"{exc.filename or exc}: no such file or folder; check the path"
    if isinstance(exc, PermissionError):
        where = exc.filename or (_buckets() if _remote_paths() else "")
        return 2, f"{where}: permission denied ({exc.strerror or exc}); choose a folder you can write, or fix its rights"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return 2, f"{exc.filename}: {exc.strerror}; check the path"
    if isinstance(exc, OSError) and exc.errno == 28:
        return 1, f"{exc.filename or 'disk'}: no space left on the device; free space and rerun (committed units are kept)"
    if type(exc).__name__ in ("DamagedPool", "ClipScoreError", "EmbedError", "SetupFailed", "NonFiniteLoss", "NonFiniteWeights"):
        return 1, str(exc)
    return 1, f"{type(exc).__name__}: {exc}"


def shards_committed(folder: str, what: str = "shards") -> Callable[[], str]:
    """A ``committed`` note for ``using``: how many units carry their commit marker in ``folder``."""

    def note() -> str:
        from core.layout import committed_shards

        return f"{len(committed_shards(folder))} {what} committed in {folder}"

    return note
