"""One way to run a stage's units: inline, in local processes, as Ray tasks, or on Ray actors.

A stage is a list of units (a shard, a file, a range; any picklable value, from a lazy
iterator if need be), what one unit does (a module-level function: it writes its own
output atomically and may run twice) and what the driver combines from the results::

    with Executor(cfg, desc="ingest", unit="shard", item="sample") as ex:   # cfg: an Execution
        for stats in ex.map(partial(download, cfg), shards):               # fn(unit) -> result
            summary.add(stats)

``map`` yields results as units finish (``ordered=True``: in input order), with at most
``max_in_flight`` units taken from ``units`` and not yet yielded; a unit that raises, or
whose process, Ray worker or actor dies, is run again up to ``max_retries`` times, then
its error ends the run (``keep_going=True``: yielded as a ``Failed`` instead). With
``setup``, every worker (a process, a Ray actor, or this process once) calls ``setup()``
once and each unit runs as ``fn(state, unit)``: a model loaded once per actor, one actor
per GPU with ``ray_options={"num_gpus": 1}``. Inside a unit, ``report(items, **counts)``
gives its running counts (absolute, so a repeat or a retry is harmless) to the one
progress bar: units done, items/s, totals. Ctrl-C stops the workers (no process is left
behind, a Ray this executor started is shut down) and re-raises KeyboardInterrupt.
A unit's object-storage retries travel back with its result (or its error, with the object
it gave up on), so the driver's ``core.storage.retry_counts()`` counts the whole stage's.

Backends (``Execution.distributor``): ``inline`` runs here; ``processes`` spawns up to
``workers`` local processes, started as needed, a killed one replaced; ``ray`` runs Ray
tasks (Ray retries them) or, with ``setup``, a pool of actors. ``auto``: Ray when an
address is given (``ray_address``, RAY_ADDRESS) or Ray is running in this process, else
local processes — inline when a single worker or unit would be started anyway.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, fields
from typing import Any

from tqdm import tqdm

from core.config import at_least, one_of, option
from core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DISTRIBUTORS = ("auto", "ray", "processes", "inline", "multiprocessing")  # multiprocessing: img2dataset's name
POLL_S = 0.5  # how often the driver looks at progress, and a unit sends it


@dataclass
class Execution:
    """Where and how a stage runs its units: the same options in every stage (inherit it)."""

    distributor: str = option(
        "auto", "where units run: auto (Ray when ray_address or RAY_ADDRESS is given, else local processes: the "
        "fastest on one machine), ray (tasks on a local Ray instance or the cluster at ray_address), processes "
        "(local processes; 'multiprocessing' is accepted), inline (this process, one unit at a time)")
    workers: int = option(0, "units run at once (0: one per CPU of this machine, or of the Ray cluster)")
    max_retries: int = option(3, "times a unit that failed, or whose worker died, is run again")
    max_in_flight: int = option(0, "units started but not finished, bounding memory (0: 2 x workers)")
    ray_address: str | None = option(None, "Ray cluster to join (none: RAY_ADDRESS if set, else a local instance)")
    progress: bool | None = option(None, "progress bar on stderr (none: only when stderr is a terminal)")

    def __post_init__(self) -> None:
        one_of(self, "distributor", DISTRIBUTORS)
        at_least(self, 0, "workers", "max_retries", "max_in_flight")
        if self.ray_address == "":
            self.ray_address = None

    def execution_options(self) -> dict[str, Any]:
        """The execution options alone, to hand to another stage's config."""
        return {f.name: getattr(self, f.name) for f in fields(Execution)}


@dataclass
class Failed:
    """A unit that failed every try (yielded only with ``keep_going=True``)."""

    unit: Any
    error: BaseException
    tries: int


class SetupFailed(RuntimeError):
    """A worker's ``setup()`` raised: never retried, it would fail again."""


def progress_enabled(setting: bool | None) -> bool:
    """``None`` means: only when someone is watching (stderr is a terminal)."""
    return sys.stderr.isatty() if setting is None else setting


