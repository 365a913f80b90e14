"""The demo corpus, its web server and the evaluation set.

Every later end-to-end test trusts this ground truth, so these tests check that what
was planted is really there: on disk, in the parquet files and on the wire.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.reasons import Reason, SampleError
from infra.local import composition, corpus, scenes
from infra.local.evalset import write_class_files, write_evalset
from infra.local.webserver import load_routes, serve
from ingest.resizer import ResizeConfig, resize_image

ROWS = 1000
SLOW_DELAY_S = 2.0
REASON_VALUES = {reason.value for reason in Reason}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    corpus.generate(out, "http://127.0.0.1:1", ROWS, seed=11, workers=2, slow_delay=SLOW_DELAY_S,
                    progress=False)
    return out


@pytest.fixture(scope="module")
def truth(corpus_dir) -> list[dict]:
    return corpus.load_ground_truth(corpus_dir).to_pylist()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- generation ----------------------------------------------------------------------


def test_same_rows_and_seed_give_identical_bytes_whatever_the_worker_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    corpus.generate(one, "http://127.0.0.1:8000", 200, seed=5, workers=1, progress=False)
    corpus.generate(two, "http://127.0.0.1:8000", 200, seed=5, workers=2, progress=False)
    files_one, files_two = _files(one), _files(two)
    assert files_one.keys() == files_two.keys()
    assert [name for name in files_one if files_one[name] != files_two[name]] == []
    assert {"urls.parquet", "ground_truth.parquet", "corpus.json", "site/routes.json"} <= files_one.keys()


def test_a_new_port_rewrites_only_the_url_list(tmp_path):
    first = corpus.generate(tmp_path, "http://127.0.0.1:8000", 120, seed=2, workers=1, progress=False)
    site_before = _files(tmp_path / "site")
    again = corpus.generate(tmp_path, "http://127.0.0.1:9999/", 120, seed=2, workers=1, progress=False)
    assert first.rendered and not again.rendered
    assert _files(tmp_path / "site") == site_before
    urls = pq.read_table(tmp_path / "urls.parquet")
    assert urls.column_names == ["url", "caption"]
    truth = corpus.load_ground_truth(tmp_path)
    assert urls.column("url").to_pylist() == truth.column("url").to_pylist()
    assert all(u.startswith("http://127.0.0.1:9999/img/") for u in urls.column("url").to_pylist())


def test_url_list_matches_ground_truth_row_for_row(corpus_dir, truth):
    urls = pq.read_table(corpus_dir / "urls.parquet").to_pylist()
    assert len(urls) == len(truth) == ROWS
    assert [r["row"] for r in truth] == list(range(ROWS))
    assert [(u["url"], u["caption"]) for u in urls] == [(t["url"], t["caption"]) for t in truth]


def test_every_kind_is_planted_at_about_its_rate(truth):
    counts = Counter(row["kind"] for row in truth)
    assert set(counts) == set(corpus.KINDS)
    for kind, rate in corpus.KIND_RATES.items():
        assert abs(counts[kind] / ROWS - rate) <= max(0.5 * rate, 0.003), (kind, counts[kind])
    assert 0.40 <= counts["clean"] / ROWS <= 0.60


def test_corpus_json_summarises_the_planted_kinds(corpus_dir, truth):
    summary = json.loads((corpus_dir / "corpus.json").read_text())
    assert summary["rows"] == ROWS and summary["seed"] == 11
    assert {k: n for k, n in summary["kind_counts"].items() if n} == Counter(row["kind"] for row in truth)
    assert {tuple(p) for p in summary["held_out_pairs"]} == set(scenes.HELD_OUT_PAIRS)
    assert "no held-out pair" in summary["held_out_statement"].lower()


def test_no_held_out_pair_anywhere(truth):
    words_re = re.compile(r"[a-z]+")
    for row in truth:
        assert (row["image_colour"], row["image_shape"]) not in scenes.HELD_OUT_PAIRS, row
        assert (row["caption_colour"], row["caption_shape"]) not in scenes.HELD_OUT_PAIRS, row
        words = set(words_re.findall(row["caption"].lower()))
        assert not any(c in words and s in words for c, s in scenes.HELD_OUT_PAIRS), row


def test_mismatched_captions_name_another_seen_pair(truth):
    mismatched = [r for r in truth if r["kind"] == "mismatch"]
    assert mismatched
    for row in mismatched:
        assert (row["caption_colour"], row["caption_shape"]) != (row["image_colour"], row["image_shape"])
        assert row["caption_colour"] in row["caption"].lower() and row["caption_shape"] in row["caption"]
    clean = [r for r in truth if r["kind"] == "clean"]
    assert clean and all(
        (r["caption_colour"], r["caption_shape"]) == (r["image_colour"], r["image_shape"]) for r in clean
    )


def test_originals_come_before_their_duplicates(truth):
    first_row_of_path: dict[str, int] = {}
    for row in truth:
        first_row_of_path.setdefault(row["path"], row["row"])
    for row in truth:
        if row["group"] is None:
            continue
        original = truth[first_row_of_path[row["group"]]]
        assert original["row"] < row["row"]
        assert original["group"] is None and original["kind"] in ("clean", "placeholder")
    assert {r["kind"] for r in truth if r["group"]} == {"dup_exact", "dup_near", "dup_url", "placeholder"}


def test_expected_reasons_are_reason_codes_and_follow_the_kinds(truth):
    for row in truth:
        for column in ("expected_ingest_reason", "expected_filter_reason"):
            assert row[column] is None or row[column] in REASON_VALUES, row
        if row["expected_ingest_reason"] is not None:
            assert row["expected_filter_reason"] == row["expected_ingest_reason"]
            assert row["sha256"] is None
    by_kind: dict[str, set] = {}
    for row in truth:
        by_kind.setdefault(row["kind"], set()).add(row["expected_filter_reason"])
    assert by_kind["clean"] == by_kind["mismatch"] == by_kind["dup_near"] == by_kind["redirect_ok"] == {None}
    assert by_kind["dup_exact"] == {"dup_exact"} and by_kind["dup_url"] == {"dup_url"}
    assert by_kind["tiny"] == {"too_small"} and by_kind["aspect"] == {"aspect_ratio"}
    assert by_kind["caption_junk"] <= {"caption_missing", "caption_boilerplate", "caption_short"}
    junk = [r for r in truth if r["kind"] == "caption_junk"]  # rejected before download, by their caption
    assert junk and all(r["expected_ingest_reason"] == r["expected_filter_reason"] is not None for r in junk)
    assert {r["expected_ingest_reason"] for r in truth if r["kind"] == "dup_url"} == {"dup_url"}
    placeholders = [r["expected_filter_reason"] for r in truth if r["kind"] == "placeholder"]
    assert placeholders[0] is None and set(placeholders[1:]) == {"dup_exact"}
    assert by_kind["redirect_blocked"] == {"ssrf_blocked"} and by_kind["slow"] == {"timeout"}


def test_image_sizes_are_what_each_kind_promises(truth):
    for row in truth:
        w, h = row["width"], row["height"]
        if row["kind"] == "tiny":
            assert 16 <= w <= 40 and 16 <= h <= 40 and max(w, h) / min(w, h) <= 2
        elif row["kind"] == "aspect":
            assert min(w, h) >= 80 and max(w, h) / min(w, h) >= 6
        elif row["kind"] == "placeholder":
            assert min(w, h) >= 200
        elif row["kind"] in ("clean", "mismatch"):
            assert 300 <= max(w, h) <= 1600


def test_generate_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="base-url"):
        corpus.generate(tmp_path, "ftp://127.0.0.1", 10, progress=False)
    with pytest.raises(ValueError, match="rows"):
        corpus.generate(tmp_path, "http://127.0.0.1:1", 0, progress=False)


def test_cli_help_describes_the_options():
    command = [sys.executable, "-m", "infra.local.corpus", "--help"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--out", "--base-url", "--rows", "--seed", "--workers", "--slow-delay"):
        assert option in result.stdout


# -- the server, on the wire ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(corpus_dir, tmp_path_factory):
    access_log = tmp_path_factory.mktemp("server") / "access.jsonl"
    with serve(corpus_dir / "site", access_log=access_log) as base_url:
        yield base_url, access_log


def _raw_get(base_url: str, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET on a socket: no redirects followed, no length checks."""
    parts = urllib.parse.urlsplit(base_url)
    assert parts.hostname == "127.0.0.1"
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def _first(truth, kind: str) -> dict:
    return next(row for row in truth if row["kind"] == kind)


