"""crawl: web pages and WARC/WAT archives → (image URL, caption) pairs that ingest takes.

LAION and DataComp began from pages, not URL lists: they pulled ``<img>`` alt texts
out of Common Crawl. This stage does the same from two kinds of input, into one
output — a folder of parquet files with ``url, caption, page_url, caption_source``
that ``python -m ingest --url_list FOLDER --input_format parquet`` reads directly:

* **archives** (``warc.py``): WARC and WAT files, gzip-compressed or not, local or
  ``s3://``, streamed record by record; one unit per file (``core.executor``: a local
  process or a Ray task), each file its own resumable unit of output;
* **seed pages** (``worker.py``): a polite breadth-first crawl from seed URLs, within
  depth, page-count and domain limits, honouring robots.txt and a per-host delay,
  through ingest's network safety layer; every host's queue lives in exactly one
  partition, crawled by one unit at a time, so the delay holds however many run.

Both end in the same pure function, ``extract.extract_html`` (or ``extract_wat``),
and every page, image and link that does not become a pair is counted under a
reason code of ``core.reasons`` (stage ``crawl``), never dropped silently.
"""