@contextlib.contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Inside, Ctrl-C and SIGTERM are held: the signals that came are in the yielded list, for the caller
    to act on after the block (a start cut short would orphan what it had started). Main thread only."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, _: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def init_ray(address: str | None, num_cpus: int = 0) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local instance.

    Returns whether this call started Ray (the caller then shuts it down); a Ray
    already initialised in this process is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    # its notice that token authentication is on for a local instance: nothing a user acts on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None and num_cpus:
        kwargs["num_cpus"] = num_cpus
    # Ctrl-C or SIGTERM halfway through ray.init would orphan some of its daemons: they wait until Ray is up.
    # ray.init sets its own SIGTERM handler at once, which exits halfway: that exit is taken as the signal
    # it is, and whatever the start had launched is stopped (Ray's shutdown misses the agents of a half-started node).
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with _interrupts_held() as interrupted:
        try:
            ray.init(address=address, **kwargs)
        except SystemExit as exc:
            if threading.current_thread() is not threading.main_thread() or exc.code != signal.SIGTERM:
                raise
            interrupted.append(signal.SIGTERM)
    if interrupted:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        ray.shutdown()
        _stop_ray_session(started)
        raise KeyboardInterrupt(f"signal {interrupted[0]}")
    return True


def _stop_ray_session(started: list) -> None:
    """Stop every process of the Ray session that ``started`` (psutil processes) belong to: the daemons a
    start cut short had launched, and the agents its raylet launches still (they would outlive it)."""
    import re

    import psutil

    def cmdline(process) -> str:
        with contextlib.suppress(psutil.Error):
            return " ".join(process.cmdline())
        return ""

    sessions = {m for p in started for m in re.findall(r"session_[0-9_-]+", cmdline(p))}
    quiet_since = time.monotonic()
    while sessions and time.monotonic() - quiet_since < 1.0:  # until no new one has shown up for a second
        found = [p for p in psutil.process_iter() if p.pid != os.getpid() and any(s in cmdline(p) for s in sessions)]
        for process in found:
            with contextlib.suppress(psutil.Error):
                process.kill()
        if found:
            quiet_since = time.monotonic()
        time.sleep(0.1)


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


# -- inside a unit: reporting progress ---------------------------------------------------------


class _Reporter:
    """A unit's latest counts; sent on at most every POLL_S (the final ones travel with the result)."""

    def __init__(self, send: Callable[[dict], None] | None):
        self.send, self.latest, self._sent, self._lock = send, {}, 0.0, threading.Lock()

    def __call__(self, items: int, **counts: int) -> None:
        with self._lock:
            self.latest = {"items": items, **counts}
            if self.send is not None and time.monotonic() - self._sent >= POLL_S:
                self._sent = time.monotonic()
                self.send(self.latest)


_reporter: _Reporter | None = None


def report(items: int, **counts: int) -> None:
    """From inside a unit: its running counts so far (items done, and any others, e.g. successes)."""
    if _reporter is not None:
        _reporter(items, **counts)


def _run_unit(fn: Callable, unit: Any, state: Any, send: Callable[[dict], None] | None) -> tuple[Any, dict]:
    """``fn`` on ``unit`` (with ``state`` when the worker has one); returns (result, final counts).

    The counts include the unit's object-storage retries (``core.storage``); an error carries them
    (``storage_counts``) and, when the unit gave up on an object, its name (``storage_object``), so
    the driver can count them and name the object wherever the unit ran."""
    global _reporter
    _reporter = _Reporter(send)
    mark = _storage_mark()
    try:
        result = fn(unit) if state is _NO_STATE else fn(state, unit)
        return result, {**_reporter.latest, **_storage_since(mark)[0]}
    except BaseException as exc:
        counts, gone = _storage_since(mark)
        with contextlib.suppress(AttributeError, TypeError):
            exc.storage_counts = counts
            if gone:
                exc.storage_object = gone
        raise
    finally:
        _reporter = None


def _storage_mark() -> tuple[dict, int]:
    storage = sys.modules.get("core.storage")  # a unit that never touched storage retried nothing
    return (storage.retry_counts(), storage.gave_up_mark()) if storage is not None else ({}, 0)


