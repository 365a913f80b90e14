"""core.executor on its real backends: inline, spawned processes, a local Ray instance (2 CPUs).

Units are module-level functions (they travel to processes and Ray workers by reference).
A unit that must fail once leaves a file behind in ``tmp`` on its first try, so its retry
sees it: the same rule whatever process the retry lands in.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from core.config import ConfigError, from_dict
from core.executor import Execution, Executor, Failed, Progress, SetupFailed, report

BACKENDS = ["inline", "processes", "ray"]
# Ray workers import this module's functions by name, as spawned processes do: a local Ray
# instance passes this environment on to them.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.05 * (x % 3))  # finish out of order
    return x * x


def fail_once(tmp: str, how: str, x: int) -> int:
    """The first try of unit 2 raises, or kills its own process outright."""
    marker = Path(tmp) / f"tried-{x}"
    if x == 2 and not marker.exists():
        marker.write_text("")
        if how == "raise":
            raise ValueError("unit 2 fails on its first try")
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def always_fails(x: int) -> int:
    if x == 1:
        raise ValueError("unit 1 always fails")
    return x


def counting(x: int) -> int:
    for i in range(1, 4):
        report(i, successes=i - 1)
    return x


def sleeper(tmp: str, x: int) -> int:
    (Path(tmp) / f"started-{x}").write_text("")
    time.sleep(30)
    return x


def make_state(tmp: str) -> str:
    """A costly set-up: done once per worker (the file names the worker that did it)."""
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    (Path(tmp) / f"setup-{token}").write_text("")
    return token


def with_state(state: str, x: int) -> tuple[str, int]:
    time.sleep(0.02)
    return state, x * x


def broken_setup() -> None:
    raise OSError("no such checkpoint")


class CountedPickles:
    """A unit function that leaves a file in ``tmp`` each time it is pickled (in the driver)."""

    def __init__(self, tmp: str):
        self.tmp = tmp

    def __getstate__(self) -> dict:
        Path(self.tmp, f"pickled-{time.monotonic_ns()}").write_text("")
        return self.__dict__

    def __call__(self, x: int) -> int:
        return x * x


def execution(distributor: str, **kw) -> Execution:
    return Execution(distributor=distributor, workers=2, progress=False, **kw)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs) for the module; the executor reuses it and leaves it up."""
    import ray

    from core.executor import init_ray

    yield lambda: init_ray(None, 2)
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(params=BACKENDS)
def distributor(request, ray_session):
    if request.param == "ray":
        ray_session()
    return request.param


