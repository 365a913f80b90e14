"""Resharding: uniform train shards, mixed across pool shards, deterministic, resumable."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shards.__main__ import main as shards_main
from shards.config import ShardsConfig
from shards.plan import ReshardPlan
from shards.reshard import DamagedPool, reshard
from tests._shards_fixtures import make_pool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(str(tmp_path_factory.mktemp("reshard")), shards=8, rows_per_shard=60)


def _config(pool, out, **kw) -> ShardsConfig:
    values = dict(pool=pool.pool, decisions=pool.decisions, output_folder=str(out), samples_per_shard=16,
                  mix_window=4, distributor="inline", report=False, progress=False)
    values.update(kw)
    return ShardsConfig(**values)


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]


def test_train_shards_are_uniform_and_hold_each_kept_sample_once(pool, tmp_path):
    manifest = reshard(_config(pool, tmp_path / "train"))
    counts = [e["count"] for e in manifest["shards"]]
    kept = pool.kept_keys
    assert manifest["total_samples"] == len(kept) == sum(counts)
    assert all(c == 16 for c in counts[:-1]) and 1 <= counts[-1] <= 16
    seen = Counter(k for e in manifest["shards"] for k in _tar_keys(tmp_path / "train" / e["name"]))
    assert set(seen) == kept and set(seen.values()) == {1}
    for entry in manifest["shards"]:  # each train parquet describes exactly its tar
        table = pq.read_table(tmp_path / "train" / entry["metadata"]["name"])
        assert table["key"].to_pylist() == _tar_keys(tmp_path / "train" / entry["name"])
        original = {r["key"]: r for r in pool.rows}
        for row in table.to_pylist():
            assert row["caption"] == original[row["key"]]["caption"]
            assert row["url"] == original[row["key"]]["url"]


def test_samples_are_mixed_across_pool_shards(pool, tmp_path):
    manifest = reshard(_config(pool, tmp_path / "train"))
    sources = [{k[:5] for k in _tar_keys(tmp_path / "train" / e["name"])} for e in manifest["shards"][:-1]]
    # 16 samples drawn from 4 interleaved pool shards: each full train shard mixes several.
    assert all(len(s) >= 2 for s in sources), sources
    assert sum(len(s) >= 3 for s in sources) >= len(sources) // 2, sources
    # ...and the train shards do not follow pool order: the first holds no pool shard 0 samples for seed 0.
    first = ReshardPlan.build({i: 1 for i in range(8)}, 16, 4, 0).pool_shards
    assert first != sorted(first)


def test_same_inputs_same_bytes_whatever_the_distributor_and_task_size(pool, tmp_path):
    inline = reshard(_config(pool, tmp_path / "inline"))
    on_ray = reshard(_config(pool, tmp_path / "ray", distributor="ray", workers=2, max_shards_per_task=1))
    assert [(e["name"], e["sha256"], e["metadata"]["sha256"]) for e in inline["shards"]] == \
        [(e["name"], e["sha256"], e["metadata"]["sha256"]) for e in on_ray["shards"]]
    other_seed = reshard(_config(pool, tmp_path / "seed1", seed=1))
    assert [e["sha256"] for e in other_seed["shards"]] != [e["sha256"] for e in inline["shards"]]


def test_plan_segments_cover_every_position_once():
    plan = ReshardPlan.build({0: 7, 3: 0, 5: 13, 9: 4, 11: 21}, samples_per_shard=6, mix_window=2, seed=3)
    taken: Counter = Counter()
    for t in range(plan.train_shards):
        size = 0
        for segment in plan.segments(t, t + 1):
            ids = segment.pool_shards
            for j, p in enumerate(ids):
                start = segment.skip[j]
                n = int((segment.labels == j).sum())
                for k in range(start, start + n):
                    taken[(p, k)] += 1
            size += len(segment.labels)
        assert size == plan.shard_size(t)
    expected = {(p, k) for p, n in {0: 7, 5: 13, 9: 4, 11: 21}.items() for k in range(n)}
    assert set(taken) == expected and set(taken.values()) == {1}
    units = plan.units(max_shards=2)
    assert [t for a, b in units for t in range(a, b)] == list(range(plan.train_shards))


def test_a_killed_run_resumes_to_the_same_shards_without_rewriting_committed_ones(tmp_path):
    spec = make_pool(str(tmp_path / "big"), shards=6, rows_per_shard=400, seed=5)
    reference = reshard(_config(spec, tmp_path / "reference", samples_per_shard=8))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "shards", "--pool", spec.pool, "--decisions", spec.decisions,
               "--output_folder", str(out), "--samples_per_shard", "8", "--mix_window", "4",
               "--distributor", "inline", "--report", "false", "--progress", "false"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 5:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: make the pool bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("*") if not p.name.startswith(("_", "."))
                 and (out / f"{p.name[:5]}_stats.json").exists()}
    assert 5 <= len(committed) // 3 < reference["shard_count"]
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["name"], e["sha256"], e["count"]) for e in manifest["shards"]] == \
        [(e["name"], e["sha256"], e["count"]) for e in reference["shards"]]
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == committed  # untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_different_plan_is_refused_unless_overwrite(pool, tmp_path):
    reshard(_config(pool, tmp_path / "train"))
    with pytest.raises(SystemExit, match="differs in: plan.*--overwrite true"):
        reshard(_config(pool, tmp_path / "train", samples_per_shard=10))
    manifest = reshard(_config(pool, tmp_path / "train", samples_per_shard=10, overwrite=True))
    assert all(e["count"] == 10 for e in manifest["shards"][:-1])
    names = {p.name for p in (tmp_path / "train").iterdir() if p.name.endswith(".tar")}
    assert names == {e["name"] for e in manifest["shards"]}


def test_manifest_records_what_made_the_shards(pool, tmp_path):
    manifest = reshard(_config(pool, tmp_path / "train"))
    assert manifest["shard_count"] == len(manifest["shards"])
    for entry in manifest["shards"]:
        assert {"name", "count", "bytes", "sha256", "metadata"} <= entry.keys()
        assert len(entry["sha256"]) == 64 and len(entry["metadata"]["sha256"]) == 64
    assert manifest["total_bytes"] == sum(e["bytes"] + e["metadata"]["bytes"] for e in manifest["shards"])
    inputs = manifest["inputs"]
    assert len(inputs["pool"]["fingerprint"]) == 64 and len(inputs["decisions"]["fingerprint"]) == 64
    assert inputs["input_lists"] is None  # this pool was not made by ingest: said, not invented
    assert manifest["config"]["samples_per_shard"] == 16 and manifest["code_version"]
    assert manifest["plan"]["total_samples"] == manifest["total_samples"]


def test_a_pool_whose_tar_lost_a_kept_sample_is_named(tmp_path):
    spec = make_pool(str(tmp_path / "p"), shards=2, rows_per_shard=30, seed=2)
    tar_path = Path(spec.pool) / "00001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = sorted(k for k in spec.kept_keys if k.startswith("00001"))[3]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if not member.name.startswith(victim):
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DamagedPool, match=f"{victim} has no image"):
        reshard(_config(spec, tmp_path / "train"))
    code = shards_main(["--pool", spec.pool, "--decisions", spec.decisions, "--output_folder",
                        str(tmp_path / "cli"), "--distributor", "inline", "--progress", "false"])
    assert code == 1


def test_cli_help_explains_and_bad_values_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        shards_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--mix_window" in text and "resumable" in text and "manifest.json" in text
    with pytest.raises(SystemExit) as exc:
        shards_main(["--pool", "p", "--decisions", "d", "--output_folder", "o", "--samples_per_shard", "0"])
    assert exc.value.code == 2
    assert "samples_per_shard=0" in capsys.readouterr().err
