"""Search an index (``python -m apply.index``): text → images, image → images; or serve it.

A query is one of

* ``--query TEXT``: the text encoded by the checkpoint that made the embeddings (named in
  the index's ``index.json``; ``--checkpoint`` to use another of the same dimension);
* ``--image FILE``: an image file (local or ``s3://``), decoded and encoded as the trainer does;
* ``--key KEY``: an indexed sample, by its stored embedding (no model needed).

Results: rank, score (cosine), key, caption, url and shard, as a table or ``--json``.
``--serve`` answers the same queries over HTTP instead (``apply/server.py``: a JSON API
and a web page to search and browse), on 127.0.0.1 unless ``--host`` says otherwise.

Run ``python -m apply.search --help``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from apply.index import SearchIndex, open_index
from core import storage
from core.config import ConfigError, DataError, at_least, option, parse_config, problem, require

log = logging.getLogger(__name__)

MAX_TOP_K = 1000


@dataclass
class SearchConfig:
    index: str = option("", "index folder written by python -m apply.index (local or s3://)")
    query: str = option("", "text to search images with")
    image: str = option("", "image file to search similar images with (local or s3://)")
    key: str = option("", "key of an indexed sample: images similar to it")
    top_k: int = option(10, f"results per query (at most {MAX_TOP_K})")
    json: bool = option(False, "print the results as JSON instead of a table")
    checkpoint: str = option(
        "", "model for --query/--image; empty = the checkpoint named in the index (it made the embeddings)")
    model: str = option("", "open_clip name, for a --checkpoint that is an open_clip weights file")
    model_config: str = option("", "open_clip model JSON, for an architecture open_clip does not ship")
    serve: bool = option(False, "serve the JSON API and the web page instead of answering one query")
    host: str = option(
        "127.0.0.1", "--serve: address to listen on; 127.0.0.1 = this machine only (0.0.0.0 exposes the data "
        "and the page to the network: there is no authentication)")  # fmt: skip
    port: int = option(8080, "--serve: port to listen on (0: any free port, printed)")
    pool: str = option("", "--serve: the pool folder, to browse kept and rejected samples (with --decisions)")
    decisions: str = option("", "--serve: the filter's decisions folder (key, keep, reason, dup_of) of --pool")

    def __post_init__(self) -> None:
        require(self, "index")
        asked = [name for name in ("query", "image", "key") if getattr(self, name)]
        if not self.serve and len(asked) != 1:
            problem("give one of --query TEXT, --image FILE or --key KEY (or --serve for the API and page)"
                    if not asked else f"give one query, not {' and '.join('--' + a for a in asked)}")
        if self.serve and asked:
            problem(f"--serve answers queries over HTTP: drop --{asked[0]}")
        at_least(self, 1, "top_k")
        if self.top_k > MAX_TOP_K:
            problem(f"top_k={self.top_k}: at most {MAX_TOP_K}")
        if not 0 <= self.port <= 65535:
            problem(f"port={self.port}: 0 to 65535")
        if bool(self.pool) != bool(self.decisions):
            problem("give --pool and --decisions together (browsing rejections needs both)")


class Searcher:
    """An open index and, once a text or image query needs it, the model that made its embeddings."""

    def __init__(self, index: SearchIndex, checkpoint: str = "", model: str = "", model_config: str = ""):
        self.index = index
        self._model_args = (checkpoint, model, model_config)
        self._model = None

    @property
    def model(self):
        """The model, loaded on first use; a ConfigError/DataError says why it cannot be."""
        if self._model is None:
            from apply import model as apply_model  # torch and open_clip: only when a query needs them

            checkpoint, name, model_config = self._model_args
            info = self.index.info
            if not checkpoint and not info.get("checkpoint"):
                raise ConfigError(f"--index {self.index.folder}: names no checkpoint; give --checkpoint")
            if not checkpoint and not storage.exists(info["checkpoint"]):
                raise DataError(f"the index's checkpoint {info['checkpoint']} is gone; give --checkpoint")
            loaded = apply_model.load(checkpoint or info["checkpoint"],
                                      model=name or (None if checkpoint else info.get("model")),
                                      model_config=model_config or (None if checkpoint else info.get("model_config")))
            if loaded.embed_dim != self.index.index.d:
                raise ConfigError(f"--checkpoint {loaded.path}: embeds in {loaded.embed_dim} dimensions, the index "
                                  f"in {self.index.index.d}; use the checkpoint that made the embeddings")
            self._model = loaded
        return self._model

    def _results(self, vector: np.ndarray, k: int, timings: dict[str, float]) -> dict[str, Any]:
        start = time.perf_counter()
        scores, rows = self.index.search(vector, k)
        timings["search_ms"] = round((time.perf_counter() - start) * 1000, 3)
        results = [{"rank": rank + 1, "score": round(float(score), 6), **self.index.row(row)}
                   for rank, (score, row) in enumerate(zip(scores[0], rows[0])) if row >= 0]  # fmt: skip
        for result in results:
            for name in ("emb_shard", "emb_row"):
                result.pop(name, None)
        return {"results": results, "took_ms": timings}

    def text(self, query: str, k: int) -> dict[str, Any]:
        model = self.model  # loaded once, before the clock starts
        start = time.perf_counter()
        vector = model.encode_texts([query]).numpy()
        timings = {"encode_ms": round((time.perf_counter() - start) * 1000, 3)}
        return {"query": {"text": query}, **self._results(vector, k, timings)}

    def image(self, data: bytes, k: int, name: str = "image") -> dict[str, Any]:
        from train.data import SkipSample

        model = self.model
        start = time.perf_counter()
        try:
            pixels = model.decode(data)
        except SkipSample as skip:
            raise DataError(f"{name}: not an image that decodes ({skip.reason})") from None
        vector = model.encode_images(pixels.unsqueeze(0)).numpy()
        timings = {"encode_ms": round((time.perf_counter() - start) * 1000, 3)}
        return {"query": {"image": name}, **self._results(vector, k, timings)}

    def similar(self, key: str, k: int) -> dict[str, Any]:
        row = self.index.row_of_key(key)
        if row is None:
            raise KeyError(key)
        return {"query": {"key": key}, **self._results(self.index.vector(row)[None, :], k, {"encode_ms": 0.0})}


def _clip(text: Any, width: int) -> str:
    text = " ".join(str("" if text is None else text).split())  # one line: no control characters from the web
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(answer: dict[str, Any]) -> str:
    lines = [f"{'rank':>4}  {'score':>7}  {'key':<14}  {'caption':<60}  url / shard"]
    for r in answer["results"]:
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {_clip(r['key'], 14):<14}  {_clip(r['caption'], 60):<60}  "
                     f"{_clip(r['url'] or '-', 60)}  {_clip(r['shard'], 40)}")
    took = answer["took_ms"]
    lines.append(f"({len(answer['results'])} results; search {took['search_ms']:.1f} ms, "
                 f"query encoding {took['encode_ms']:.1f} ms)")
    return "\n".join(lines)


def answer_query(searcher: Searcher, cfg: SearchConfig) -> dict[str, Any]:
    if cfg.query:
        return searcher.text(cfg.query, cfg.top_k)
    if cfg.image:
        if not storage.exists(cfg.image):
            raise DataError(f"--image {cfg.image}: no such file")
        with storage.open_file(cfg.image, "rb") as handle:
            return searcher.image(handle.read(), cfg.top_k, cfg.image)
    try:
        return searcher.similar(cfg.key, cfg.top_k)
    except KeyError:
        raise DataError(f"--key {cfg.key}: no such key in the index {cfg.index}") from None


DESCRIPTION = """\
Search an index built by python -m apply.index: text -> images (--query), image ->
images (--image FILE, or --key KEY of an indexed sample). Prints rank, score (cosine),
key, caption, url and shard (or --json). With --serve, answers over HTTP instead: a JSON
API (/api/search?q=TEXT&k=K, /api/similar?key=KEY&k=K, /api/browse) and a web page to
search and to browse the samples (kept ones and examples of each rejection reason, given
--pool and --decisions), on http://127.0.0.1:8080/ by default. The server has no
authentication: keep it on 127.0.0.1 unless the data may be seen by the network.

  python -m apply.search --index data/demo/index --query "a red circle" --top_k 5
  python -m apply.search --index data/demo/index --serve \\
      --pool data/demo/pool --decisions data/demo/decisions
"""


def main(argv: list[str] | None = None) -> int:
    """The command; every error ends in one explained line (``core.cli.run``: exit codes 1, 2, 130)."""
    from core import cli

    return cli.run("python -m apply.search", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(SearchConfig, argv, prog="python -m apply.search", description=DESCRIPTION)
    searcher = Searcher(open_index(cfg.index), cfg.checkpoint, cfg.model, cfg.model_config)
    if cfg.serve:
        from apply.server import serve

        return serve(searcher, cfg)
    answer = answer_query(searcher, cfg)
    print(json.dumps(answer, ensure_ascii=False, indent=2) if cfg.json else format_table(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
