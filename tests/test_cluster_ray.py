"""Ingest on a real 2-node Ray cluster on this machine, and the loss of a node mid-run.

The cluster is a head and a worker started as separate ``ray start`` processes on
loopback (``infra/ray/local_cluster.py``), with token auth; ``python -m ingest`` joins
it through ``RAY_ADDRESS`` as a user's driver would, and reads its URL list from, and
writes its pool to, the S3-compatible server: nodes of a real cluster share no disk.

Every URL is slow (``?delay=``), so a shard takes about a second and the worker node is
always mid-shard. The test kills the worker node's whole process tree (raylet, agents,
task workers: a lost machine) once one shard is committed and a task on that node holds a
connection to the web server, i.e. is fetching. Ray then reruns that shard on the head.
The web server's access log proves the kill landed mid-shard (the killed shard's rows
were asked for twice, no other row was), and the pool proves nothing was lost or doubled:
every input row in exactly one parquet row, every tar whole and holding exactly the
parquet's successes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _ingest_web import HostileWeb

from core import storage
from core.layout import STATS_SUFFIX
from infra.ray.local_cluster import LocalClusterConfig, LocalRayCluster

ROWS, PER_SHARD, DELAY_S, FAILED_ROW = 60, 10, 0.25, 13
SHARDS = ROWS // PER_SHARD
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def connected_pids(port: int) -> set[int]:
    """Processes holding an ESTABLISHED TCP connection to ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def committed(folder: str) -> int:
    try:
        return sum(p.endswith(STATS_SUFFIX) for p in storage.list_files(folder))
    except FileNotFoundError:
        return 0


def read_bytes(path: str) -> bytes:
    with storage.open_file(path) as handle:
        return handle.read()


@pytest.fixture
def web():
    with HostileWeb() as server:
        yield server


@pytest.fixture
def cluster(s3_env):  # s3_env first: the nodes, hence their tasks, inherit its credentials
    with LocalRayCluster(LocalClusterConfig(head_cpus=1, worker_cpus=(1,))) as running:
        yield running


def test_ingest_survives_losing_a_worker_node(cluster, web, tmp_path):
    base = "s3://webclip/cluster-ray"
    urls = [f"{web.base}/img/r{i}.jpg?delay={DELAY_S}" for i in range(ROWS)]
    urls[FAILED_ROW] = f"{web.base}/status/404"  # a failure row: "each row once" covers failures too
    with storage.open_file(f"{base}/urls.parquet", "wb") as handle:
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(ROWS)]}), handle)
    pool = f"{base}/pool"
    args = ["--url_list", f"{base}/urls.parquet", "--input_format", "parquet", "--caption_col", "caption",
            "--output_folder", pool, "--number_sample_per_shard", str(PER_SHARD), "--distributor", "ray",
            "--thread_count", "2", "--timeout", "30", "--allow_networks", "127.0.0.1/32", "--image_size", "32",
            "--progress", "true"]  # fmt: skip  (progress: the tasks report through an actor that must survive)
    env = {**os.environ, **cluster.driver_env, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "ingest", *args], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    worker = cluster.workers[0]
    killed: list[int] = []

    def kill_the_worker_node_mid_shard() -> None:
        deadline = time.monotonic() + 120
        fetching_before: set[int] = set()
        while time.monotonic() < deadline and driver.poll() is None:
            fetching = set(worker.task_pids("_ray_task")) & connected_pids(web.port)
            # Connected on two polls in a row: its first request has surely reached the server's log.
            if fetching & fetching_before and committed(pool) >= 1:
                killed.extend(cluster.kill_node(worker))
                return
            fetching_before = fetching
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_node_mid_shard, daemon=True)
    killer.start()
    try:
        out, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    killer.join(5)
    log = out.decode(errors="replace")
    assert killed, f"the worker node never ran a shard while another was committed:\n{log[-3000:]}"
    assert driver.returncode == 0, log[-5000:]
    assert not worker.alive and cluster.head.alive

    # Every shard committed; every input row in exactly one parquet row, in order, once.
    names = {p.rsplit("/", 1)[-1] for p in storage.list_files(pool)}
    assert {f"{s:05d}{STATS_SUFFIX}" for s in range(SHARDS)} <= names
    rows = []
    for shard in range(SHARDS):
        table = pq.read_table(io.BytesIO(read_bytes(f"{pool}/{shard:05d}.parquet"))).to_pylist()
        stats = json.loads(read_bytes(f"{pool}/{shard:05d}{STATS_SUFFIX}"))
        assert stats["count"] == len(table) == PER_SHARD
        successes = {r["key"] for r in table if r["status"] == "success"}
        assert stats["successes"] == len(successes)
        # The tar is whole (every member read to its end) and holds exactly the successes.
        with tarfile.open(fileobj=io.BytesIO(read_bytes(f"{pool}/{shard:05d}.tar"))) as tar:
            members = {}
            for member in tar:
                members.setdefault(member.name.rsplit(".", 1)[0], set()).add(member.name.rsplit(".", 1)[1])
                assert tar.extractfile(member).read()
        assert members == {key: {"jpg", "txt", "json"} for key in successes}
        rows += table
    assert [r["url"] for r in rows] == urls
    assert len({r["key"] for r in rows}) == ROWS
    assert [i for i, r in enumerate(rows) if r["status"] != "success"] == [FAILED_ROW]

    # The kill landed mid-shard: that shard's fetched rows were asked for twice, no other row was.
    asked = {i: sum(f"/r{i}.jpg" in p for p in web.paths()) for i in range(ROWS) if i != FAILED_ROW}
    twice = {i for i, n in asked.items() if n == 2}
    assert twice and len({i // PER_SHARD for i in twice}) == 1, asked
    assert all(n == 1 for i, n in asked.items() if i not in twice), asked
    assert "ok=" in log  # the progress bar ran through the shard tasks' reports


def _job_server_installed() -> bool:
    """The dashboard (the job server) needs ray[default] (`pip install -e '.[cluster]'`)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _job_server_installed(), reason="needs ray[default] for the job server: "
                    "pip install -e '.[cluster]'")  # fmt: skip
def test_ingest_submitted_as_a_job_to_the_job_server(s3_env, web):
    """``python -m infra.ray.submit`` (what ``make ingest CLUSTER=...`` runs) against a real job server."""
    config = LocalClusterConfig(head_cpus=1, worker_cpus=(1,), dashboard=True)
    base = "s3://webclip/cluster-job"
    urls = [f"{web.base}/img/j{i}.jpg" for i in range(20)]
    with storage.open_file(f"{base}/urls.parquet", "wb") as handle:
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(20)]}), handle)
    with LocalRayCluster(config) as cluster:
        env = {**os.environ, **cluster.auth_env, "PYTHONPATH": str(REPO)}  # the token: as for any submitter
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run(
            [sys.executable, "-m", "infra.ray.submit", "--address", cluster.dashboard_url, "--no-pip",
             "--submission-id", f"ingest-{os.getpid()}", "--",
             "python", "-m", "ingest", "--url_list", f"{base}/urls.parquet", "--input_format", "parquet",
             "--caption_col", "caption", "--output_folder", f"{base}/pool", "--number_sample_per_shard", "10",
             "--allow_networks", "127.0.0.1/32", "--image_size", "32"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "20 rows in 2 shards" in done.stdout  # the driver's summary, streamed back from the head node
    rows = [r for s in range(2) for r in pq.read_table(io.BytesIO(read_bytes(f"{base}/pool/{s:05d}.parquet")))
            .to_pylist()]
    assert [r["url"] for r in rows] == urls and all(r["status"] == "success" for r in rows)