def test_server_serves_image_bytes_exactly(server, corpus_dir, truth):
    base_url, _ = server
    routes = load_routes(corpus_dir / "site")  # also checks that every file it names exists
    assert {row["path"] for row in truth} <= routes.keys()
    for kind in ("clean", "dup_exact", "placeholder", "caption_junk"):
        row = _first(truth, kind)
        status, headers, body = _raw_get(base_url, row["path"])
        assert status == 200 and headers["content-type"] == "image/jpeg"
        assert body == (corpus_dir / "site" / routes[row["path"]].file).read_bytes()
        if kind == "caption_junk":  # served (img2dataset would fetch it), but ingest rejects it first
            assert row["sha256"] is None
            continue
        assert hashlib.sha256(body).hexdigest() == row["sha256"]
        assert Image.open(io.BytesIO(body)).size == (row["width"], row["height"])


def test_server_answers_errors_and_health(server, truth):
    base_url, _ = server
    assert _raw_get(base_url, _first(truth, "http_404")["path"])[0] == 404
    assert _raw_get(base_url, "/no/such/file.jpg")[0] == 404
    assert 500 <= _raw_get(base_url, _first(truth, "http_500")["path"])[0] <= 599
    assert _raw_get(base_url, "/healthz")[0] == 200


def test_server_sends_opt_out_header(server, truth):
    status, headers, body = _raw_get(server[0], _first(truth, "noai")["path"])
    assert status == 200 and "noai" in headers["x-robots-tag"] and "noimageai" in headers["x-robots-tag"]
    resize_image(body, ResizeConfig(image_size=64))  # a valid image: only the header says no