def child_pids() -> set[int]:
    """Live (not zombie) processes whose parent is this one, from /proc; multiprocessing's
    resource tracker (one per interpreter, for its lifetime) aside."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                tracker = b"resource_tracker" in (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z" and not tracker:
                found.add(int(entry.name))
    return found


# -- results, order, retries ----------------------------------------------------------------


def test_results_as_completed_and_in_order(distributor):
    with Executor(execution(distributor)) as ex:
        assert sorted(ex.map(slow_square, range(10))) == [x * x for x in range(10)]
        assert list(ex.map(slow_square, range(10), ordered=True)) == [x * x for x in range(10)]
        assert list(ex.map(square, [])) == []


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failed_or_killed_unit_is_retried(distributor, how, tmp_path):
    if distributor == "inline" and how == "kill":
        pytest.skip("inline, the process killed is the test's own")
    with Executor(execution(distributor, max_retries=1)) as ex:
        results = list(ex.map(functools.partial(fail_once, str(tmp_path), how), range(5), ordered=True))
    assert results == [x * x for x in range(5)]
    assert (tmp_path / "tried-2").exists()


def test_a_unit_failing_every_try_ends_the_run_or_is_yielded(distributor):
    with Executor(execution(distributor, max_retries=1)) as ex:
        with pytest.raises(ValueError, match="always fails"):
            list(ex.map(always_fails, range(4)))
        results = list(ex.map(always_fails, range(4), ordered=True, keep_going=True))
    assert [r for r in results if not isinstance(r, Failed)] == [0, 2, 3]
    (failed,) = [r for r in results if isinstance(r, Failed)]
    assert failed.unit == 1 and "always fails" in str(failed.error)
    assert failed.tries == (1 if distributor == "ray" else 2)  # Ray retries its tasks itself


def test_in_flight_units_are_bounded_with_a_lazy_iterator(distributor):
    taken, done, most = [0], [0], [0]

    def units():
        for x in range(12):
            taken[0] += 1
            most[0] = max(most[0], taken[0] - done[0])
            yield x

    with Executor(execution(distributor, max_in_flight=3)) as ex:
        for _ in ex.map(slow_square, units()):
            done[0] += 1
    assert done[0] == 12 and most[0] <= (1 if distributor == "inline" else 3)


def test_the_unit_function_travels_once_per_process(tmp_path):
    with Executor(execution("processes")) as ex:
        assert sorted(ex.map(CountedPickles(str(tmp_path)), range(10))) == [x * x for x in range(10)]
    assert len(list(tmp_path.glob("pickled-*"))) == 2  # two processes, ten units


def worker_pid(x: int) -> int:
    time.sleep(0.05)
    return os.getpid()


def test_processes_are_started_once_for_every_map_of_an_executor():
    """A stage of several passes (the filter's) pays the processes' start once, each map its own function."""
    with Executor(execution("processes")) as ex:
        first = set(ex.map(worker_pid, range(8)))
        assert sorted(ex.map(square, range(6))) == [x * x for x in range(6)]
        second = set(ex.map(worker_pid, range(8)))
    assert first == second and len(first) == 2 and os.getpid() not in first
    assert not (first & child_pids())  # closed with the executor


# -- set-up once per worker ---------------------------------------------------------------------


def test_setup_runs_once_per_worker(distributor, tmp_path):
    with Executor(execution(distributor)) as ex:
        results = list(ex.map(with_state, range(12), setup=functools.partial(make_state, str(tmp_path)),
                              ordered=True, ray_options={"num_cpus": 1}))
    assert [x for _, x in results] == [x * x for x in range(12)]
    states = {state for state, _ in results}
    setups = {p.name.removeprefix("setup-") for p in tmp_path.glob("setup-*")}
    assert states <= setups and len(setups) <= (1 if distributor == "inline" else 2)


def test_a_failing_setup_is_not_retried(distributor):
    with Executor(execution(distributor, max_retries=3)) as ex:
        with pytest.raises(SetupFailed, match="no such checkpoint"):
            list(ex.map(with_state, range(3), setup=broken_setup))


def test_a_killed_actor_is_replaced_and_its_unit_retried(ray_session, tmp_path):
    ray_session()
    with Executor(execution("ray", max_retries=1)) as ex:
        results = list(ex.map(functools.partial(fail_once_with_state, str(tmp_path)), range(4),
                              setup=functools.partial(make_state, str(tmp_path)), ordered=True))
    assert results == [x * x for x in range(4)]
    assert len(list(tmp_path.glob("setup-*"))) >= 2  # the dead actor's successor set up again


def fail_once_with_state(tmp: str, state: str, x: int) -> int:
    return fail_once(tmp, "kill", x)


# -- progress --------------------------------------------------------------------------------


def test_units_report_items_to_one_bar(distributor, capfd):
    ex = Executor(Execution(distributor=distributor, workers=2, progress=True), desc="demo", unit="shard",
                  item="row", postfix=lambda t: {"ok": t.get("successes", 0)})
    with ex:
        ex.skipped(5, successes=5)  # a unit committed earlier: counted, not run
        assert sorted(ex.map(counting, range(4))) == [0, 1, 2, 3]
    assert ex.totals == {"items": 5 + 4 * 3, "successes": 5 + 4 * 2}
    err = capfd.readouterr().err
    assert "demo" in err and "row/s" in err and "shards=5" in err and "ok=13" in err


def test_a_bar_of_units_counts_the_units_found_done(capfd):
    with Executor(Execution(distributor="inline", progress=True), desc="files", unit="file") as ex:
        ex.skipped()
        ex.skipped()
        assert sorted(ex.map(square, range(3))) == [0, 1, 4]
    assert "5/5" in capfd.readouterr().err  # not 5/3


def test_progress_counts_are_absolute_per_unit():
    progress = Progress("x", enabled=False)
    progress.running(7, {"items": 3, "successes": 2})
    progress.running(7, {"items": 5, "successes": 4})  # a later report replaces the earlier one
    assert progress.totals == {"items": 5, "successes": 4}
    progress.finished(7, {"items": 10, "successes": 9})
    progress.running(7, {"items": 6, "successes": 5})  # a late report after the end changes nothing
    progress.finished(7, {"items": 10, "successes": 9})  # nor does a repeated end
    assert progress.totals == {"items": 10, "successes": 9} and progress.units_done == 1


# -- Ctrl-C ------------------------------------------------------------------------------------


def _interrupt_once_running(tmp: Path) -> threading.Thread:
    """Ctrl-C (SIGINT to this process) once a unit has started."""
    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not list(tmp.glob("started-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_ctrl_c_leaves_no_process_and_no_ray(backend, tmp_path):
    import ray

    if backend == "ray" and ray.is_initialized():
        ray.shutdown()  # this test's executor must start Ray itself
    before = child_pids()
    interrupter = _interrupt_once_running(tmp_path)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Executor(execution(backend)) as ex:
            list(ex.map(functools.partial(sleeper, str(tmp_path)), range(4)))
    interrupter.join()
    assert time.monotonic() - started < 25
    assert backend != "ray" or not ray.is_initialized()
    deadline = time.monotonic() + 10
    while child_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not child_pids() - before


def test_ctrl_c_in_the_callers_loop_stops_the_workers():
    before = child_pids()
    with pytest.raises(KeyboardInterrupt):
        with Executor(execution("processes")) as ex:
            for _ in ex.map(square, range(100)):
                raise KeyboardInterrupt
    assert not child_pids() - before


# -- the options -----------------------------------------------------------------------------


def test_execution_options_are_checked():
    assert Execution().distributor == "auto" and Execution(ray_address="").ray_address is None
    with pytest.raises(ConfigError, match="choose one of auto, ray, processes, inline"):
        from_dict(Execution, {"distributor": "spark"})
    with pytest.raises(ConfigError, match="max_retries=-1"):
        from_dict(Execution, {"max_retries": -1})


def test_auto_is_processes_here_inline_for_one_worker_and_ray_given_an_address(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert Executor(Execution(workers=2)).distributor == "processes"
    assert Executor(Execution(distributor="multiprocessing")).distributor == "processes"
    with Executor(Execution(workers=1)) as ex:
        assert ex.distributor == "inline"
    with Executor(Execution(workers=2)) as ex:  # one worker or one unit in a map: no process either
        assert ex.runs_inline([1, 2], workers=1) and ex.runs_inline([1]) and not ex.runs_inline([1, 2])
        assert not Executor(Execution(distributor="processes", workers=2)).runs_inline([1], workers=1)
    assert Executor(Execution(ray_address="ray://somewhere:10001")).distributor == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert Executor(Execution()).distributor == "ray"
