"""bench/train_gpu.py (issue 19's GPU benchmark) in its --dry_run: every stage's code on this CPU, tiny sizes.

The GPU run itself cannot happen here; this keeps the one command it needs from failing
on anything but the GPU: probe, step alone (compiled), both trainers on written shards,
the profile, the extra rows and the printed table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.train_vs_openclip import THEIRS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_gpu_benchmark_dry_run_prints_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.train_gpu", "--dry_run", "--work", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| model | run |"):].splitlines()
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in table[2:]}
    number = re.compile(r"\| [\d,]+ \|")
    for key in [("webclip-tiny-vit", "ours, step alone", "16"), ("webclip-tiny-vit", "webclip", "16"),
                ("webclip-tiny-vit", "today's path, step alone", "16"),
                ("webclip-tiny-vit, force_patch_dropout=0.5", "ours, step alone", "16"),
                ("webclip-tiny-vit, force_context_length=32", "ours, step alone", "16")]:  # fmt: skip
        assert key in rows and number.search(rows[key]), (key, table)
    assert re.search(r"\| \d+\.\d% \| – \|$", rows[("webclip-tiny-vit", "webclip", "16")])  # the data wait share
    if THEIRS.exists():  # open_clip_train's venv (bench/peers.sh)
        assert number.search(rows[("webclip-tiny-vit", "open_clip", "16")]), table
    assert "top kernels of our eager step" in done.stdout