def test_server_redirects(server, truth):
    base_url, _ = server
    status, headers, _ = _raw_get(base_url, _first(truth, "redirect_ok")["path"])
    assert status in (301, 302, 307)
    status, headers, body = _raw_get(base_url, headers["location"])
    assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG"

    port = urllib.parse.urlsplit(base_url).port
    status, headers, _ = _raw_get(base_url, _first(truth, "redirect_blocked")["path"])
    blocked = urllib.parse.urlsplit(headers["location"])
    assert status == 302 and (blocked.hostname, blocked.port) == ("127.0.0.2", port)  # never connected to

    path, visited = _first(truth, "redirect_loop")["path"], []
    while path not in visited:
        visited.append(path)
        status, headers, _ = _raw_get(base_url, path)
        assert 300 <= status < 400
        path = headers["location"]
    assert path == visited[0]


def test_server_truncates_with_a_real_early_close(server, truth):
    status, headers, body = _raw_get(server[0], _first(truth, "truncated")["path"])
    assert status == 200
    assert 0 < len(body) < int(headers["content-length"])


def test_server_trickles_slow_responses(server, truth):
    """Headers at once, the body only after --slow-delay: a short client deadline passes first."""
    parts = urllib.parse.urlsplit(server[0])
    path = _first(truth, "slow")["path"]
    with socket.create_connection(("127.0.0.1", parts.port), timeout=1.0) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        started = time.monotonic()
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 1.0
        finished_at = None
        while finished_at is None:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk:
                finished_at = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    assert finished_at >= SLOW_DELAY_S - 0.1  # longer than any client timeout below it ...
    assert len(body) == int(re.search(rb"Content-Length: (\d+)", head).group(1))  # ... but it does finish


