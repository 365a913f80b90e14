"""A real multi-node Ray cluster on one machine: a head and workers as separate ``ray start`` processes.

Why not ``ray.init()`` or ``ray.cluster_utils``: the cluster path of the data stages
(a driver joining by address with an auth token, tasks on other raylets, a node
vanishing mid-job) is only exercised by separate raylets, each with its own process
tree that can be killed outright, as a machine is lost. This module is what the
tests use, and what a user can run to try ``make ingest RAY_ADDRESS=...`` locally::

    python -m infra.ray.local_cluster --workers 2      # prints the env a driver needs; Ctrl-C stops it

Choices worth knowing:

* Host ``127.0.0.2``, not ``127.0.0.1``: Ray rewrites ``127.0.0.1``/``localhost`` to the
  machine's outward address, so traffic would leave loopback; any other 127/8 address
  is kept as given (Linux answers the whole 127.0.0.0/8 on ``lo``).
* Token authentication on, with a fresh token per cluster (``RAY_AUTH_MODE=token``,
  ``RAY_AUTH_TOKEN`` in :attr:`LocalRayCluster.driver_env`): as on a real cluster, and
  no other Ray user on the machine can join or submit to it by accident.
* Its own temp dir (short, for Unix socket paths): the ``ray_current_cluster`` file that
  a bare ``ray.init()`` would follow is written there, never in ``/tmp/ray``.
* Each node is ``ray start --block`` in its own session; :meth:`LocalRayCluster.kill_node`
  SIGKILLs the node's whole process tree (raylet, agents, task workers, which Ray puts
  in process groups of their own), and :meth:`LocalRayCluster.stop` does so for every node:
  only processes this object started, found by parent id, never by name.
* Faster failure detection than Ray's defaults (``RAY_health_check_*``), so a lost node
  is declared dead in about 2 seconds instead of about 15.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

DEFAULT_HOST = "127.0.0.2"
READY_LINE = "Ray runtime started"


class ClusterError(RuntimeError):
    """The local cluster could not start; the message names the node and its log."""


@dataclass(frozen=True)
class LocalClusterConfig:
    host: str = DEFAULT_HOST
    head_cpus: int = 1  # the head runs tasks too: after a worker node is lost, someone must
    worker_cpus: tuple[int, ...] = (1,)  # one entry per worker node
    object_store_bytes: int = 128 * 1024 * 1024  # per node; Ray's default (30% of RAM) is far too much here
    dashboard: bool = False  # needs ray[default] (the job submission server lives in the dashboard)
    start_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node (and so every task)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process, from /proc."""
    table = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        except OSError:
            continue
        table.append((int(entry.name), int(fields[1]), int(fields[3])))
    return table


