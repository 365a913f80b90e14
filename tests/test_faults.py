"""Faults at scale (issue 21): concurrent runs on one output folder, SIGTERM. Real subprocesses, real
signals, a real S3 server (moto) and a real web server on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
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


def test_sigterm_ends_a_stage_like_ctrl_c_and_a_rerun_completes(web, tmp_path):
    urls = [f"{web.base}/img/t{i}.jpg" for i in range(8)] + [f"{web.base}/hang_once/t-hang.jpg"]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo of slow thing {i}" for i in range(9)]}), path)
    web.arm_hang()
    output = str(tmp_path / "pool")
    args = ingest_args(path, output, "--timeout", "60")
    process = subprocess.Popen([sys.executable, "-m", "ingest", *args], cwd=REPO, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert web.hanging.wait(60)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes send: to the main process
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        web.disarm_hang("t-hang")
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, (out, err)
    assert took < 10, took
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err and "2 pool shards committed" in err, err
    assert not os.path.exists(os.path.join(output, LOCK_NAME))  # given back
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing of it left behind
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
                if not (k in ("duration", "start_time", "end_time", "timings", "modified", "etag", "created")
                        or k.endswith(("_s", "seconds")))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def test_ingest_through_object_storage_faults_gives_identical_outputs(url_list, s3_env, tmp_path):
    from _faulty_s3 import FaultyProxy

    clean = f"s3://webclip/faults/clean-{time.time_ns()}"
    done = run("ingest", *ingest_args(url_list, clean))
    assert done.returncode == 0, done.stderr
    proxy = FaultyProxy(s3_env["S3_ENDPOINT_URL"], rate=0.05, seed=21, stall_s=1.5)
    with proxy.serve() as endpoint:
        faulty = f"s3://webclip/faults/faulty-{time.time_ns()}"
        env = {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, "WEBCLIP_S3_TIMEOUT_S": "1"}
        start = time.monotonic()
        done = run("ingest", *ingest_args(url_list, faulty), env=env)
        took = time.monotonic() - start
    print(f"faults injected: {dict(proxy.counts)} of {proxy.requests} requests; {took:.1f} s", proxy.injected)
    assert done.returncode == 0, done.stderr
    assert sum(proxy.counts.values()) >= 1
    a, b = _objects(clean), _objects(faulty)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_filter_shards_and_verify_through_object_storage_faults_give_identical_outputs(url_list, s3_env):
    from _faulty_s3 import FaultyProxy

    pool = f"s3://webclip/faults/pool-{time.time_ns()}"
    assert run("ingest", *ingest_args(url_list, pool)).returncode == 0

    def pipeline(tag: str, env: dict | None = None) -> tuple[str, str]:
        decisions, train = f"{pool}-decisions-{tag}", f"{pool}-train-{tag}"
        for module, *args in (("filter", "--pool", pool, "--output_folder", decisions, "--min_image_size", "8"),
                              ("shards", "--pool", pool, "--decisions", decisions, "--output_folder", train,
                               "--samples_per_shard", "3"),
                              ("shards.verify", "--folder", train)):  # fmt: skip
            done = run(module, *args, "--progress", "false", env=env)
            assert done.returncode == 0, (module, done.stderr[-3000:])
        return decisions, train

    start = time.monotonic()
    clean = pipeline("clean")
    clean_s = time.monotonic() - start
    proxy = FaultyProxy(s3_env["S3_ENDPOINT_URL"], rate=0.05, seed=4, stall_s=1.5)
    with proxy.serve() as endpoint:
        start = time.monotonic()
        faulty = pipeline("faulty", {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint,
                                     "WEBCLIP_S3_TIMEOUT_S": "1"})
        took = time.monotonic() - start
    print(f"faults injected: {dict(proxy.counts)} of {proxy.requests} requests; {took:.1f} s ({clean_s:.1f} s "
          "without faults)")
    assert sum(proxy.counts.values()) >= 1
    for a, b in zip(clean, faulty):
        objects_a, objects_b = _objects(a, *clean), _objects(b, *faulty)
        assert objects_a.keys() == objects_b.keys()
        for name in objects_a:
            assert objects_a[name] == objects_b[name], name
