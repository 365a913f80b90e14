"""Download one shard: the place where a sample is fetched, decoded and recorded.

For each input row: fetch (async, many at once) → decode and resize (in a thread:
Pillow releases the GIL while decoding) → one pool row, success or failure with
its reason. A failure becomes a row in exactly one place, ``_record_failure``, and
every row reaches the writer in one place, ``record``; results are written in row
order through a small reorder buffer, so keys, tar order and bytes do not depend on
which download finished first.

Live progress: when the caller passes ``report`` (``ingest.run`` hands it on to the
executor's progress bar), the worker calls it with the shard's running (rows,
successes) at most twice a second — absolute counts, so a lost or repeated report
cannot skew the total.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.layout import sample_key, shard_name
from core.reasons import Reason, SampleError
from ingest.config import IngestConfig
from ingest.fetcher import Fetcher
from ingest.reader import ShardInput
from ingest.resizer import ResizeConfig, ResizedImage, resize_image
from core.shard_writer import BaseShardWriter, open_shard_writer

Report = Callable[[int, int, int], None]  # (shard id, rows done, successes)
REPORT_INTERVAL_S = 0.5


class _ShardAccount:
    """Counts for ``_stats.json`` (img2dataset's keys plus our per-reason counts)."""

    def __init__(self) -> None:
        self.count = self.successes = self.failed_to_download = self.failed_to_resize = 0
        self.download_bytes = 0
        self.reasons: dict[str, int] = {}
        self.status_dict: dict[str, int] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.count += 1
        self.download_bytes += row.get("download_bytes") or 0
        status = row["status"]
        self.status_dict[status] = self.status_dict.get(status, 0) + 1
        if status == "success":
            self.successes += 1
            return
        setattr(self, status, getattr(self, status) + 1)
        self.reasons[row["reason"]] = self.reasons.get(row["reason"], 0) + 1


async def _process_row(
    url: str | None,
    known_error: tuple[Reason, str] | None,
    fetcher: Fetcher,
    resize_cfg: ResizeConfig,
    hashes: list[str],
    decode_pool: ThreadPoolExecutor,
) -> tuple[dict[str, Any], bytes | None]:
    row: dict[str, Any] = {"status": "success"}
    fetched = None
    try:
        if known_error is not None:  # found bad by the reader: counted, never fetched
            raise SampleError(*known_error)
        if not url:
            raise SampleError(Reason.INVALID_URL, "empty URL")
        fetched = await fetcher.fetch(url)
        row.update(
            http_status=fetched.http_status,
            download_bytes=len(fetched.data),
            sha256=fetched.sha256,
            content_type=fetched.content_type,
            final_url=fetched.final_url,
        )
        for name in hashes:
            row[name] = hashlib.new(name, fetched.data).hexdigest()
        loop = asyncio.get_running_loop()
        image: ResizedImage = await loop.run_in_executor(decode_pool, resize_image, fetched.data, resize_cfg)
    except SampleError as error:
        return _record_failure(row, error), None
    except Exception as exc:  # hostile input must never cost the shard: count it, with the type
        reason = Reason.DECODE_ERROR if fetched is not None else Reason.CONNECTION_ERROR
        return _record_failure(row, SampleError(reason, f"unexpected {type(exc).__name__}: {exc}"[:200])), None
    row.update(
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        phash=image.phash,
        luma_std=image.luma_std,
    )
    return row, image.data


def _record_failure(row: dict[str, Any], error: SampleError) -> dict[str, Any]:
    row.update(status=error.reason.pool_status, reason=error.reason.value, error_message=error.detail or None)
    return row


async def _download(
    shard: ShardInput, cfg: IngestConfig, writer: BaseShardWriter, account: _ShardAccount, report: Report | None
) -> None:
    n = cfg.number_sample_per_shard
    resize_cfg = cfg.resize_config()
    hashes = cfg.hash_columns()
    last_report = time.monotonic()
    window = 8 * cfg.thread_count  # rows finished but waiting for an earlier, slower row
    pending: dict[int, tuple[dict[str, Any], bytes | None]] = {}
    next_to_write = 0
    gate = asyncio.Semaphore(cfg.thread_count)  # bounds in-flight requests, hence bytes

    def record(index: int, row: dict[str, Any], image: bytes | None) -> None:
        nonlocal next_to_write, last_report
        row.update(key=sample_key(shard.shard_id, index, n), url=shard.urls[index], caption=shard.captions[index])
        for column, values in shard.extras.items():
            row[column] = values[index]
        pending[index] = (row, image)
        while next_to_write in pending:
            ready_row, ready_image = pending.pop(next_to_write)
            writer.add(ready_row, ready_image)
            account.add(ready_row)
            next_to_write += 1
        if report is not None and time.monotonic() - last_report >= REPORT_INTERVAL_S:
            last_report = time.monotonic()
            report(shard.shard_id, account.count, account.successes)

    async def one(index: int) -> None:
        async with gate:
            row, image = await _process_row(
                shard.urls[index], shard.row_errors.get(index), fetcher, resize_cfg, hashes, decode_pool
            )
        record(index, row, image)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decode_pool:
        async with Fetcher(cfg.fetch_config(), cfg.network_policy()) as fetcher:
            # Start tasks lazily in row order: at most 2 x thread_count exist at once (each
            # frees its slot when done; no scan of all tasks per completion), and a slow
            # row cannot make the reorder buffer grow beyond the window.
            slots = asyncio.Semaphore(2 * cfg.thread_count)
            progressed = asyncio.Event()
            tasks: set[asyncio.Task] = set()
            bugs: list[BaseException] = []

            def finished(task: asyncio.Task) -> None:
                tasks.discard(task)
                slots.release()
                progressed.set()
                if not task.cancelled() and task.exception() is not None:
                    bugs.append(task.exception())

            for index in range(len(shard)):
                await slots.acquire()
                while index - next_to_write >= window and not bugs:
                    progressed.clear()
                    await progressed.wait()
                if bugs:
                    raise bugs[0]  # surface a bug at once instead of at the end
                task = asyncio.create_task(one(index))
                tasks.add(task)
                task.add_done_callback(finished)
            if tasks:
                await asyncio.gather(*tasks)
            if bugs:
                raise bugs[0]


def download_shard(shard: ShardInput, cfg: IngestConfig, report: Report | None = None) -> dict[str, Any]:
    """Download, resize and commit one pool shard; return its stats."""
    start = time.time()
    account = _ShardAccount()
    writer = open_shard_writer(
        cfg.output_format, cfg.output_folder, shard.shard_id, cfg.encode_format, cfg.extra_columns()
    )
    try:
        asyncio.run(_download(shard, cfg, writer, account, report))
        end = time.time()
        stats = {
            "shard": shard_name(shard.shard_id),
            "count": account.count,
            "successes": account.successes,
            "failed_to_download": account.failed_to_download,
            "failed_to_resize": account.failed_to_resize,
            "duration": end - start,
            "start_time": start,
            "end_time": end,
            "status_dict": account.status_dict,
            "reasons": dict(sorted(account.reasons.items())),
            "download_bytes": account.download_bytes,
            "settings": cfg.output_settings(),  # what a rerun must match to reuse this shard (ingest.run)
            "input_fingerprint": shard.fingerprint(),
        }
        writer.commit(stats)
        return stats
    except BaseException:
        writer.close()
        raise