def test_server_sends_html_and_garbage(server, truth):
    status, headers, body = _raw_get(server[0], _first(truth, "not_image")["path"])
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in body
    status, headers, body = _raw_get(server[0], _first(truth, "corrupt")["path"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with pytest.raises(SampleError) as error:
        resize_image(body, ResizeConfig(image_size=64))
    assert error.value.reason is Reason.DECODE_ERROR


def test_server_writes_an_access_log(server):
    base_url, access_log = server
    _raw_get(base_url, "/healthz")
    records = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert records and {"time", "method", "path", "status", "remote", "user_agent"} <= records[-1].keys()
    assert records[-1]["path"] == "/healthz" and records[-1]["remote"] == "127.0.0.1"


# -- the evaluation set --------------------------------------------------------------


def test_evalset_covers_every_class_with_true_labels_and_fixed_bytes(tmp_path):
    per_class = 2
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_evalset(first, per_class, seed=3, image_size=64, workers=2, progress=False) == 48 * per_class
    write_evalset(second, per_class, seed=3, image_size=64, workers=1, progress=False)
    assert first.read_bytes() == second.read_bytes()

    with tarfile.open(first) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert len(members) == 3 * 48 * per_class
    classes = Counter()
    for i in range(48 * per_class):
        label = json.loads(members[f"{i:06d}.json"])
        colour, shape = scenes.CLASSES[label["class_index"]]
        assert (label["colour"], label["shape"]) == (colour, shape)
        assert label["seen"] == ((colour, shape) not in scenes.HELD_OUT_PAIRS)
        caption = members[f"{i:06d}.txt"].decode().lower()
        assert colour in caption and shape in caption
        assert Image.open(io.BytesIO(members[f"{i:06d}.jpg"])).size == (64, 64)
        classes[label["class_index"]] += 1
    assert classes == {index: per_class for index in range(48)}


def test_evalset_is_read_by_the_trainer_with_its_class_files(tmp_path):
    """classnames.txt and templates beside the tar: the trainer's generic zero-shot reads the demo's set."""
    from train import zeroshot

    path = tmp_path / "eval" / "eval.tar"
    write_evalset(path, 1, seed=3, image_size=32, workers=1, progress=False)
    classes = zeroshot.find_classes(str(path))
    assert classes.names == [f"{c} {s}" for c, s in scenes.CLASSES]
    assert classes.prompts()[0] == scenes.prompts(*scenes.CLASSES[0])  # the demo's own prompts
    eval_set = zeroshot.load_eval_set(str(path), 32, len(classes.names))
    assert eval_set.labels.tolist() == list(range(48))
    held_out = (tmp_path / "eval" / "held_out.txt").read_text().split("\n")
    assert sum(classes.names[label] in held_out for label in eval_set.labels.tolist()) == 6


# -- the demo's zero-shot figures ----------------------------------------------------------


DEMO_LINE = re.compile(
    r"^zero-shot top1: seen=(\d\.\d\d|n/a) unseen=(\d\.\d\d|n/a) unseen_only=(\d\.\d\d|n/a) "
    r"chance=0\.021 \(48 classes\)$"
)


def _names(pairs) -> list[str]:
    return [f"{colour} {shape}" for colour, shape in pairs]


def test_demo_zero_shot_figures_and_line():
    labels = np.arange(48)
    scores = np.zeros((48, 48), dtype=np.float32)
    scores[labels, labels] = 1.0  # every image right ...
    red_star = scenes.CLASSES.index(("red", "star"))
    red_circle = scenes.CLASSES.index(("red", "circle"))
    scores[red_star, red_circle] = 2.0  # ... but the red star, called a red circle
    result = composition.metrics(scores, labels, _names(scenes.CLASSES), _names(scenes.UNSEEN_CLASSES))
    assert result.seen == 1.0 and result.n_seen == 42 and result.n_unseen == 6
    assert result.unseen == pytest.approx(5 / 6)
    assert result.unseen_only == 1.0  # among the held-out classes only, red star still wins
    assert result.unseen_colour == 1.0 and result.unseen_shape == pytest.approx(5 / 6)
    assert DEMO_LINE.match(result.line())
    assert result.line() == "zero-shot top1: seen=1.00 unseen=0.83 unseen_only=1.00 chance=0.021 (48 classes)"


def test_demo_figures_from_the_trainers_scores_file(tmp_path, capsys):
    """A fake run folder (the trainer's zeroshot_scores.npz) and the eval set's class files: the demo's line."""
    eval_folder, run = tmp_path / "eval", tmp_path / "run"
    write_class_files(eval_folder)
    run.mkdir()
    labels = np.repeat(np.arange(48), 2)  # two images per class
    scores = np.zeros((96, 48), dtype=np.float32)
    scores[np.arange(96), labels] = 1.0
    blue_cross, blue_square = scenes.CLASSES.index(("blue", "cross")), scenes.CLASSES.index(("blue", "square"))
    red_cross = scenes.CLASSES.index(("red", "cross"))
    first = 2 * blue_cross
    scores[first, blue_square] = 2.0  # a blue cross called a blue square (seen), ...
    scores[first, red_cross] = 1.5  # ... and a red cross among the held-out classes only
    np.savez(run / composition.SCORES_FILE, scores=scores, labels=labels, keys=np.array([str(i) for i in range(96)]),
             classnames=np.array(_names(scenes.CLASSES)))  # fmt: skip
    assert composition.main(["--run", str(run), "--eval", str(eval_folder)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "zero-shot top1: seen=1.00 unseen=0.92 unseen_only=0.92 chance=0.021 (48 classes)"
    assert out[-2] == "zero-shot colour/shape: seen 1.00/1.00 (n=84), unseen 1.00/0.92 (n=12)"
    saved = json.loads((run / composition.RESULT_FILE).read_text())
    assert saved["n_unseen"] == 12 and saved["unseen_only"] == round(11 / 12, 4)

    (eval_folder / "classnames.txt").write_text("a\nb\n")  # another eval set's classes: refused
    assert composition.main(["--run", str(run), "--eval", str(eval_folder)]) == 2