def _storage_since(mark: tuple[dict, int]) -> tuple[dict[str, int], str | None]:
    """(the retry counts since ``mark``, those not zero; the object given up on since, if any)."""
    storage = sys.modules.get("core.storage")
    if storage is None:
        return {}, None
    return ({k: v for k, v in storage.retries_since(mark[0]).items() if v},
            storage.exhausted_object(since=mark[1]))


def _count_storage_retries(counts: dict | None) -> None:
    """A unit that ran in another process: its object-storage retries become this process's."""
    if counts and any(key.startswith("storage_") for key in counts):
        from core import storage

        storage.add_retries_elsewhere(counts)


_NO_STATE, _UNSET = object(), object()


def _disk_full() -> tuple[type, ...]:
    """``core.storage.DiskFull`` where storage is in use: a full disk is not worth another try."""
    storage = sys.modules.get("core.storage")
    return (storage.DiskFull,) if storage is not None else ()


def _setup_state(setup: Callable[[], Any] | None) -> Any:
    if setup is None:
        return _NO_STATE
    try:
        return setup()
    except Exception as exc:  # noqa: BLE001 - reported with each unit, never retried
        failed = SetupFailed(f"worker set-up failed: {type(exc).__name__}: {exc}")
        failed.add_note(traceback.format_exc())
        return failed


# -- the progress bar -----------------------------------------------------------------------------


class Progress:
    """One bar: units done and items/s. Units give absolute running counts, so a late or
    repeated report is harmless and a retried unit never runs the bar backwards."""

    def __init__(self, desc: str, unit: str = "unit", item: str | None = None, total: int | None = None,
                 enabled: bool = False, postfix: Callable[[dict], dict] | None = None):
        self.unit, self.item, self.enabled, self._postfix = unit, item, enabled, postfix
        self.units_done, self._done, self._running, self._finished, self._shown = 0, Counter(), {}, set(), 0
        self._bar = tqdm(total=total, desc=desc, unit=item or unit, disable=not enabled, smoothing=0.1,
                         mininterval=0.5, file=sys.stderr, dynamic_ncols=True)

    def running(self, key: Any, counts: dict) -> None:
        """Running counts of a unit in flight."""
        if key not in self._finished:
            self._running[key] = counts
            self._refresh()

    def finished(self, key: Any, counts: dict) -> None:
        """A unit is done: its final counts."""
        self._running.pop(key, None)
        if key not in self._finished:
            self._finished.add(key)
            self.add(counts)

    def add(self, counts: dict) -> None:
        """A unit done without running here (e.g. committed by an earlier run)."""
        self.units_done += 1
        self._done.update(counts)
        self._refresh()

    @property
    def totals(self) -> dict[str, int]:
        """Counts so far, finished and running units together."""
        totals = Counter(self._done)
        for counts in self._running.values():
            totals.update(counts)
        return dict(totals)

    def _refresh(self) -> None:
        if not self.enabled:
            return
        shown = self.totals.get("items", 0) if self.item else self.units_done
        if self.item:
            extra = self._postfix(self.totals) if self._postfix else {}
            self._bar.set_postfix({**extra, f"{self.unit}s": self.units_done}, refresh=False)
        if shown > self._shown:
            self._bar.update(shown - self._shown)
            self._shown = shown

    def close(self) -> None:
        self._bar.close()


# -- backends: submit(index, unit), free() slots, wait() -> [(index, result | error, final counts)] ----


class _Inline:
    """This process, one unit at a time (set-up done once, on first use)."""

    size = 1

    def __init__(self, fn, setup, on_progress):
        self.fn, self.setup, self.on_progress, self.next, self.state = fn, setup, on_progress, None, _UNSET

    def free(self) -> int:
        return self.next is None

    def submit(self, index: int, unit: Any) -> None:
        self.next = (index, unit)

    def wait(self, timeout: float) -> list:
        (index, unit), self.next = self.next, None
        if self.state is _UNSET:
            self.state = _setup_state(self.setup)
        if isinstance(self.state, SetupFailed):
            return [(index, self.state, None)]
        try:
            result, counts = _run_unit(self.fn, unit, self.state, lambda c: self.on_progress(index, c))
        except Exception as exc:  # noqa: BLE001 - retried by the loop
            return [(index, exc, None)]
        return [(index, result, counts)]

    def close(self, abort: bool) -> None:
        pass


