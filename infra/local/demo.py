"""``make demo``: the whole path on the embedded defaults, one stage after another.

    corpus   generate the synthetic web (images, captions, planted mess, ground truth)
    ingest   serve it on 127.0.0.1 and download it on a local Ray instance → pool shards
    evalset  render the zero-shot evaluation set (all 48 colour × shape classes)
    filter   decide keep / reject for every pool row → decisions (eval look-alikes dropped too)
    shards   kept samples → train shards + manifest.json; report; verify
    train    train a small CLIP from scratch on the CPU, then zero-shot evaluation
    embed    the trained model's image and caption embeddings of the train shards
    index    a search index over them; the top captions of a few text queries
    figures  the demo's own zero-shot figures (seen / unseen pairs, colour / shape)

Each stage runs as the same command a user would type (printed before it runs), so
the demo doubles as a worked example. Everything is seeded and the web server's
port is fixed, so two runs produce the same shards. A rerun reuses the corpus and
the committed pool shards.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from infra.local import composition
from infra.local.webserver import serve

DATA = "data/demo"
RUN = "runs/demo"  # run_dir of configs/demo/train.yaml
CONFIGS = "configs/demo"
QUERIES = ("a green triangle", "a small yellow square", "a purple star on the left")  # searched after training


def _run(command: list[str], title: str) -> None:
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    start = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"demo: the {title.split(':')[0]} stage failed (exit {result.returncode}); see above")
    print(f"--- {title.split(':')[0]} took {time.time() - start:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="URL-list rows in the synthetic web")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and the eval set")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", 8765)),
                        help="port of the demo web server on 127.0.0.1 (env DEMO_PORT)")
    parser.add_argument("--eval-per-class", type=int, default=20, help="eval images per class")
    parser.add_argument("--skip-train", action="store_true", help="stop after the data stages")
    parser.add_argument("--train-args", default="", help="extra arguments for `python -m train`")
    args = parser.parse_args(argv)
    py = sys.executable
    base_url = f"http://127.0.0.1:{args.port}"
    start = time.time()

    _run([py, "-m", "infra.local.corpus", "--out", f"{DATA}/corpus", "--base-url", base_url,
          "--rows", str(args.rows), "--seed", str(args.seed)], "corpus: the synthetic web")
    with serve(f"{DATA}/corpus/site", port=args.port, access_log=f"{DATA}/corpus/access.jsonl") as url:
        print(f"demo web server: {url}", flush=True)
        _run([py, "-m", "ingest", "--config", f"{CONFIGS}/ingest.yaml"], "ingest: download on Ray")
    _run([py, "-m", "infra.local.evalset", "--out", f"{DATA}/eval/eval.tar", "--per-class",
          str(args.eval_per_class), "--seed", str(args.seed), "--image-size", "128", "--resize-mode", "border"],
         "evalset: zero-shot evaluation images")
    _run([py, "-m", "filter", "--config", f"{CONFIGS}/filter.yaml"], "filter: decisions")
    _run([py, "-m", "shards", "--config", f"{CONFIGS}/shards.yaml"], "shards: train shards, manifest")
    _run([py, "-m", "shards.report", "--config", f"{CONFIGS}/report.yaml"], "report: statistics and datasheet")
    _run([py, "-m", "shards.verify", "--config", f"{CONFIGS}/verify.yaml"], "verify: shards against the manifest")
    if not args.skip_train:
        _run([py, "-m", "train", "--config", f"{CONFIGS}/train.yaml", *shlex.split(args.train_args)],
             "train: CLIP from scratch + zero-shot")
        _run([py, "-m", "apply.embed", "--checkpoint", f"{RUN}/checkpoints", "--shards", f"{DATA}/train",
              "--output_folder", f"{DATA}/embeddings"], "embed: image and caption embeddings of the train shards")
        _run([py, "-m", "apply.index", "--embeddings", f"{DATA}/embeddings", "--output_folder", f"{DATA}/index"],
             "index: a search index over the embeddings")
        for query in QUERIES:
            _run([py, "-m", "apply.search", "--index", f"{DATA}/index", "--query", query, "--top_k", "5"],
                 f"search: {query!r}, text to images")
    print(f"\ndemo finished in {time.time() - start:.0f}s")
    print(f"  dataset report:  {DATA}/train/index.html (and report.json, datasheet.md, manifest.json)")
    if not args.skip_train:
        result = composition.figures(RUN, f"{DATA}/eval")
        composition.write(f"{RUN}/{composition.RESULT_FILE}", result)
        print(f"  model and logs:  {RUN}/ (zero-shot figures in {RUN}/zeroshot.json and "
              f"{RUN}/{composition.RESULT_FILE})")
        print(f"  search page:     make search ARGS=\"--index {DATA}/index --serve --pool {DATA}/pool "
              f"--decisions {DATA}/decisions\"  then open http://127.0.0.1:8080/")
        print(result.details())
        print(result.line(), flush=True)  # the demo's last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
