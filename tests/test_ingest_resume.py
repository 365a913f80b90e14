"""Resume after ``kill -9``, a lost Ray worker, and output read back by webdataset.

The kill must land mid-shard, every time: one URL of shard 3 hangs on its first
request (``/hang_once``), so when the server sees that request, shards 0-2 are
committed and shard 3 is half-staged. The test then SIGKILLs the whole process
group of ``python -m ingest``, checks that no half-written shard is visible, reruns
the same command and compares with an uninterrupted run: the same keys, each input
row exactly once, byte-identical tars that tarfile and webdataset both read.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from _ingest_web import HostileWeb
from core import storage
from core.config import parse_config
from core.layout import STATS_SUFFIX
from ingest.config import IngestConfig
from ingest.run import run_ingest

ROWS, PER_SHARD, HANG_ROW = 60, 10, 34  # the hang is in shard 3
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def write_url_list(path: Path, base: str) -> list[str]:
    urls = [f"{base}/img/r{i}.jpg?delay=0.01" for i in range(ROWS)]
    urls[HANG_ROW] = f"{base}/hang_once/r{HANG_ROW}.jpg"
    urls[7] = f"{base}/status/404"  # a failure row, so "each row once" covers failures too
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(ROWS)]}), path)
    return urls


def ingest_args(url_list: Path, output: str, distributor: str = "inline") -> list[str]:
    return ["--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
            "--output_folder", output, "--number_sample_per_shard", str(PER_SHARD), "--distributor", distributor,
            "--thread_count", "4", "--timeout", "60", "--allow_networks", "127.0.0.1/32", "--image_size", "32",
            "--progress", "False", "--processes_count", "1"]


def run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ingest", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when_hanging(process: subprocess.Popen, web: HostileWeb) -> None:
    assert web.hanging.wait(60), process.stdout.read().decode() if process.poll() is not None else "no hang"
    time.sleep(0.3)  # let the rest of shard 3's rows reach its staging tar
    os.killpg(process.pid, signal.SIGKILL)  # the process group: kill -9 of the job, children included
    process.wait(10)


def finish(args: list[str]) -> str:
    process = run_cli(args)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out.decode()
    return out.decode()


def read_bytes(path: str) -> bytes:
    with storage.open_file(path) as handle:
        return handle.read()


def assert_nothing_half_written(folder: str) -> set[str]:
    """Every object under a final shard name is whole; a marker means its shard is complete."""
    names = {p.rsplit("/", 1)[-1] for p in storage.list_files(folder)}
    for name in names:
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(read_bytes(storage.join(folder, name)))) as tar:
                for member in tar:  # reads every member to its end: a cut tar raises
                    tar.extractfile(member).read()
        if name.endswith(STATS_SUFFIX):
            shard = name.removesuffix(STATS_SUFFIX)
            assert {f"{shard}.tar", f"{shard}.parquet"} <= names
            stats = storage.read_json(storage.join(folder, name))
            assert pq.read_table(io.BytesIO(read_bytes(storage.join(folder, f"{shard}.parquet")))).num_rows \
                == stats["count"] == PER_SHARD
    return {n.removesuffix(STATS_SUFFIX) for n in names if n.endswith(STATS_SUFFIX)}


def assert_same_result(folder: str, reference: str, urls: list[str]) -> None:
    rows = []
    for shard in range(ROWS // PER_SHARD):
        name = f"{shard:05d}"
        assert read_bytes(storage.join(folder, f"{name}.tar")) == read_bytes(storage.join(reference, f"{name}.tar"))
        rows += pq.read_table(io.BytesIO(read_bytes(storage.join(folder, f"{name}.parquet")))).to_pylist()
    assert [r["url"] for r in rows] == urls  # each input row exactly once, in order
    assert len({r["key"] for r in rows}) == ROWS
    assert sum(r["status"] == "success" for r in rows) == ROWS - 1


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as server:
        yield server


@pytest.fixture(scope="module")
def reference(web, tmp_path_factory):
    """An uninterrupted run, on the same server (so URLs, hence tar bytes, are the same)."""
    tmp = tmp_path_factory.mktemp("reference")
    urls = write_url_list(tmp / "urls.parquet", web.base)
    web.disarm_hang(f"r{HANG_ROW}")
    run_ingest(parse_config(IngestConfig, ingest_args(tmp / "urls.parquet", str(tmp / "pool")), "ingest", ""))
    return tmp / "pool", urls


def test_kill_9_mid_shard_then_rerun(tmp_path, web, reference):
    ref_pool, urls = reference
    write_url_list(tmp_path / "urls.parquet", web.base)
    pool = tmp_path / "pool"
    args = ingest_args(tmp_path / "urls.parquet", str(pool))
    web.arm_hang()
    kill_when_hanging(run_cli(args), web)
    assert assert_nothing_half_written(str(pool)) == {"00000", "00001", "00002"}
    assert any(p.name.startswith(".tmp-00003") for p in pool.iterdir())  # the kill did land mid-shard
    out = finish(args)
    assert "(3 already done)" in out
    assert not [p.name for p in pool.iterdir() if p.name.startswith(".")]  # staging cleaned up
    assert assert_nothing_half_written(str(pool)) == {f"{i:05d}" for i in range(ROWS // PER_SHARD)}
    assert_same_result(str(pool), str(ref_pool), urls)


def read_all(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_output_reads_back_with_webdataset(reference):
    ref_pool, _ = reference
    tars = sorted(str(p) for p in ref_pool.glob("*.tar"))
    dataset = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    samples = list(dataset)
    pool = read_all(ref_pool)
    assert [key for key, *_ in samples] == [r["key"] for r in pool if r["status"] == "success"]
    for key, image, caption, meta in samples:
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        assert meta["key"] == key and caption == meta["caption"] and meta["status"] == "success"


def test_kill_9_on_s3_never_shows_a_half_written_shard(tmp_path, s3_env, web, reference):
    ref_pool, urls = reference
    output = "s3://webclip/resume-test"
    write_url_list(tmp_path / "urls.parquet", web.base)
    args = ingest_args(tmp_path / "urls.parquet", output)
    web.arm_hang()
    kill_when_hanging(run_cli(args), web)
    assert assert_nothing_half_written(output) == {"00000", "00001", "00002"}
    assert not storage.exists(storage.join(output, "00003.tar"))
    finish(args)
    assert assert_nothing_half_written(output) == {f"{i:05d}" for i in range(ROWS // PER_SHARD)}
    assert_same_result(output, str(ref_pool), urls)


def _ray_workers_connected_to(port: int) -> set[int]:
    """Our Ray task processes holding a connection to ``port`` on loopback right now.

    Found through /proc: sockets whose remote port is ``port``, then the processes
    owning them, kept if Ray titled them as running a shard task. Exactly the
    worker stuck on the hanging request, whatever other Ray workers exist.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::_ray_task"):
                continue
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_lost_ray_worker_costs_one_shard(tmp_path, web, reference, capfd):
    ref_pool, urls = reference
    write_url_list(tmp_path / "urls.parquet", web.base)
    args = ingest_args(tmp_path / "urls.parquet", str(tmp_path / "pool"), "ray")
    cfg = parse_config(IngestConfig, args, "ingest", "").replace(progress=True)
    killed: list[int] = []

    def kill_the_worker_of_shard_3() -> None:
        if web.hanging.wait(120):
            time.sleep(0.3)  # the rest of shard 3's rows are fetched: all of them will be redone
            pids = _ray_workers_connected_to(web.port)
            assert len(pids) == 1, pids
            os.kill(pids.pop(), signal.SIGKILL)  # that worker, by its id: kill -9 mid-shard
            killed.append(1)

    web.arm_hang()
    seen_before = len(web.log)
    killer = threading.Thread(target=kill_the_worker_of_shard_3, daemon=True)
    killer.start()
    summary = run_ingest(cfg)
    killer.join(5)
    paths = web.paths()[seen_before:]
    assert killed and summary.count == ROWS and summary.shards_total == ROWS // PER_SHARD
    assert_same_result(str(tmp_path / "pool"), str(ref_pool), urls)
    # Rework: shard 3's rows were requested twice, every other shard's once.
    asked = {i: sum(f"/r{i}.jpg" in p for p in paths) for i in range(ROWS) if i != 7}
    assert all(n == (2 if 30 <= i < 40 else 1) for i, n in asked.items()), asked
    assert "ok=" in capfd.readouterr().err  # the live progress bar ran (through the Ray actor)
