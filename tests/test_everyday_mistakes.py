"""Everyday mistakes (issue 22), made on purpose through the real commands.

Each test runs ``python -m <stage>`` as a user would, against a real HTTP server on
127.0.0.1 (``_ingest_web.HostileWeb``), and checks three things: the exit code (2 bad
usage or inputs, 1 failed or empty work, 130 interrupted), the one-line message (it
names the file, column, bucket or endpoint and the fix; no traceback unless --debug),
and that nothing was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _commands import run
from _ingest_web import HostileWeb

REPO = Path(__file__).resolve().parents[1]
ROWS = 12

pytestmark = pytest.mark.integration


def one_error(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The run ended with ``code`` and a short error naming every word; no traceback."""
    err = done.stderr
    assert done.returncode == code, (done.returncode, done.stdout, err)
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert 1 <= len(error_lines) <= 2, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as server:
        yield server


@pytest.fixture(scope="module")
def url_list(web, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lists") / "urls.parquet"
    urls = [f"{web.base}/img/m{i}.jpg" for i in range(ROWS)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a small photo of thing number {i}" for i in range(ROWS)],
                             "alt": [f"IMG_{i}.jpg" for i in range(ROWS)]}), path)
    return path


def ingest_args(url_list: Path, output: Path, *extra: str) -> list[str]:
    return ["--url_list", str(url_list), "--input_format", "parquet", "--caption_col", "caption",
            "--output_folder", str(output), "--number_sample_per_shard", "6", "--image_size", "64",
            "--progress", "false", "--workers", "1", *extra]


