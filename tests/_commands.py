"""Run a webclip command as a user would: ``python -m <module> ARGS`` from the repository, output captured;
and a small disk to run it on (``small_filesystem``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The finished command; ``WEBCLIP_DEBUG`` only when ``env`` sets it (tracebacks are a choice)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if "WEBCLIP_DEBUG" not in (env or {}):
        full_env.pop("WEBCLIP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def small_filesystem(folder, size: int):
    """A size-limited tmpfs at ``folder`` (mounting needs root): yields True; else (not permitted) yields
    False and the caller limits the file size of its subprocess instead (RLIMIT_FSIZE)."""
    os.makedirs(folder, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
