"""apply.index and apply.search: exact and approximate indexes, recall recorded, queries checked by hand.

The embeddings are real (a seeded webclip-tiny over a small pool, written in the embed
stage's layout by ``_search_fixtures``); every search answer is compared with a direct
numpy computation over the same float16 embeddings. Recall is tested on constructed,
clustered vectors, at a size where the threshold (lowered here) picks an approximate index.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import _search_fixtures as fx
from apply import index as index_mod
from apply import model as apply_model
from apply import search as search_mod
from apply.index import IndexConfig, open_index, run_index
from apply.search import SearchConfig, Searcher
from core.config import ConfigError, load_cli
from train import data as data_mod


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    return fx.build_all(str(tmp_path_factory.mktemp("search")))


@pytest.fixture(scope="module")
def model(built) -> apply_model.Model:
    return apply_model.load(built["checkpoint"])


def stored(embeddings: str, kind: str = "img") -> tuple[np.ndarray, list[str]]:
    """Every stored embedding (float16 as written, as float32) and its key, in index row order."""
    info = json.load(open(os.path.join(embeddings, "embeddings.json")))
    vectors, keys = [], []
    for n in sorted(int(n) for n in info["shards"]):
        vectors.append(np.load(os.path.join(embeddings, f"{kind}_emb", f"{kind}_emb_{n}.npy")).astype(np.float32))
        keys += pq.read_table(os.path.join(embeddings, "metadata", f"metadata_{n}.parquet"))["key"].to_pylist()
    return np.concatenate(vectors), keys


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    top = np.argsort(-scores, kind="stable")[:k]
    return top, scores[top]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = search_mod.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_small_set_gets_an_exact_index_that_names_its_inputs(built):
    info = json.load(open(os.path.join(built["index"], "index.json")))
    emb_info = json.load(open(os.path.join(built["embeddings"], "embeddings.json")))
    assert info["type"] == "flat" and info["faiss"] == "Flat" and "exact_max_rows" in info["choice"]
    assert info["rows"] == emb_info["rows"] == 3 * (fx.ROWS - 1)
    assert info["recall_at_10"]["value"] == 1.0
    for name in ("checkpoint", "model", "step", "image_size"):
        assert info[name] == emb_info[name]
    rows = pq.read_table(os.path.join(built["index"], "rows.parquet"))
    assert rows["key"].to_pylist() == stored(built["embeddings"])[1]
    assert set(rows.column_names) >= {"key", "url", "caption", "shard", "emb_shard", "emb_row"}
    assert sorted(os.listdir(built["index"])) == ["index.faiss", "index.json", "rows.parquet"]  # nothing half-written


def test_text_search_is_the_brute_force_top_k(built, model):
    vectors, keys = stored(built["embeddings"])
    searcher = Searcher(open_index(built["index"]))
    for text in ("a red circle", "stock illustration of a small blue square", fx.HOSTILE_CAPTION):
        answer = searcher.text(text, 7)
        top, scores = brute_force(vectors, model.encode_texts([text]).numpy()[0], 7)
        assert [r["key"] for r in answer["results"]] == [keys[i] for i in top], text
        np.testing.assert_allclose([r["score"] for r in answer["results"]], scores, atol=1e-5)
        assert [r["rank"] for r in answer["results"]] == list(range(1, 8))


def test_a_caption_finds_its_own_sample(built, model, tmp_path, capsys):
    """Image embeddings made equal to caption embeddings: by construction, a caption's best match is its sample."""
    tars = [os.path.join(built["pool"], f"{s:05d}.tar") for s in range(fx.SHARDS)]
    emb, index = str(tmp_path / "emb"), str(tmp_path / "index")
    fx.write_embeddings(model, tars, emb, built["pool"], image_is_caption=True)
    run_index(IndexConfig(embeddings=emb, output_folder=index, progress=False))
    rows = pq.read_table(os.path.join(index, "rows.parquet")).to_pylist()
    unique = [r for r in rows if sum(o["caption"] == r["caption"] for o in rows) == 1]
    assert len(unique) >= 20
    for row in unique[:8]:
        code, out, _ = run_cli(["--index", index, "--query", row["caption"], "--top_k", "3", "--json"], capsys)
        assert code == 0
        first = json.loads(out)["results"][0]
        assert (first["key"], first["caption"], first["url"]) == (row["key"], row["caption"], row["url"])
        assert first["score"] == pytest.approx(1.0, abs=2e-3)  # float16 storage


def test_image_search_finds_the_image_itself_first(built, tmp_path, capsys):
    samples = list(data_mod.iter_tar_samples(os.path.join(built["pool"], "00001.tar"), None))
    for sample in samples[:4]:
        path = tmp_path / f"{sample.key}.jpg"
        path.write_bytes(data_mod.image_bytes(sample.members))
        code, out, _ = run_cli(["--index", built["index"], "--image", str(path), "--json", "--top_k", "5"], capsys)
        assert code == 0 and json.loads(out)["results"][0]["key"] == sample.key
        code, out, _ = run_cli(["--index", built["index"], "--key", sample.key, "--json"], capsys)
        answer = json.loads(out)
        assert answer["results"][0]["key"] == sample.key and answer["results"][0]["score"] == pytest.approx(1, abs=2e-3)
    code, out, _ = run_cli(["--index", built["index"], "--key", samples[0].key, "--top_k", "3"], capsys)
    assert code == 0 and out.splitlines()[0].split()[:4] == ["rank", "score", "key", "caption"]
    assert len(out.splitlines()) == 5 and samples[0].key in out.splitlines()[1]


