"""An S3-compatible server on loopback (moto's server mode), for tests and local runs.

Every stage's ``s3://`` path is exercised against a real HTTP server speaking the
S3 protocol, through the same s3fs/botocore client code that talks to AWS — not a
mock of the client. ``s3_server()`` starts it as a subprocess on 127.0.0.1 and
yields the environment a client needs; ``python -m infra.local.s3server`` runs it in
the foreground for a local stack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

HOST = "127.0.0.1"

# Credentials are dummies: the server accepts anything. Real credentials come from
# the environment of the job (never from files in the repo).
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "webclip-local",
    "AWS_SECRET_ACCESS_KEY": "webclip-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_ready(endpoint: str, process: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            opener.open(endpoint + "/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    process.kill()
    with open(log_path, errors="replace") as log:
        raise RuntimeError(f"the S3 server on {endpoint} did not start:\n{log.read()[-3000:]}")


@contextlib.contextmanager
def s3_server(port: int = 0, startup_timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Run moto's S3 server on 127.0.0.1; yield the client environment (endpoint included)."""
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    with tempfile.NamedTemporaryFile(prefix="webclip-s3-", suffix=".log", delete=False) as log:
        log_path = log.name
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(endpoint, process, log_path, startup_timeout_s)
        yield {**CLIENT_ENV, "S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        os.unlink(log_path)


def create_bucket(env: dict[str, str], bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.s3server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = parser.parse_args(argv)
    with s3_server(args.port) as env:
        for bucket in args.bucket:
            create_bucket(env, bucket)
        print("S3-compatible server ready; use it with:")
        for key, value in env.items():
            print(f"  export {key}={value}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
