"""Faults at scale (issue 21): concurrent runs on one output folder, SIGTERM. Real subprocesses, real
signals, a real S3 server (moto) and a real web server on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _commands import run
from _ingest_web import HostileWeb
from core import storage
from core.lock import LOCK_NAME, OutputLock, OutputLocked

REPO = Path(__file__).resolve().parents[1]
ROWS = 8
PLAN_ROOM = 48 << 10  # the plan's spill for ROWS rows: a chunk, a run and a partition file, each behind a bucket index

pytestmark = pytest.mark.integration

HOLD = """
import sys, time
from core.lock import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as server:
        yield server


@pytest.fixture(scope="module")
def url_list(web, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lists") / "urls.parquet"
    urls = [f"{web.base}/img/f{i}.jpg" for i in range(ROWS)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a small photo of thing number {i}" for i in range(ROWS)]}),
                   path)
    return path


def ingest_args(url_list: Path, output: str, *extra: str) -> list[str]:
    return ["--url_list", str(url_list), "--input_format", "parquet", "--caption_col", "caption",
            "--output_folder", output, "--number_sample_per_shard", "4", "--image_size", "64",
            "--progress", "false", "--workers", "1", "--allow_networks", "127.0.0.1/32", *extra]


def _holder(folder: str) -> subprocess.Popen:
    """Another live run holding ``folder``'s lock (a real process)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def _listing(folder: str) -> dict[str, str]:
    fs, p = storage.filesystem(folder)
    fs.invalidate_cache()
    return {f.rsplit("/", 1)[-1]: fs.cat_file(f).hex()[:64] for f in sorted(fs.find(p)) if not f.endswith(".json")}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(where, url_list, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_env")
        output = f"s3://webclip/faults/lock-{os.getpid()}-{time.time_ns()}"
    else:
        output = str(tmp_path / "pool")
    holder = _holder(output)
    try:
        done = run("ingest", *ingest_args(url_list, output))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(lines) == 1, done.stderr
        assert f"pid {holder.pid}" in lines[0] and f"host {socket.gethostname()}" in lines[0], lines
        assert "started 20" in lines[0] and "being written by another run" in lines[0], lines
        assert not [f for f in storage.list_files(output) if not f.endswith(LOCK_NAME)]  # nothing written
    finally:
        holder.kill()  # kill -9: its lock stays behind, naming a pid that is gone
        holder.wait()
    assert storage.exists(storage.join(output, LOCK_NAME))
    done = run("ingest", *ingest_args(url_list, output))
    assert done.returncode == 0, done.stderr
    assert "taking over the lock of a run that is gone" in done.stderr and str(holder.pid) in done.stderr
    assert not storage.exists(storage.join(output, LOCK_NAME))  # given back at the end
    assert len(storage.list_files(output, "_stats.json")) == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lock_whose_heartbeat_stopped_is_stale_a_beating_one_is_not(where, tmp_path, request, monkeypatch):
    if where == "s3":
        request.getfixturevalue("s3_env")
        folder = f"s3://webclip/faults/beat-{os.getpid()}-{time.time_ns()}"
    else:
        folder = str(tmp_path / "out")
    monkeypatch.setenv("WEBCLIP_LOCK_STALE_S", "2")
    monkeypatch.setenv("WEBCLIP_LOCK_HEARTBEAT_S", "0.3")
    other_host = {"host": "node-elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00",
                  "heartbeat": "2026-01-01T00:00:00+00:00", "heartbeat_unix": time.time(), "token": "x"}
    storage.write_json(storage.join(folder, LOCK_NAME), other_host)  # a run on another host, beating just now
    with pytest.raises(OutputLocked, match="host node-elsewhere, pid 1, started 2026-01-01"):
        OutputLock(folder).acquire()
    storage.write_json(storage.join(folder, LOCK_NAME), {**other_host, "heartbeat_unix": time.time() - 10})
    mine = OutputLock(folder)
    mine.acquire()  # its heartbeat stopped 10 s ago (> 2 s): taken over
    try:
        first = storage.read_json(storage.join(folder, LOCK_NAME))["heartbeat_unix"]
        time.sleep(1.0)
        assert storage.read_json(storage.join(folder, LOCK_NAME))["heartbeat_unix"] > first  # ours beats
        with pytest.raises(OutputLocked):
            OutputLock(folder).acquire()  # same host, live pid, fresh heartbeat
    finally:
        mine.release()
    assert not storage.exists(storage.join(folder, LOCK_NAME))


def _urls_with_a_hang(web, folder, tag: str, rows: int) -> Path:
    """A URL list of ``rows`` images and, last, one whose first request hangs (``web.hanging`` says when)."""
    urls = [f"{web.base}/img/{tag}{i}.jpg" for i in range(rows)] + [f"{web.base}/hang_once/{tag}-hang.jpg"]
    path = folder / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo of slow thing {tag}{i}" for i in range(rows + 1)]}),
                   path)  # fmt: skip
    web.arm_hang()
    return path


def test_sigterm_ends_a_stage_like_ctrl_c_and_a_rerun_completes(web, tmp_path):
    output = str(tmp_path / "pool")
    args = ingest_args(_urls_with_a_hang(web, tmp_path, "t", 8), output, "--timeout", "60")
    try:  # what Slurm and Kubernetes send: to the main process
        _, err, _ = _interrupt("ingest", args, signal.SIGTERM, False, lambda _: web.hanging.is_set())
    finally:
        web.disarm_hang("t-hang")
    assert "2 pool shards committed" in err, err
    _nothing_half_visible(output)  # the lock given back too
    done = run("ingest", *args)
    assert done.returncode == 0, done.stderr
    assert len(storage.list_files(output, "_stats.json")) == 3


def _objects(folder: str, *others: str) -> dict[str, bytes]:
    """Every object under ``folder`` by name (JSON without its clock readings; ``folder`` and ``others``,
    the run's other folders, named alike)."""
    fs, p = storage.filesystem(folder)
    fs.invalidate_cache()
    out = {}
    for path in sorted(fs.find(p)):
        data = fs.cat_file(path)
        name = path[len(p):]
        if name.endswith((".json", ".md", ".html")):
            for i, name_of in enumerate((folder, *others)):
                data = data.replace(name_of.encode(), f"FOLDER{i}".encode())
            data = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?", b"TIME", data)
        if name.endswith(".json"):
            data = json.dumps(_untimed(json.loads(data)), sort_keys=True).encode()
        out[name] = data
    return out


def _untimed(obj):
    """A JSON document without its clock readings (durations, start and end times)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if not (k in ("duration", "start_time", "end_time", "timings", "modified", "etag", "created", *storage.RETRY_KEYS)
                        or k.endswith(("_s", "seconds")))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


# -- object storage: faults survived and counted, the retry budget --------------------------------

FAULTY = {"WEBCLIP_S3_TIMEOUT_S": "1"}
# written after a stage has taken its count (or the lock's own traffic): their faults are survived, not counted
AFTER_THE_COUNT = ("_lock.json", "?delete", "_ingest_summary.json", "_filter_stats.json", "manifest.json",
                   "report.json", "index.html", "datasheet.md")
SECONDS: dict[str, float] = {}  # fault-free runs of the fixtures, for the time cost of the faults


@pytest.fixture(scope="module")
def s3_pool(url_list, s3_env) -> str:
    """A pool on s3:// ingested without faults (two worker processes, as the faulty runs)."""
    pool = f"s3://webclip/faults/pool-{time.time_ns()}"
    start = time.monotonic()
    done = run("ingest", *ingest_args(url_list, pool, "--workers", "2"))
    SECONDS["ingest"] = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    return pool


@pytest.fixture(scope="module")
def s3_decisions(s3_pool) -> str:
    decisions = f"{s3_pool}-decisions-clean"
    start = time.monotonic()
    done = run("filter", "--pool", s3_pool, "--output_folder", decisions, "--min_image_size", "8", "--progress", "false")
    SECONDS["filter"] = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    return decisions


def _through(s3_env, **kwargs):
    from _faulty_s3 import FaultyProxy

    return FaultyProxy(s3_env["S3_ENDPOINT_URL"], stall_s=1.5, **kwargs)


def _printed_retries(done: subprocess.CompletedProcess) -> int:
    """The object-storage retries a command's last line counts (0 when it names none)."""
    found = re.findall(r"; (\d+) object-storage requests? retried", done.stdout + done.stderr)
    assert len(found) <= 1, done.stdout  # said once
    return int(found[0]) if found else 0


def _assert_counted(counted: int, injected: list[tuple[str, str, str]]) -> None:
    """Every injected fault that needed a retry of a request is counted (a reset after a complete answer needs
    none; s3fs re-reads a body cut mid-read itself, uncounted), and nothing is counted that was not injected."""
    needed = [f for f in injected if f[0] != "reset" and not any(name in f[2] for name in AFTER_THE_COUNT)]
    assert len(needed) <= counted <= len(injected), (counted, injected)


def test_ingest_through_object_storage_faults_gives_identical_outputs_and_counts_the_retries(url_list, s3_env,
                                                                                              s3_pool):  # fmt: skip
    proxy = _through(s3_env, rate=0.05, seed=6)
    with proxy.serve() as endpoint:
        faulty = f"s3://webclip/faults/faulty-{time.time_ns()}"
        env = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, **FAULTY}
        start = time.monotonic()
        done = run("ingest", *ingest_args(url_list, faulty, "--workers", "2"), env=env)
        took = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    print(f"faults injected: {dict(proxy.counts)} of {proxy.requests} requests; {took:.1f} s ({SECONDS['ingest']:.1f} s "
          f"without faults); retries counted {_printed_retries(done)}", proxy.injected)
    assert any(f[0] != "reset" and "0000" in f[2] for f in proxy.injected)  # shard objects, in the workers
    a, b = _objects(s3_pool), _objects(faulty)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    summary = storage.read_json(storage.join(faulty, "_ingest_summary.json"))
    _assert_counted(summary["storage_retries"], proxy.injected)
    assert _printed_retries(done) == summary["storage_retries"]
    in_shards = sum(storage.read_json(p)["storage_retries"] for p in storage.list_files(faulty, "_stats.json"))
    assert in_shards == sum(1 for f in proxy.injected if f[0] != "reset" and re.search(r"/\d{5}\.(tar|parquet)$", f[2]))


def test_filter_shards_and_verify_through_object_storage_faults_give_identical_outputs(s3_env, s3_pool,
                                                                                        s3_decisions):  # fmt: skip
    def pipeline(tag: str, env: dict | None = None, proxy=None) -> tuple[str, str]:
        decisions, train = f"{s3_pool}-decisions-{tag}", f"{s3_pool}-train-{tag}"
        steps = [("shards", "--pool", s3_pool, "--decisions", decisions, "--output_folder", train,
                  "--samples_per_shard", "3"), ("shards.verify", "--folder", train)]  # fmt: skip
        if proxy is None:
            decisions = s3_decisions
            steps[0] = ("shards", "--pool", s3_pool, "--decisions", decisions, *steps[0][5:])
        else:
            steps.insert(0, ("filter", "--pool", s3_pool, "--output_folder", decisions, "--min_image_size", "8"))
        for module, *args in steps:
            before = len(proxy.injected) if proxy else 0
            done = run(module, *args, "--progress", "false", env=env)
            assert done.returncode == 0, (module, done.stderr[-3000:])
            if proxy is not None:
                _assert_counted(_printed_retries(done), proxy.injected[before:])
                counted[module] = (len(proxy.injected) - before, _printed_retries(done))
        return decisions, train

    counted: dict[str, tuple[int, int]] = {}  # command -> (faults injected, retries it counted)

    start = time.monotonic()
    clean = pipeline("clean")
    clean_s = time.monotonic() - start
    proxy = _through(s3_env, rate=0.05, seed=4)
    with proxy.serve() as endpoint:
        start = time.monotonic()
        faulty = pipeline("faulty", {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, **FAULTY}, proxy)
        took = time.monotonic() - start
    print(f"faults injected: {dict(proxy.counts)} of {proxy.requests} requests; {took:.1f} s ({clean_s:.1f} s "
          f"+ {SECONDS['filter']:.1f} s for the filter without faults); (injected, counted) per command: {counted}",
          proxy.injected)
    assert sum(proxy.counts.values()) >= 1
    for a, b in zip(clean, faulty):
        objects_a, objects_b = _objects(a, *clean), _objects(b, *faulty)
        assert objects_a.keys() == objects_b.keys()
        for name in objects_a:
            assert objects_a[name] == objects_b[name], name
    assert storage.read_json(storage.join(faulty[0], "_filter_stats.json"))["storage_retries"] >= 0
    assert "storage_retries" in storage.read_json(storage.join(faulty[1], "manifest.json"))


def _gave_up(done: subprocess.CompletedProcess, prog: str, obj: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"python -m {prog}: error")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"gave up on {obj} " in errors[0] and "rerun the same command" in errors[0], errors


def test_past_the_retry_budget_ingest_names_the_object_from_its_worker_and_a_rerun_completes(url_list, s3_env,
                                                                                              s3_pool):  # fmt: skip
    output = f"s3://webclip/faults/budget-{time.time_ns()}"
    proxy = _through(s3_env, rate=1.0, seed=1, faults=("slowdown",), only=output.removeprefix("s3:/") + "/00001.tar")
    with proxy.serve() as endpoint:
        env = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, **FAULTY, "WEBCLIP_S3_RETRIES": "2"}
        args = ingest_args(url_list, output, "--workers", "2", "--max_retries", "0")
        _gave_up(run("ingest", *args, env=env), "ingest", f"{output}/00001.tar")
        assert proxy.counts["slowdown"] >= 2
        assert not storage.exists(storage.join(output, "00001_stats.json"))
        proxy.armed = False  # the store recovers
        done = run("ingest", *args, env=env)
    assert done.returncode == 0, done.stderr
    a, b = _objects(s3_pool), _objects(output)
    assert a.keys() == b.keys()
    for name in a:
        assert name == "/_ingest_summary.json" or a[name] == b[name], name