@pytest.fixture(scope="module")
def pool(url_list, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool") / "pool"
    done = run("ingest", *ingest_args(url_list, out, "--allow_networks", "127.0.0.1/32"))
    assert done.returncode == 0, done.stderr
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- never lose data ------------------------------------------------------------------------


def test_overwrite_with_a_misspelt_url_list_deletes_nothing(pool, url_list, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool, out)
    before = snapshot(out)
    done = run("ingest", *ingest_args(url_list.with_name("url.parquet"), out, "--incremental_mode", "overwrite"))
    one_error(done, 2, "url.parquet", "no such file")
    assert snapshot(out) == before


def test_an_output_folder_holding_the_url_list_is_refused(url_list, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    inside = out / "urls.parquet"
    shutil.copy(url_list, inside)
    done = run("ingest", *ingest_args(inside, out, "--incremental_mode", "overwrite"))
    one_error(done, 2, "holds the input url_list", "choose another output_folder")
    assert inside.read_bytes() == url_list.read_bytes()


def test_overwrite_says_what_it_deletes(pool, url_list, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool, out)
    done = run("ingest", *ingest_args(url_list, out, "--allow_networks", "127.0.0.1/32", "--incremental_mode",
                                      "overwrite"))
    assert done.returncode == 0, done.stderr
    assert f"deleting {out}" in done.stderr and "files" in done.stderr


def test_filter_into_the_pool_folder_is_refused(pool, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool, out)
    before = snapshot(out)
    done = run("filter", "--pool", str(out), "--output_folder", str(out), "--progress", "false")
    one_error(done, 2, "holds the input pool")
    assert snapshot(out) == before


# -- a rerun with changed settings, and success at nothing -----------------------------------


def test_ingest_refused_rows_then_changed_settings_then_overwrite(url_list, tmp_path):
    out = tmp_path / "pool"
    first = run("ingest", *ingest_args(url_list, out))  # loopback refused: nothing downloaded
    one_error(first, 1, f"all {ROWS} rows ssrf_blocked", "add --allow_networks 127.0.0.1/32")
    before = snapshot(out)
    again = run("ingest", *ingest_args(url_list, out, "--allow_networks", "127.0.0.1/32"))
    one_error(again, 2, "made with other settings", "allow_networks ([] -> ['127.0.0.1/32'])",
              "--incremental_mode overwrite")
    assert snapshot(out) == before  # the summary was not rewritten with the new settings either
    fresh = run("ingest", *ingest_args(url_list, out, "--allow_networks", "127.0.0.1/32", "--incremental_mode",
                                       "overwrite"))
    assert fresh.returncode == 0, fresh.stderr
    assert f"{ROWS} downloaded" in fresh.stdout


def test_ingest_rerun_over_another_url_list_is_refused(pool, url_list, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool, out)
    other = tmp_path / "other.parquet"
    table = pq.read_table(url_list)
    pq.write_table(table.set_column(1, "caption", pa.array([f"another caption {i}" for i in range(ROWS)])), other)
    done = run("ingest", *ingest_args(other, out, "--allow_networks", "127.0.0.1/32"))
    one_error(done, 2, "other input rows", "--incremental_mode overwrite")


def test_ingest_forgotten_input_format(url_list, tmp_path):
    done = run("ingest", "--url_list", str(url_list), "--output_folder", str(tmp_path / "pool"))
    one_error(done, 2, "looks like parquet", "give --input_format parquet")
    assert not (tmp_path / "pool").exists()


def test_forgotten_caption_col_warns_and_the_filter_says_why_nothing_is_kept(url_list, tmp_path):
    pool = tmp_path / "pool"
    args = ingest_args(url_list, pool, "--allow_networks", "127.0.0.1/32")
    args = args[:args.index("--caption_col")] + args[args.index("--caption_col") + 2:]
    done = run("ingest", *args)
    assert done.returncode == 0, done.stderr
    assert "no --caption_col" in done.stderr
    decided = run("filter", "--pool", str(pool), "--output_folder", str(tmp_path / "decisions"), "--progress",
                  "false", "--min_image_size", "8")
    one_error(decided, 1, "0 of 12 rows kept", "caption_missing", "give --caption_col")


def test_a_language_spelled_out(pool, tmp_path):
    done = run("filter", "--pool", str(pool), "--output_folder", str(tmp_path / "d"), "--languages", "english")
    assert done.returncode == 2 and "'english'" in done.stderr and "did you mean 'en'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "d").exists()


def test_a_missing_clip_scores_folder(pool, tmp_path):
    done = run("filter", "--pool", str(pool), "--output_folder", str(tmp_path / "d"), "--clip_scores",
               str(tmp_path / "no_scores"), "--clip_threshold", "0.2", "--progress", "false")
    one_error(done, 2, "clip_scores=", "no_scores", "python -m filter.clipscore")


def test_filter_rerun_with_other_settings_stops_then_overwrites(pool, tmp_path):
    out = tmp_path / "decisions"
    common = ["--pool", str(pool), "--output_folder", str(out), "--progress", "false", "--min_image_size", "8"]
    assert run("filter", *common).returncode == 0
    same = run("filter", *common)
    assert same.returncode == 0, same.stderr  # the same settings: the same decisions, rewritten
    before = snapshot(out)
    changed = run("filter", *common[:-1], "16")
    one_error(changed, 2, "differs in: min_image_size (8 -> 16)", "--overwrite true")
    assert snapshot(out) == before
    replaced = run("filter", *common[:-1], "16", "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "_filter_stats.json").read_text())["settings"]["min_image_size"] == 16


def test_a_pool_shard_without_its_commit_marker_is_not_skipped(pool, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool, out)
    (out / "00001_stats.json").unlink()
    done = run("filter", "--pool", str(out), "--output_folder", str(tmp_path / "d"), "--progress", "false")
    one_error(done, 2, "00001", "no commit marker", "rerun the ingest command")


# -- mismatched inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decisions(pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("decisions") / "decisions"
    done = run("filter", "--pool", str(pool), "--output_folder", str(out), "--progress", "false",
               "--min_image_size", "8")
    assert done.returncode == 0, done.stderr
    return out


def test_decisions_without_their_stats_marker_are_refused(pool, decisions, tmp_path):
    half = tmp_path / "decisions"
    shutil.copytree(decisions, half)
    (half / "_filter_stats.json").unlink()
    done = run("shards", "--pool", str(pool), "--decisions", str(half), "--output_folder", str(tmp_path / "train"),
               "--report", "false", "--progress", "false")
    one_error(done, 2, "_filter_stats.json", "did not finish")


def test_decisions_of_another_pool_are_recognised(pool, decisions, url_list, tmp_path):
    other = tmp_path / "other"
    args = ingest_args(url_list, other, "--allow_networks", "127.0.0.1/32", "--image_size", "48")
    assert run("ingest", *args).returncode == 0
    done = run("shards", "--pool", str(other), "--decisions", str(decisions), "--output_folder",
               str(tmp_path / "train"), "--report", "false", "--progress", "false")
    one_error(done, 2, "made from another pool", "python -m filter --pool")
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train").glob("*.tar"))


# -- one line for an everyday error ------------------------------------------------------------------


def test_corrupt_parquet_names_the_file(tmp_path):
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"not parquet at all")
    done = run("ingest", "--url_list", str(bad), "--input_format", "parquet", "--output_folder", str(tmp_path / "o"))
    one_error(done, 2, str(bad), "not a readable parquet file")


def test_a_wrong_column_name(url_list, tmp_path):
    done = run("ingest", "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "link",
               "--output_folder", str(tmp_path / "o"), "--progress", "false")
    one_error(done, 2, "link", "columns are")


def test_debug_shows_the_traceback(tmp_path):
    args = ["--url_list", str(tmp_path / "none.txt"), "--output_folder", str(tmp_path / "o")]
    assert "Traceback" in run("ingest", *args, "--debug").stderr
    assert "Traceback" in run("ingest", *args, env={"WEBCLIP_DEBUG": "1"}).stderr


def test_help_documents_debug_and_exit_codes():
    for module in ("ingest", "filter", "shards", "shards.verify", "apply.search"):
        out = run(module, "--help").stdout
        assert "--debug" in out and "WEBCLIP_DEBUG=1" in out and "2 bad usage" in out, module


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_object_storage_without_credentials(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}
    full = {**os.environ, **env}
    full.pop("AWS_ACCESS_KEY_ID"), full.pop("AWS_SECRET_ACCESS_KEY")
    done = subprocess.run([sys.executable, "-m", "ingest", "--url_list", "s3://webclip/lists/urls.parquet",
                           "--input_format", "parquet", "--output_folder", str(tmp_path / "o")],
                          cwd=REPO, env={**full, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    one_error(done, 2, "no credentials for s3://webclip", "AWS_ACCESS_KEY_ID")


def test_object_storage_with_a_dead_endpoint(tmp_path):
    port = _closed_port()
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true",
           "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_MAX_ATTEMPTS": "1"}
    done = run("ingest", "--url_list", "s3://webclip/lists/urls.parquet", "--input_format", "parquet",
               "--output_folder", str(tmp_path / "o"), env=env)
    one_error(done, 2, f"http://127.0.0.1:{port}", "s3://webclip", "S3_ENDPOINT_URL")


def test_ctrl_c_says_what_is_committed_and_how_to_resume(web, tmp_path):
    urls = [f"{web.base}/img/c{i}.jpg" for i in range(8)] + [f"{web.base}/hang_once/c-hang.jpg"]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo of slow thing {i}" for i in range(9)]}), path)
    web.arm_hang()
    args = ingest_args(path, tmp_path / "pool", "--allow_networks", "127.0.0.1/32", "--number_sample_per_shard", "4",
                       "--timeout", "60")
    process = subprocess.Popen([sys.executable, "-m", "ingest", *args], cwd=REPO, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert web.hanging.wait(60)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        out, err = process.communicate(timeout=60)
    finally:
        web.disarm_hang("c-hang")
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err and "2 pool shards committed" in err, err
    assert f"Resume with: python -m ingest --url_list {path}" in err, err


# -- quiet logs and make ------------------------------------------------------------------------------


def test_no_ray_token_warning(pool, url_list, tmp_path):
    out = tmp_path / "pool"
    done = run("ingest", *ingest_args(url_list, out, "--allow_networks", "127.0.0.1/32", "--distributor", "ray",
                                      "--workers", "1"))
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr and "\x1b[" not in done.stderr and "\r" not in done.stderr


def test_make_stage_targets_do_not_mix_in_the_demo_config():
    dropped = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CLUSTER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
               "CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    for target in ("crawl", "ingest", "filter", "shards", "report", "verify", "train"):
        done = subprocess.run(["make", "--no-print-directory", "-n", target, "ARGS=--pool X --decisions Y"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "configs/demo" not in done.stdout.strip().splitlines()[-1], (target, done.stdout)


def test_warmup_longer_than_the_run_is_warned():
    from core.config import load
    from train.__main__ import warmup_warning
    from train.config import TrainConfig

    config = load(TrainConfig, None, ["steps=5", "optim.warmup_steps=10", "data.train_shards=x", "data.eval_tar=null"])
    assert "optim.warmup_steps=10 is more than steps=5" in warmup_warning(config)
    assert warmup_warning(load(TrainConfig, None, ["steps=50", "optim.warmup_steps=10", "data.train_shards=x",
                                                   "data.eval_tar=null"])) is None


def test_shards_into_the_pool_folder_is_refused(pool, decisions, tmp_path):
    before = snapshot(pool)
    done = run("shards", "--pool", str(pool), "--decisions", str(decisions), "--output_folder", str(pool),
               "--progress", "false", "--overwrite", "true")
    one_error(done, 2, "holds the input pool")
    assert snapshot(pool) == before
