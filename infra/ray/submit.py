"""Run a data stage on a Ray cluster: ``ray job submit`` with this checkout as the job's code.

    python -m infra.ray.submit --address http://HEAD:8265 -- python -m ingest --config my_ingest.yaml
    make ingest CLUSTER=http://HEAD:8265 CONFIG=my_ingest.yaml      # the same, through make

Why a job and not a driver on your laptop: the driver (``python -m ingest``) plans the
shards and collects their stats for the whole run; as a job it runs on the head node,
inside the cluster's network, and survives your laptop going to sleep. The job's working
directory is this checkout (configs included), its runtime env is
``infra/ray/runtime_env.yaml`` and its dependencies are pyproject.toml's (``--no-pip``
where the nodes' image has them already); its output goes wherever the config says, which on a
cluster means object storage (``s3://...``): each node's local disk is its own.

The address is the cluster's *job server* (the dashboard, ``http://HEAD:8265``), from
``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` when it is an
``http(s)://`` URL. A ``RAY_ADDRESS`` of ``host:6379`` (the GCS) is not a job server: with
it, run the stage directly on a cluster node (``python -m ingest ...``), which then joins
that cluster as its driver. With token authentication on the cluster, export
``RAY_AUTH_TOKEN`` (and ``RAY_AUTH_MODE=token``) before submitting.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "infra" / "ray" / "runtime_env.yaml"
# Settings of the data stages that name where data is read or written: on a cluster,
# a local path there means a different disk on every node.
PATH_SETTINGS = ("url_list", "output_folder", "pool", "decisions", "decontaminate")
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "http://", "https://")


class SubmitError(ValueError):
    """The submission cannot work as given; the message says what to change."""


def cluster_address(explicit: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The job server to submit to, or None: the stage runs on this machine."""
    if explicit:
        if not explicit.startswith(("http://", "https://")):
            raise SubmitError(
                f"--address {explicit}: give the cluster's job server, http://HEAD:8265 (the dashboard), "
                "not the GCS address host:6379"
            )
        return explicit.rstrip("/")
    env = os.environ if environ is None else environ
    for candidate in (env.get("RAY_API_SERVER_ADDRESS"), env.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return None


def project_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """pyproject.toml's [project] dependencies: the one list the cluster installs too."""
    with open(pyproject, "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def load_runtime_env(path: Path, with_dependencies: bool = True) -> dict[str, Any]:
    """The runtime env YAML, plus the project's dependencies as ``pip`` unless it names its own."""
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SubmitError(f"--runtime-env {path}: no such file") from None
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (working_dir, excludes, pip, env_vars...)")
    if with_dependencies:
        env.setdefault("pip", {"packages": project_dependencies(), "pip_check": False})
    else:
        env.pop("pip", None)
    return env


@dataclass(frozen=True)
class Submission:
    address: str
    entrypoint: tuple[str, ...]
    runtime_env: dict[str, Any] = field(default_factory=dict)
    working_dir: Path = REPO
    submission_id: str | None = None
    wait: bool = True

    def command(self) -> list[str]:
        ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        runtime_env = {**self.runtime_env, "working_dir": str(self.working_dir)}
        command = [ray_cli, "job", "submit", "--address", self.address,
                   "--runtime-env-json", json.dumps(runtime_env, separators=(",", ":"))]  # fmt: skip
        if self.submission_id:
            command += ["--submission-id", self.submission_id]
        if not self.wait:
            command.append("--no-wait")
        return [*command, "--", *self.entrypoint]


def normalise_entrypoint(entrypoint: list[str]) -> tuple[str, ...]:
    """The command as the cluster must run it: this machine's interpreter path means nothing there."""
    if not entrypoint:
        raise SubmitError("no command to run: add it after --, e.g. -- python -m ingest --config my.yaml")
    first = entrypoint[0]
    if os.sep in first and os.path.basename(first).startswith("python"):
        first = "python"
    return (first, *entrypoint[1:])


def _flag_values(entrypoint: tuple[str, ...], name: str) -> list[str]:
    values = []
    for i, token in enumerate(entrypoint):
        if token == f"--{name}" and i + 1 < len(entrypoint):
            values.append(entrypoint[i + 1])
        elif token.startswith(f"--{name}="):
            values.append(token.split("=", 1)[1])
    return values


def check_entrypoint(entrypoint: tuple[str, ...], working_dir: Path = REPO) -> tuple[tuple[str, ...], list[str]]:
    """The entrypoint with ``--config`` relative to the job's working dir, and warnings.

    Raises SubmitError for what cannot work on a cluster (a config outside the uploaded
    folder); warns about what probably will not (data paths on a local disk).
    """
    warnings: list[str] = []
    settings: dict[str, object] = {}
    tokens = list(entrypoint)
    for i, token in enumerate(tokens):
        if token != "--config" and not token.startswith("--config="):
            continue
        if token == "--config":
            if i + 1 >= len(tokens):
                raise SubmitError("--config: needs a file")
            index, config = i + 1, tokens[i + 1]
        else:
            index, config = i, token.split("=", 1)[1]
        path = Path(config).resolve()
        if not path.is_file():
            raise SubmitError(f"--config {config}: no such file")
        if not path.is_relative_to(working_dir.resolve()):
            raise SubmitError(
                f"--config {config}: the job runs in a copy of {working_dir} on the cluster; "
                "give a config file inside it"
            )
        relative = str(path.relative_to(working_dir.resolve()))
        tokens[index] = relative if token == "--config" else f"--config={relative}"
        loaded = yaml.safe_load(path.read_text()) or {}
        if isinstance(loaded, dict):
            settings.update(loaded)
    for name in PATH_SETTINGS:
        for value in [settings.get(name), *_flag_values(entrypoint, name)]:
            if isinstance(value, str) and value and not value.startswith(REMOTE_SCHEMES):
                warnings.append(
                    f"{name}={value}: a local path; on a cluster each node has its own disk, "
                    "so give object storage (s3://bucket/...)"
                )
    return tuple(tokens), warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, entrypoint = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m infra.ray.submit",
        usage="%(prog)s [--address URL] [options] -- python -m STAGE [STAGE OPTIONS]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", help="job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                        "else RAY_ADDRESS when it is an http(s) URL)")  # fmt: skip
    parser.add_argument("--runtime-env", type=Path, default=RUNTIME_ENV,
                        help="runtime env YAML: code excludes, env vars (default: %(default)s)")
    parser.add_argument("--no-pip", action="store_true",
                        help="the nodes' image already has webclip's dependencies: no per-job virtualenv "
                        "(by default the job declares pyproject.toml's dependencies as its pip packages)")
    parser.add_argument("--submission-id", help="name the job (default: Ray makes one); `ray job logs ID` follows it")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of streaming the log")
    parser.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command and exit")
    args = parser.parse_args(ours)
    try:
        address = cluster_address(args.address)
        if address is None:
            raise SubmitError("no cluster: give --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
        command, warnings = check_entrypoint(normalise_entrypoint(entrypoint))
        runtime_env = load_runtime_env(args.runtime_env, with_dependencies=not args.no_pip)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    submission = Submission(address, command, runtime_env, submission_id=args.submission_id, wait=not args.no_wait)
    print("+ " + shlex.join(submission.command()), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(submission.command(), cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