def test_past_the_retry_budget_shards_names_the_pool_object_and_a_rerun_completes(s3_env, s3_pool, s3_decisions):
    train = f"{s3_pool}-train-budget-{time.time_ns()}"
    tar = f"{s3_pool}/00000.tar"
    proxy = _through(s3_env, rate=1.0, seed=1, faults=("slowdown",), only=tar.removeprefix("s3:/"))
    with proxy.serve() as endpoint:
        env = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, **FAULTY, "WEBCLIP_S3_RETRIES": "2"}
        args = ["--pool", s3_pool, "--decisions", s3_decisions, "--output_folder", train, "--samples_per_shard", "3",
                "--max_shards_per_task", "1", "--workers", "2", "--max_retries", "0", "--report", "false",
                "--progress", "false"]  # fmt: skip
        _gave_up(run("shards", *args, env=env), "shards", tar)
        proxy.armed = False
        done = run("shards", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert storage.read_json(storage.join(train, "manifest.json"))["total_samples"] >= 1


# -- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_during_ingest_names_the_shard_and_the_space_and_a_rerun_completes(url_list, tmp_path):
    from _commands import small_filesystem

    reference = str(tmp_path / "reference")
    assert run("ingest", *ingest_args(url_list, reference)).returncode == 0
    disk = tmp_path / "disk"
    with small_filesystem(disk, 1 << 20) as mounted:
        output = str(disk / "pool")
        args = ingest_args(url_list, output, "--workers", "2")
        limit = None
        if mounted:  # fill it up, leaving room for the lock, the pre-download plan (``ingest.dedupe``) and a little more
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(disk / "filler", "wb") as handle:
                handle.write(b"\0" * (free - PLAN_ROOM - 16384))
        else:
            limit = 4096

        def small():
            if limit is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("WEBCLIP_DEBUG", None)
        done = subprocess.run([sys.executable, "-m", "ingest", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120, preexec_fn=small)  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("python -m ingest: error")]
        assert len(errors) == 1, done.stderr[-3000:]
        assert re.search(rf"{re.escape(output)}/0000[01]: (no space left on the device|the file-size limit) "
                         r"\(needs more than the [\d,]+ bytes written before it failed; [\d,]+ bytes free in ",
                         errors[0]), errors  # fmt: skip
        left = os.listdir(output) if os.path.exists(output) else []  # a run that wrote nothing leaves no folder
        assert not [n for n in left if n.startswith(".")], left  # no staging folder, no temporary file
        committed = {n[:5] for n in left if n.endswith("_stats.json")}
        assert {n[:5] for n in left} == committed, left  # nothing of an uncommitted shard is visible
        if mounted:
            os.remove(disk / "filler")  # space freed
        done = run("ingest", *args)
        assert done.returncode == 0, done.stderr
        a, b = _objects(reference), _objects(output)
    print(f"\nfull disk: {'tmpfs' if mounted else 'RLIMIT_FSIZE'}: {errors[0]}")
    assert a.keys() == b.keys()
    for name in a:
        assert name == "/_ingest_summary.json" or a[name] == b[name], name


# -- interruption: Ctrl-C and SIGTERM during filter, shards and a run on Ray -------------------------


@pytest.fixture(scope="module")
def local_pool(url_list, tmp_path_factory) -> str:
    pool = str(tmp_path_factory.mktemp("interrupted") / "pool")
    assert run("ingest", *ingest_args(url_list, pool)).returncode == 0
    return pool


@pytest.fixture(scope="module")
def local_decisions(local_pool) -> str:
    decisions = f"{local_pool}-decisions"
    done = run("filter", "--pool", local_pool, "--output_folder", decisions, "--min_image_size", "8", "--progress",
               "false")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return decisions


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _interrupt(module: str, args: list[str], sig: int, to_group: bool, ready, env: dict | None = None,
               linger_s: float = 2.0):  # fmt: skip
    """Start ``python -m module args``, send ``sig`` once ``ready(process)`` (to its process group, as a
    terminal's Ctrl-C does, or to the process alone, as ``kill`` and Kubernetes do); (process, stderr, seconds).
    Every process of the command must be gone ``linger_s`` after it ended."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ready(process):
            assert process.poll() is None, f"{module} ended before the signal: {process.communicate()}"
            assert time.monotonic() < deadline, f"{module}: never ready for the signal"
            time.sleep(0.05)
        start = time.monotonic()
        (os.killpg if to_group else os.kill)(process.pid, sig)
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err[-3000:]
    assert took < 10, took
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "interrupted" in err and "Resume with: python -m " + module in err, err[-3000:]
    for _ in range(int(linger_s * 10)):  # multiprocessing's resource tracker ends when it sees the command gone
        if not _group(process.pid):
            break
        time.sleep(0.1)
    assert not _group(process.pid), _group(process.pid)  # nothing of it left behind
    return process, err, took


def _group(pgid: int) -> list[str]:
    """Live processes of a process group (a zombie has ended: only its parent, gone, could reap it)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(entry)
    return found


def _working(process) -> bool:
    """The command has started its worker processes: it is in the middle of its units."""
    return bool(_descendants(process.pid))


def _nothing_half_visible(folder: str, staging: bool = False) -> None:
    """No file of an uncommitted shard under its final name; no staging folder either, unless ``staging``
    (a Ray task is killed outright: its hidden staging folder stays, for the next run to remove)."""
    left = os.listdir(folder) if os.path.exists(folder) else []
    assert staging or not [n for n in left if n.startswith(".")], left  # no staging folder, no temporary file
    assert {n[:5] for n in left if n[:5].isdigit()} == {n[:5] for n in left if n.endswith("_stats.json")}, left
    assert LOCK_NAME not in left


def test_ctrl_c_during_filter_ends_it_and_a_rerun_completes(local_pool, local_decisions, tmp_path):
    output = str(tmp_path / "decisions")
    args = ["--pool", local_pool, "--output_folder", output, "--min_image_size", "8", "--progress", "false"]
    _, err, took = _interrupt("filter", args, signal.SIGINT, True, _working)
    print(f"\nfilter: Ctrl-C -> exit 130 in {took:.1f} s")
    _nothing_half_visible(output)
    assert not os.path.exists(os.path.join(output, "_filter_stats.json"))  # decisions not complete: not marked
    done = run("filter", *args)
    assert done.returncode == 0, done.stderr
    a, b = _objects(local_decisions), _objects(output)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_sigterm_during_shards_ends_it_and_a_rerun_completes(local_pool, local_decisions, tmp_path):
    def args(output: str) -> list[str]:
        return ["--pool", local_pool, "--decisions", local_decisions, "--output_folder", output, "--samples_per_shard",
                "2", "--max_shards_per_task", "1", "--workers", "2", "--report", "false", "--progress", "false"]

    reference = str(tmp_path / "reference")
    assert run("shards", *args(reference)).returncode == 0
    output = str(tmp_path / "train")
    _, err, took = _interrupt("shards", args(output), signal.SIGTERM, False, _working)
    print(f"\nshards: SIGTERM -> exit 130 in {took:.1f} s; {err.strip().splitlines()[-1]}")
    _nothing_half_visible(output)
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    done = run("shards", *args(output))
    assert done.returncode == 0, done.stderr
    a, b = _objects(reference), _objects(output)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def _ray_processes(ray_tmp: str) -> list[str]:
    """The command lines of live processes that belong to the Ray instance under ``ray_tmp``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                line = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and ray_tmp in line:
            found.append(f"{entry}: {line[:200]}")
    return found


def test_sigterm_during_a_run_on_ray_leaves_no_process_of_it_and_a_rerun_completes(web, tmp_path):
    output = str(tmp_path / "pool")
    args = ingest_args(_urls_with_a_hang(web, tmp_path, "r", 4), output, "--timeout", "60", "--distributor", "ray")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # this run's Ray lives here: its processes name it
    env = {"RAY_TMPDIR": ray_tmp}

    def no_ray_left() -> None:
        left = _ray_processes(ray_tmp)
        for _ in range(50):  # Ray's last daemons may take a moment to go after the driver has ended
            if not left:
                break
            time.sleep(0.1)
            left = _ray_processes(ray_tmp)
        assert not left, left

    try:  # while Ray starts (its daemons are up, the driver not yet connected), then during a download
        _, _, starting = _interrupt("ingest", args, signal.SIGTERM, False,
                                    lambda _: any("raylet" in p for p in _ray_processes(ray_tmp)), env)  # fmt: skip
        no_ray_left()
        _, err, took = _interrupt("ingest", args, signal.SIGTERM, False, lambda _: web.hanging.is_set(), env)
        web.disarm_hang("r-hang")
        print(f"\ningest on Ray: SIGTERM while Ray starts -> exit 130 in {starting:.1f} s; during a download -> "
              f"{took:.1f} s; {err.strip().splitlines()[-1]}")
        no_ray_left()
        _nothing_half_visible(output, staging=True)
        assert "1 pool shards committed" in err, err[-2000:]
        done = run("ingest", *args, env=env)
        assert done.returncode == 0, done.stderr
        assert len(storage.list_files(output, "_stats.json")) == 2
        _nothing_half_visible(output)
        assert not _ray_processes(ray_tmp)
    finally:
        web.disarm_hang("r-hang")
        shutil.rmtree(ray_tmp, ignore_errors=True)
