"""``python -m filter``: decide keep / reject for every pool row, with a reason."""

from __future__ import annotations

import sys

from core import cli, outcome, storage
from core.config import parse_config
from filter.config import FilterConfig
from filter.run import run_filter

DESCRIPTION = """\
Decide keep / reject for every pool row, with the first failing reason (see
filter/rules.py for the order), from the pool's parquet metadata only — no image is
decoded. Runs in local processes, or as Ray tasks given a cluster (--ray_address,
RAY_ADDRESS or --distributor ray): per-shard rules, then global passes over all
shards — URL dedupe, the CLIP-score rule (the cosines of --embeddings from
`python -m apply.embed`, or --clip_scores), exact dedupe by sha256, near-duplicate
dedupe by pHash (banded LSH, Hamming threshold) and, with --semantic_dedupe_threshold,
by the cosine of image embeddings — each keeping the first acceptable copy in key order, so decisions do
not depend on the number of workers. Writes {shard}.parquet (key, keep, reason, dup_of, scores) in
--output_folder and _filter_stats.json (counts per reason, the LSH plan) last.
"""


def main(argv: list[str] | None = None) -> int:
    return cli.run("python -m filter", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg = parse_config(FilterConfig, argv, prog="python -m filter", description=DESCRIPTION)
    cli.using(cfg, lambda: "Decisions are written as a whole: nothing is committed until the end")
    cli.hold_output(cfg.output_folder)
    summary = run_filter(cfg)
    print(f"{summary.rows} rows in {summary.shards} shards: kept {summary.kept}, rejected {summary.rows - summary.kept}")
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {n}")
    print(f"decisions written to {cfg.output_folder}{storage.retries_note(summary.storage_retries)}")
    outcome.verdict("filter", summary.rows, summary.kept, summary.reasons, "kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