def test_recall_of_an_approximate_index_is_measured_and_recorded(tmp_path):
    points, _ = fx.clustered(4400, 32, clusters=80, seed=1)
    image, fresh = points[:4000], points[4000:]  # fresh: queries the build never saw
    text = fx.clustered(4000, 32, clusters=80, seed=1)[0]  # the same clusters, other points
    emb = str(tmp_path / "emb")
    fx.write_vectors(emb, image, text, per_shard=700)
    stored_image = image.astype(np.float16).astype(np.float32)
    truth = np.argsort(-(fresh @ stored_image.T), axis=1, kind="stable")[:, :10]

    def recall(index: index_mod.SearchIndex) -> float:
        return index_mod.recall_at_k(index.search(fresh, 10)[1], truth)

    auto = str(tmp_path / "auto")
    info = run_index(IndexConfig(embeddings=emb, output_folder=auto, exact_max_rows=1000, recall_queries=400,
                                 progress=False))  # fmt: skip
    assert info["type"] == "ivf" and "exact_max_rows 1,000" in info["choice"]
    assert info["nlist"] == 64 and info["faiss"] == "IVF64,SQfp16"
    measured = info["recall_at_10"]
    assert measured["queries"] == 200 and 0.9 <= measured["value"] <= 1.0
    assert measured["tuning"][-1]["recall_at_10"] >= 0.95 and info["search"]["nprobe"] == measured["tuning"][-1]["nprobe"]
    assert all(t["recall_at_10"] < 0.95 for t in measured["tuning"][:-1])  # the smallest nprobe that reaches it
    opened = open_index(auto)
    assert opened.index.nprobe == info["search"]["nprobe"] < 64  # approximate: not every list is visited
    assert abs(recall(opened) - measured["value"]) < 0.05  # the recorded figure holds for queries it never saw
    assert json.load(open(os.path.join(auto, "index.json")))["recall_at_10"] == measured

    exact = str(tmp_path / "flat")
    run_index(IndexConfig(embeddings=emb, output_folder=exact, exact_max_rows=1000, index_type="flat", progress=False))
    assert recall(open_index(exact)) == 1.0
    hnsw = str(tmp_path / "hnsw")
    info = run_index(IndexConfig(embeddings=emb, output_folder=hnsw, index_type="hnsw", recall_queries=200,
                                 progress=False))  # fmt: skip
    assert info["type"] == "hnsw" and recall(open_index(hnsw)) >= 0.9
    assert open_index(hnsw).vector(5) == pytest.approx(stored_image[5], abs=1e-6)


def test_an_index_on_s3_answers_like_the_local_one(built, s3_env):
    remote = "s3://webclip/search/index"
    run_index(IndexConfig(embeddings=built["embeddings"], output_folder=remote, progress=False))
    local, far = Searcher(open_index(built["index"])), Searcher(open_index(remote))
    key = local.index.rows["key"][4].as_py()
    assert far.similar(key, 5)["results"] == local.similar(key, 5)["results"]


def test_bad_inputs_are_one_line_errors(built, tmp_path, capsys):
    code, _, err = run_cli(["--index", str(tmp_path / "nowhere"), "--key", "x"], capsys)
    assert code == 2 and "index.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["--index", built["index"], "--key", "../../etc/passwd"], capsys)
    assert code == 2 and "no such key" in err
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"<html>not an image</html>")
    code, _, err = run_cli(["--index", built["index"], "--image", str(junk)], capsys)
    assert code == 2 and "not an image" in err
    code, _, err = run_cli(["--index", built["index"], "--query", "x", "--checkpoint", str(tmp_path / "no.pt")], capsys)
    assert code == 2 and "--checkpoint" in err
    half = tmp_path / "half"
    shutil.copytree(built["embeddings"], half)
    os.remove(half / "embeddings.json")  # an embed run that did not finish
    assert index_mod.main(["--embeddings", str(half), "--output_folder", str(tmp_path / "i")]) == 2
    assert "embeddings.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        search_mod.main(["--index", built["index"], "--query", "x", "--key", "y"])
    assert exit_info.value.code == 2 and "one query" in capsys.readouterr().err


def test_boolean_flags_may_be_given_bare():
    cfg, _ = load_cli(SearchConfig, ["--index", "i", "--serve", "--port", "0"], "search", "")
    assert cfg.serve is True and cfg.port == 0 and cfg.json is False
    cfg, _ = load_cli(SearchConfig, ["--index", "i", "--key", "k", "--json", "false"], "search", "")
    assert cfg.json is False
    with pytest.raises(ConfigError, match="pool"):
        load_cli(SearchConfig, ["--index", "i", "--serve", "--pool", "p"], "search", "")


def test_the_statistics_report_says_how_to_open_the_page(tmp_path):
    from _shards_fixtures import make_pool, make_report
    from shards.page import SEARCH_URL, render_page

    spec = make_pool(str(tmp_path), shards=2, rows_per_shard=8, seed=1)
    html = render_page(make_report(spec, ""))
    note = html[html.index("id=search-page"):].split("</p>", 1)[0]
    assert f'<a href="{SEARCH_URL}">' in note and SEARCH_URL == "http://127.0.0.1:8080/"
    assert "make search ARGS=" in note and f"--decisions {spec.decisions}" in note
    assert SearchConfig.__dataclass_fields__["port"].default == 8080  # the URL the page names is the default one