def node_processes(leader: int, leader_alive: bool = True) -> list[int]:
    """``leader`` (a session leader) and every process descending from it or still in its session.

    Ray gives task workers process groups of their own, so a process-group kill misses
    them; descendants are found by parent id, and the session catches any that were
    orphaned (reparented) on the way. Once the leader is gone (reaped), its pid may be
    reused: then only the other members of its session count.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [leader] if leader_alive else []
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(children.get(pid, []))
    found += [pid for pid, _, sid in table if sid == leader and pid != leader and pid not in found]
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        return node_processes(self.process.pid, leader_alive=self.alive)

    def task_pids(self, function: str = "") -> list[int]:
        """Worker processes of this node executing a task now (Ray titles them ``ray::<function>``).

        Idle workers are titled ``ray::IDLE``; Ray's own agents ``ray::DashboardAgent`` and
        ``ray::RuntimeEnvAgent``.
        """
        busy = []
        for pid in self.pids():
            title = command_line(pid)
            if title.startswith(f"ray::{function}") and not title.startswith(
                ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
            ):
                busy.append(pid)
        return busy

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class LocalRayCluster:
    """A head and worker nodes on loopback; use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, config: LocalClusterConfig | None = None) -> None:
        self.config = config or LocalClusterConfig()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="wcray-", dir="/tmp"))  # short: socket paths ≤ 107 bytes
        self.token = secrets.token_hex(32)
        self.port = free_port(self.config.host)
        self.dashboard_port = free_port(self.config.host) if self.config.dashboard else None
        self.nodes: list[RayNode] = []

    # -- what a driver needs ------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address: ``RAY_ADDRESS`` for a driver on one of the nodes (``ray.init``)."""
        return f"{self.config.host}:{self.port}"

    @property
    def dashboard_url(self) -> str | None:
        """The job submission address (``ray job submit --address``), when the dashboard runs."""
        return f"http://{self.config.host}:{self.dashboard_port}" if self.dashboard_port else None

    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def driver_env(self) -> dict[str, str]:
        """Environment for a process that joins the cluster: address and token."""
        return {**self.auth_env, "RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[RayNode]:
        return self.nodes[1:]

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start_node("head", self._head_args())
            for cpus in self.config.worker_cpus:
                self.add_worker(cpus)
        except BaseException:
            self.stop()
            raise

    def add_worker(self, cpus: int = 1) -> RayNode:
        args = ["--address", self.address, "--num-cpus", str(cpus)]
        return self._start_node(f"worker{len(self.nodes)}", args)

    def kill_node(self, node: RayNode) -> list[int]:
        """SIGKILL the node's whole process tree at once, as when its machine is lost; returns the pids."""
        pids = node.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.process.wait(10)
        return pids

    def stop(self) -> None:
        """Stop every node (workers first), then remove the temp dir."""
        for node in reversed(self.nodes):
            self.kill_node(node)  # also when its `ray start` exited: orphans of its session may remain
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------

    def _head_args(self) -> list[str]:
        host = self.config.host
        args = ["--head", "--port", str(self.port), "--num-cpus", str(self.config.head_cpus),
                "--temp-dir", str(self.temp_dir), "--ray-client-server-port", str(free_port(host)),
                "--include-dashboard", "true" if self.config.dashboard else "false"]  # fmt: skip
        if self.config.dashboard:
            args += ["--dashboard-host", host, "--dashboard-port", str(self.dashboard_port)]
        return args

    def _node_env(self) -> dict[str, str]:
        # `python` on a node is the Python that runs Ray there, as on a real cluster (a job's
        # entrypoint is `python -m STAGE`): this interpreter, whatever PATH says otherwise.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        return {
            **os.environ,
            "PATH": path,
            **self.auth_env,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_initial_delay_ms": "0",
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
            **self.config.env,
        }

    def _start_node(self, name: str, role_args: list[str]) -> RayNode:
        host = self.config.host
        ports: list[str] = []
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            ports += [flag, str(free_port(host))]  # two raylets on one address: no default may clash
        command = [
            os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", *role_args,
            "--node-ip-address", host, "--object-store-memory", str(self.config.object_store_bytes),
            "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", *ports,
        ]  # fmt: skip
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=self._node_env(), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        node = RayNode(name, process, log_path)
        self.nodes.append(node)
        deadline = time.monotonic() + self.config.start_timeout_s
        while READY_LINE not in node.log():
            if not node.alive:
                raise ClusterError(f"Ray {name} node exited while starting; its output:\n{node.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"Ray {name} node not ready after {self.config.start_timeout_s:.0f} s "
                                   f"(log: {log_path}):\n{node.log()[-3000:]}")
            time.sleep(0.1)
        return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.ray.local_cluster",
        description="Start a head and worker nodes as separate `ray start` processes on loopback; "
        "print the environment a driver needs; stop them all on Ctrl-C.",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per node, head included (default 1)")
    parser.add_argument("--dashboard", action="store_true",
                        help="run the dashboard (job submission server); needs `pip install -e '.[cluster]'`")
    args = parser.parse_args(argv)
    config = LocalClusterConfig(head_cpus=args.cpus, worker_cpus=(args.cpus,) * args.workers, dashboard=args.dashboard)
    with LocalRayCluster(config) as cluster:
        print(f"Ray cluster up: {len(cluster.nodes)} nodes, temp dir {cluster.temp_dir}")
        print("# a driver on this machine joins it with:")
        for key, value in cluster.driver_env.items():
            print(f"export {key}={value}")
        if cluster.dashboard_url:
            print(f"# submit jobs with: make ingest CLUSTER={cluster.dashboard_url}")
        print("# Ctrl-C stops the cluster", flush=True)
        try:
            while all(node.alive for node in cluster.nodes):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
