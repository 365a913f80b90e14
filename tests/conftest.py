"""Shared fixtures: the real local stack — a web server, an S3 server — on loopback.

Session-scoped, because starting servers and generating a corpus cost seconds:
tests that use them only read what they serve, never change it.
"""

from __future__ import annotations

import os

import pytest

SMALL_CORPUS_ROWS = 400
SLOW_DELAY_S = 3.0  # the corpus's slow responses; ingest in tests uses a shorter timeout
INGEST_TIMEOUT_S = 1.5


@pytest.fixture(scope="session", autouse=True)
def _loopback_only_environment():
    """No proxy may carry test traffic off this machine; no usage stats from Ray."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    yield


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A small demo corpus served on 127.0.0.1; yields (corpus_dir, base_url)."""
    from infra.local.corpus import generate, write_url_list
    from infra.local.webserver import serve

    corpus_dir = tmp_path_factory.mktemp("corpus")
    generate(corpus_dir, "http://127.0.0.1:1", SMALL_CORPUS_ROWS, seed=7, workers=2, slow_delay=SLOW_DELAY_S,
             progress=False)
    with serve(corpus_dir / "site", access_log=corpus_dir / "access.jsonl") as base_url:
        write_url_list(corpus_dir, base_url)
        yield corpus_dir, base_url


@pytest.fixture(scope="session")
def s3_env():
    """An S3-compatible server (moto server mode) on 127.0.0.1 with a bucket 'webclip'."""
    from infra.local.s3server import create_bucket, s3_server

    with s3_server() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # before Ray starts, so its workers inherit it
        create_bucket(env, "webclip")
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# -- training inputs: a few train shards and a tiny model config (module-scoped: a module may override) --


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    """3 train shards x 8 good samples, with a manifest."""
    import _train_fixtures as fx

    folder = str(tmp_path_factory.mktemp("shards"))
    fx.write_train_shards(folder, samples=24, per_shard=8, seed=3, noise=0.0)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The path of a tiny model's config, registered with open_clip as ``webclip-test-tiny``."""
    import _train_fixtures as fx
    from train import model as model_mod

    path = fx.write_tiny_model_config(str(tmp_path_factory.mktemp("model")))
    model_mod.register_model_config(path)
    return path