def _stop_worker(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    if _reporter is None:  # between units, or exiting already: nothing to clean up
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)  # through the unit's ``finally`` blocks: nothing it staged is left


def _process_main(conn, setup) -> None:
    """A worker process: set up once, then run units until told to stop; a ``("fn", fn)`` message
    sets the function of the units that follow (once per map, not with every unit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops us
    signal.signal(signal.SIGTERM, _stop_worker)  # how the driver stops us: the unit cleans up on its way out
    state, fn = _setup_state(setup), None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        if message[0] == "fn":
            fn = message[1]
            continue
        index, unit, live = message
        send = (lambda counts: conn.send(("progress", index, counts))) if live else None
        try:
            if isinstance(state, SetupFailed):
                raise state
            outcome = ("done", index, _run_unit(fn, unit, state, send))
        except Exception as exc:  # noqa: BLE001 - the driver decides whether to retry
            exc.add_note(traceback.format_exc())
            outcome = ("error", index, exc)
        try:
            conn.send(outcome)
        except Exception as exc:  # noqa: BLE001 - the result or the error would not pickle
            conn.send(("error", index, _sendable(outcome, index, exc)))


def _sendable(outcome: tuple, index: int, exc: Exception) -> BaseException:
    """An error in place of an outcome that would not pickle; a unit's own error keeps its kind (an
    ``OSError`` stays one), its message and what it says about object storage (``_run_unit``)."""
    if outcome[0] != "error":
        return RuntimeError(f"unit #{index}: its result cannot be sent back: {exc}")
    error = outcome[2]
    stand_in = (OSError if isinstance(error, OSError) else RuntimeError)(f"{type(error).__name__}: {error}")
    for name in ("storage_counts", "storage_object", "__notes__"):
        if hasattr(error, name):
            setattr(stand_in, name, getattr(error, name))
    return stand_in


class _Processes:
    """Up to ``size`` spawned processes (no fork of a driver holding threads), one unit each at a time.

    ``fn`` travels once to each process per map (``use``), not with every unit: a large value
    bound into it (``functools.partial``) is pickled once per process. Without ``setup`` the
    executor keeps the processes for its next map: a stage of several passes starts them once.
    """

    def __init__(self, size: int, setup, live: bool):
        self.size, self.setup, self.live = size, setup, live
        self.context = multiprocessing.get_context("spawn")
        self.idle: list = []
        self.busy: dict = {}  # connection -> (process, unit index)
        self.fn, self.on_progress, self.generation, self.has_fn = None, None, 0, {}

    def use(self, fn, on_progress) -> None:
        """The function (and progress sink) of the units that follow."""
        self.fn, self.on_progress, self.generation = fn, on_progress, self.generation + 1

    def free(self) -> int:
        return self.size - len(self.busy)

    def submit(self, index: int, unit: Any) -> None:
        while self.idle:
            conn, process = self.idle.pop()
            try:
                self._send(conn, index, unit)
                self.busy[conn] = (process, index)
                return
            except OSError:  # it died while idle
                self.has_fn.pop(conn, None)
                process.join()
        conn, child = self.context.Pipe()
        process = self.context.Process(target=_process_main, args=(child, self.setup), daemon=True)
        # Ctrl-C reaches the whole process group: a worker starts with SIGINT blocked, so one still importing
        # cannot die of it with a traceback (the driver stops it), and the driver holds Ctrl-C and SIGTERM
        # until the worker has its start-up data. (multiprocessing's resource tracker is started first:
        # starting it unblocks SIGINT.)
        multiprocessing.resource_tracker.ensure_running()
        with _interrupts_held() as interrupted:
            masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        child.close()
        self.busy[conn] = (process, index)
        if interrupted:
            raise KeyboardInterrupt(f"signal {interrupted[0]}")
        self._send(conn, index, unit)

    def _send(self, conn, index: int, unit: Any) -> None:
        if self.has_fn.get(conn) != self.generation:
            conn.send(("fn", self.fn))
            self.has_fn[conn] = self.generation
        conn.send((index, unit, self.live))

    def wait(self, timeout: float) -> list:
        sentinels = {process.sentinel: conn for conn, (process, _) in self.busy.items()}
        ready = multiprocessing.connection.wait([*self.busy, *sentinels], timeout)
        outcomes = []
        for conn in {sentinels.get(r, r) for r in ready}:
            process, index = self.busy[conn]
            try:
                while conn.poll():
                    kind, index, payload = conn.recv()
                    if kind == "progress":
                        self.on_progress(index, payload)
                        continue
                    del self.busy[conn]
                    self.idle.append((conn, process))
                    outcomes.append((index, *payload) if kind == "done" else (index, payload, None))
                    break
            except (EOFError, OSError):
                pass
            if conn in self.busy and not process.is_alive():  # killed outright: replaced on the next submit
                del self.busy[conn]
                self.has_fn.pop(conn, None)
                conn.close()
                process.join()
                outcomes.append((index, RuntimeError(f"unit #{index}: its worker process died "
                                                     f"(exit code {process.exitcode})"), None))
        return outcomes

    def close(self, abort: bool) -> None:
        processes = [p for _, p in self.idle] + [p for p, _ in self.busy.values()]
        for conn, process in self.idle:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in processes:
            if abort:
                process.terminate()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


class _ProgressBoard:
    """Latest counts per unit, written by Ray tasks and actors, taken by the driver."""

    def __init__(self) -> None:
        self._latest: dict[int, dict] = {}

    def report(self, index: int, counts: dict) -> None:
        self._latest[index] = counts

    def take(self) -> dict[int, dict]:
        latest, self._latest = self._latest, {}
        return latest


def _to_board(board, index: int) -> Callable[[dict], None] | None:
    return (lambda counts: board.report.remote(index, counts)) if board is not None else None


def _ray_task(fn, unit, index, board):
    """One unit as a Ray task (Ray titles its process ``ray::_ray_task``)."""
    return _run_unit(fn, unit, _NO_STATE, _to_board(board, index))


class _RayWorker:
    """An actor: set up once, then units one at a time."""

    def __init__(self, setup) -> None:
        self.state = _setup_state(setup)

    def run(self, fn, unit, index, board):
        if isinstance(self.state, SetupFailed):
            raise self.state
        return _run_unit(fn, unit, self.state, _to_board(board, index))


class _Ray:
    """Ray tasks (Ray retries them: ``retries_itself``), or with ``setup`` a pool of ``size`` actors.

    Progress goes through one tiny actor pinned to the driver's node: the loss of any other
    node then costs only the units running there, never the whole job.
    """

    def __init__(self, size: int, fn, setup, on_progress, live: bool, options: dict | None, max_retries: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.size, self.setup, self.on_progress = ray, size, setup, on_progress
        self.fn = ray.put(fn)  # once, not with every unit
        self.options = {"num_cpus": 1, **(options or {})}
        self.retries_itself = setup is None
        if setup is None:
            self.task = ray.remote(_ray_task).options(max_retries=max_retries, retry_exceptions=True, **self.options)
        else:
            self.actor_class = ray.remote(_RayWorker).options(max_restarts=0, **self.options)
        self.idle: list = []
        self.busy: dict = {}  # ObjectRef -> (actor or None, unit index)
        self.board = None
        if live:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.board = ray.remote(_ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()
        self._polled = time.monotonic()

    def free(self) -> int:
        return sys.maxsize if self.retries_itself else self.size - len(self.busy)  # tasks: the loop's limit

    def submit(self, index: int, unit: Any) -> None:
        if self.retries_itself:
            self.busy[self.task.remote(self.fn, unit, index, self.board)] = (None, index)
            return
        actor = self.idle.pop() if self.idle else self.actor_class.remote(self.setup)
        self.busy[actor.run.remote(self.fn, unit, index, self.board)] = (actor, index)

    def wait(self, timeout: float) -> list:
        ready, _ = self.ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        if self.board is not None and (ready == [] or time.monotonic() - self._polled >= POLL_S):
            self._polled = time.monotonic()
            for index, counts in self.ray.get(self.board.take.remote()).items():
                self.on_progress(index, counts)
        outcomes = []
        for ref in ready:
            actor, index = self.busy.pop(ref)
            try:
                result, counts = self.ray.get(ref)
                outcomes.append((index, result, counts))
            except self.ray.exceptions.RayActorError as exc:  # the actor died: a new one takes its place
                if actor is not None:
                    self.ray.kill(actor)
                outcomes.append((index, exc, None))
                continue
            except Exception as exc:  # noqa: BLE001 - the unit's own error (or its lost worker's)
                outcomes.append((index, exc, None))
            if actor is not None:
                self.idle.append(actor)
        return outcomes

    def close(self, abort: bool) -> None:
        for ref, (actor, _) in self.busy.items():
            if actor is None:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
        for actor in [a for a, _ in self.busy.values() if a is not None] + self.idle + [self.board]:
            if actor is not None:  # actors hold their state (a model, a GPU) on a cluster that lives on
                self.ray.kill(actor)


# -- the executor --------------------------------------------------------------------------------


class Executor:
    """Runs units on the backend ``execution`` names; use as a context manager (see the module doc).

    ``desc``, ``unit``, ``item``, ``total`` and ``postfix`` describe the progress bar: it
    counts ``item``s (items/s, and ``postfix(totals)`` shown beside) when ``item`` is given,
    else units; ``total`` is its length (default: ``len(units)`` when counting units).
    """

    def __init__(self, execution: Execution, desc: str = "", unit: str = "unit", item: str | None = None,
                 total: int | None = None, postfix: Callable[[dict], dict] | None = None):
        self.execution, self.desc, self.unit, self.item, self.total, self.postfix = (
            execution, desc, unit, item, total, postfix)
        self.show = progress_enabled(execution.progress)
        distributor = {"multiprocessing": "processes"}.get(execution.distributor, execution.distributor)
        self.auto = distributor == "auto"
        if self.auto:
            named = execution.ray_address or os.environ.get("RAY_ADDRESS")
            distributor = "ray" if named or _ray_running() else "processes"
        self.distributor = distributor
        self.workers = 1 if distributor == "inline" else execution.workers or os.cpu_count() or 1
        self._started_ray = False
        self._progress: Progress | None = None
        self._skipped: list[dict] = []
        self._open: list[Iterator] = []
        self._pool: _Processes | None = None  # kept between maps (without set-up): started once
        self.totals: dict[str, int] = {}

    def __enter__(self) -> Executor:
        if self.distributor == "ray":
            import ray

            self._started_ray = init_ray(self.execution.ray_address, self.execution.workers)
            self.workers = self.execution.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        elif self.auto and self.workers == 1:
            self.distributor = "inline"  # one worker: a process would only cost its start
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            for running in self._open:
                running.close()  # its workers stop (an exception or Ctrl-C left the caller's loop)
            if self._pool is not None:
                self._pool.close(abort=exc_info[0] is not None)
                self._pool = None
        finally:
            if self._started_ray:
                import ray

                ray.shutdown()
                self._started_ray = False

    def put(self, value: Any) -> Any:
        """A large value shared by many units: in Ray's object store once, else itself."""
        if self.distributor == "ray":
            import ray

            return ray.put(value)
        return value

    def skipped(self, items: int = 0, **counts: int) -> None:
        """Count a unit found done (committed by an earlier run) in the progress bar, without running it."""
        counts = {"items": items, **counts}
        if self._progress is not None:
            self._progress.add(counts)
        else:
            self._skipped.append(counts)

    def map(self, fn: Callable, units: Iterable, *, setup: Callable[[], Any] | None = None, ordered: bool = False,
            keep_going: bool = False, workers: int = 0, ray_options: dict | None = None,
            desc: str | None = None) -> Iterator[Any]:
        """``fn(unit)`` (``fn(setup_state, unit)`` with ``setup``) for each unit; yields the results.

        ``fn`` and ``setup`` must be picklable (module-level functions, or ``functools.partial`` of
        one). ``workers`` overrides the execution's count for this call (e.g. one actor per GPU);
        ``ray_options`` are Ray's for each task or actor (default ``num_cpus=1``; e.g. ``num_gpus``,
        ``runtime_env``). ``desc`` replaces the executor's bar title for this call.
        """
        running = self._map(fn, units, setup, ordered, keep_going, workers, ray_options, desc)
        self._open.append(running)
        return running

    def runs_inline(self, units: Iterable | None = None, workers: int = 0) -> bool:
        """Whether ``map(fn, units, workers=workers)`` runs in this process: distributor inline, or
        auto with one worker or one unit (a process would only cost its start)."""
        one = (workers or self.workers) == 1 or (isinstance(units, Sized) and len(units) <= 1)
        return self.distributor == "inline" or (self.auto and self.distributor == "processes" and one)

    def _backend(self, fn, units, setup, workers: int, ray_options, on_progress):
        size = workers or self.workers
        if self.runs_inline(units, workers):
            return _Inline(fn, setup, on_progress)
        if self.distributor == "processes":
            pool = self._pool if setup is None and self._pool is not None and self._pool.size == size else None
            if pool is None:
                pool = _Processes(size, setup, self.show)
                if setup is None:
                    if self._pool is not None:
                        self._pool.close(abort=False)
                    self._pool = pool
            pool.use(fn, on_progress)
            return pool
        return _Ray(size, fn, setup, on_progress, self.show, ray_options, self.execution.max_retries)

    def _map(self, fn, units, setup, ordered, keep_going, workers, ray_options, desc) -> Iterator[Any]:
        total = self.total
        if total is None and not self.item and isinstance(units, Sized):
            total = len(units) + len(self._skipped)  # units found done count as done
        progress = self._progress = Progress(desc or self.desc, self.unit, self.item, total, self.show, self.postfix)
        for counts in self._skipped:
            progress.add(counts)
        self._skipped = []
        backend = self._backend(fn, units, setup, workers, ray_options, progress.running)
        limit = 1 if isinstance(backend, _Inline) else self.execution.max_in_flight or 2 * backend.size
        retries = self.execution.max_retries
        source, exhausted = iter(units), False
        pending: dict[int, list] = {}  # index -> [unit, tries]: taken, not finished
        waiting: deque[int] = deque()  # taken, not submitted (retries go first)
        finished: dict[int, Any] = {}  # finished, not yet yielded (in ordered mode)
        taken = yielded = 0
        clean = False
        try:
            while True:
                while not exhausted and len(pending) + len(finished) < limit:
                    try:
                        pending[taken] = [next(source), 0]
                    except StopIteration:
                        exhausted = True
                        break
                    waiting.append(taken)
                    taken += 1
                while waiting and backend.free():
                    index = waiting.popleft()
                    pending[index][1] += 1
                    backend.submit(index, pending[index][0])
                if exhausted and not pending and not finished:
                    break
                for index, outcome, counts in backend.wait(POLL_S) if pending else []:
                    unit, tries = pending[index]
                    if not isinstance(backend, _Inline):  # inline units counted theirs here already
                        _count_storage_retries(getattr(outcome, "storage_counts", None)
                                               if isinstance(outcome, BaseException) else counts)
                    if isinstance(outcome, BaseException):
                        final = (getattr(backend, "retries_itself", False)
                                 or isinstance(outcome, (SetupFailed, ConfigError, DataError, *_disk_full())))
                        if tries <= retries and not final:
                            log.warning("%s: unit #%d failed (%s: %s); try %d of %d", desc or self.desc, index,
                                        type(outcome).__name__, outcome, tries + 1, retries + 1)
                            waiting.appendleft(index)
                            continue
                        if not keep_going or isinstance(outcome, SetupFailed):
                            raise outcome
                        outcome, counts = Failed(unit, outcome, tries), {}
                    del pending[index]
                    progress.finished(index, counts)
                    finished[index] = outcome
                while finished and (not ordered or yielded in finished):
                    yield finished.pop(yielded if ordered else next(iter(finished)))
                    yielded += 1
            clean = True
        finally:
            self.totals = progress.totals
            self._progress = None
            progress.close()
            if backend is self._pool and clean:
                pass  # kept for the next map; closed with the executor
            else:
                if backend is self._pool:
                    self._pool = None
                backend.close(abort=not clean)
