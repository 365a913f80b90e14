"""Run a command and measure what a user pays for it: wall time and peak memory.

Peak memory is the peak of the *summed* resident set of the whole process tree (the
command, its workers, and for Ray the raylet and GCS it starts), sampled from /proc
every ``interval_s``. A tool that fans out into processes cannot hide memory in its
children this way. Linux only, like the benchmarks' machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    cpu_seconds: float  # user + system of the tree, as last sampled per process (a lower bound)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


_TICK = os.sysconf("SC_CLK_TCK")


def tree_pids(root_pid: int) -> list[int]:
    children = _children_map()
    pids, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, ()))
    return pids


def tree_rss_bytes(root_pid: int, cpu: dict[int, float] | None = None) -> int:
    """Summed RSS of ``root_pid`` and all its descendants, now; CPU seconds per pid into ``cpu``."""
    total = 0
    for pid in tree_pids(root_pid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
            if cpu is not None:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except OSError:
            continue
    return total


def run_measured(cmd: list[str], *, env: dict | None = None, log_path: str | None = None,
                 interval_s: float = 0.2, timeout_s: float | None = None) -> Measured:
    """Run ``cmd`` to completion; its output goes to ``log_path`` (or is discarded)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    peak = 0
    cpu: dict[int, float] = {}
    start = time.perf_counter()
    try:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss_bytes(process.pid, cpu))
                done.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        finally:
            seconds = time.perf_counter() - start
            done.set()
            sampler.join()
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    finally:
        if log_path:
            out.close()
    return Measured(seconds=seconds, peak_rss_bytes=peak, returncode=returncode, cpu_seconds=sum(cpu.values()))


def tail(path: str, limit: int = 3000) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return data[-limit:].decode("utf-8", "replace")


RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, summary: dict) -> None:
    """Write ``bench/results/{name}.json`` and print it: the figures BENCHMARKS.md quotes."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2) + "\n"
    (RESULTS / f"{name}.json").write_text(text)
    print(text, end="")
