"""``python -m crawl``: seed pages and/or WARC/WAT archives → a URL list for ingest."""

from __future__ import annotations

import sys

from core import cli, outcome
from core.config import parse_config
from crawl.config import CrawlConfig
from crawl.run import run_crawl

DESCRIPTION = """\
Turn web pages into (image URL, caption) pairs, as LAION and DataComp did from
Common Crawl: <img> alt texts (or the <figcaption> of their <figure>), the largest
srcset candidate, lazy-loading attributes (data-src, ...), URLs resolved against the
page and its <base>. data: URIs, meaningless alt texts ("", "image", "logo",
"IMG_1234.jpg") and repeats within a page are counted, not kept.

Inputs, either or both:
  --warc FILES/FOLDERS   WARC or WAT archives (.gz too), local or s3://, streamed;
                         one unit per file (a local process, or a Ray task on a
                         cluster), each file resumable on its own
  --seeds URLS / --seed_file FILE
                         a polite crawl: robots.txt fetched once per host and
                         honoured, --delay seconds between requests to a host (a
                         robots Crawl-delay raises it), one request at a time per
                         host, within --max_depth, --max_pages and the
                         --allowed_domains (default: the seeds' hosts)

Requests go through ingest's safety layer: http(s) only; private, loopback,
link-local and metadata addresses refused after DNS and on every redirect unless
in --allow_networks; byte and time caps; the User-Agent names webclip and your
--user_agent_token; X-Robots-Tag / <meta name=robots> opt-outs honoured.

Output, in --output_folder: *.parquet with url, caption, page_url, caption_source,
written atomically, and _crawl_stats.json (counts per reason code, last). Then:
  python -m ingest --url_list OUT --input_format parquet --url_col url \\
      --caption_col caption --save_additional_columns '["page_url","caption_source"]' ...

examples:
  python -m crawl --warc s3://bucket/crawl/ --output_folder s3://bucket/urls
  python -m crawl --seeds https://example.org/ --max_depth 2 --delay 2 \\
      --user_agent_token "mylab (mailto:me@example.org)" --output_folder urls/
  python -m crawl --config configs/demo/crawl.yaml

Where units run are the options every stage shares (--distributor, --workers,
--max_retries, --max_in_flight, --ray_address, --progress): local processes on one
machine, Ray tasks given a cluster (--ray_address, RAY_ADDRESS or --distributor ray);
--processes_count and --max_unit_retry are still accepted for --workers and
--max_retries.
"""


def committed_note(cfg: CrawlConfig) -> str:
    from core import storage

    markers = [p for p in storage.list_files(cfg.output_folder, "_stats.json")]
    return f"{len(markers)} crawl units committed in {cfg.output_folder}"


def main(argv: list[str] | None = None) -> int:
    return cli.run("python -m crawl", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg = parse_config(CrawlConfig, argv, prog="python -m crawl", description=DESCRIPTION)
    cli.using(cfg, lambda: committed_note(cfg))
    cli.hold_output(cfg.output_folder)
    stats = run_crawl(cfg)
    for line in stats.lines():
        print(line)
    print(f"URL list written to {cfg.output_folder}")
    outcome.verdict("crawl", stats.pages, stats.pairs and stats.pages, dict(stats.reasons), "paired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
