"""The crawl job: archives and seed pages → a folder of pair files ingest reads.

* **Archives**: one unit per WARC/WAT file (a Ray task, or inline), each writing
  ``warc-NNNNN.parquet`` then its marker ``warc-NNNNN_stats.json``. A rerun skips the
  files whose marker names the same source, so a killed job loses at most the files
  in flight. Memory per task: one record and one row group.
* **Seeds**: ``processes_count`` crawl workers (Ray async actors, or one worker in
  this process), each owning a share of the hosts. This driver keeps the crawl-wide
  frontier — which URLs were scheduled, the page budget — and routes every link to
  the worker owning its host. The seed crawl is one unit: its parts
  ``seeds-NNNNN.parquet`` count once ``seeds_stats.json`` exists; a killed seed crawl
  is redone from the seeds (politely: robots.txt and delays apply again).
* ``_crawl_stats.json``, the totals and the config, is written last.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from core import storage
from core.cluster import init_ray
from core.config import ConfigError, to_dict
from core.reasons import Reason
from crawl.archive import crawl_warc_file
from crawl.config import CrawlConfig
from crawl.extract import resolve
from crawl.output import STATS_FILE, CrawlStats, PairWriter, write_unit_stats
from crawl.warc import warc_files
from crawl.worker import CrawlWorker, Link, StepReport, host_of, owner_of

SEEDS_MARKER = "seeds_stats.json"


def _progress_enabled(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting


def _bar(total: int | None, unit: str, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


# -- seeds -----------------------------------------------------------------------------


def load_seeds(cfg: CrawlConfig) -> list[str]:
    """``--seeds`` then ``--seed_file`` lines (blank lines and ``#`` comments skipped), normalised, unique."""
    raw = list(cfg.seeds)
    if cfg.seed_file:
        try:
            with storage.open_file(cfg.seed_file, "r") as handle:
                raw += [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except FileNotFoundError:
            raise ConfigError(f"seed_file={cfg.seed_file!r}: no such file") from None
    seeds: list[str] = []
    for value in raw:
        url, problem = resolve(value, value)
        if url is None:
            raise ConfigError(f"seed {value!r} is not an absolute http(s) URL ({problem.value})")
        if url not in seeds:
            seeds.append(url)
    return seeds


class Frontier:
    """The crawl-wide frontier: every URL scheduled once, at most ``max_pages`` of them."""

    def __init__(self, workers: int, max_pages: int):
        self.workers = workers
        self.max_pages = max_pages
        self.stats = CrawlStats()
        self._scheduled: set[str] = set()

    def route(self, links: list[Link]) -> dict[int, list[Link]]:
        """New links by owning worker; already-scheduled URLs are dropped, over-budget ones counted.

        A redirect whose target was already scheduled ends its page as ``dup_url``: the
        target is (or was) crawled on its own, and a redirect loop ends at its first repeat.
        """
        routed: dict[int, list[Link]] = {}
        for link in links:
            if link.url in self._scheduled:
                if link.hops:  # a redirect to a URL already scheduled (a loop, or a known page): its page ends here
                    self.stats.pages += 1
                    self.stats.count(Reason.DUP_URL.value)
                continue
            if len(self._scheduled) >= self.max_pages:
                self.stats.count(Reason.PAGE_LIMIT.value)
                continue
            self._scheduled.add(link.url)
            self.stats.links_followed += 1
            routed.setdefault(owner_of(host_of(link.url), self.workers), []).append(link)
        return routed


StepFn = Callable[[int, list[Link]], "asyncio.Future[StepReport]"]


async def drive(step: StepFn, workers: int, frontier: Frontier, seeds: list[str],
                on_report: Callable[[int, StepReport], None]) -> None:
    """Route links between workers until every worker is idle and nothing is left to hand out."""
    outbox = frontier.route([Link(url, 0) for url in seeds])
    idle = [True] * workers
    in_flight: dict[asyncio.Future, int] = {}

    def send(worker: int) -> None:
        in_flight[asyncio.ensure_future(step(worker, outbox.pop(worker, [])))] = worker

    for worker in range(workers):
        send(worker)
    while in_flight:
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            worker = in_flight.pop(future)
            report = future.result()
            idle[worker] = report.idle
            on_report(worker, report)
            for owner, links in frontier.route(report.links).items():
                outbox.setdefault(owner, []).extend(links)
        busy = set(in_flight.values())
        for worker in range(workers):
            if worker not in busy and (outbox.get(worker) or not idle[worker]):
                send(worker)


def _part(cfg: CrawlConfig, worker: int) -> str:
    return storage.join(cfg.output_folder, f"seeds-{worker:05d}.parquet")


def _remove_stale_seed_parts(cfg: CrawlConfig) -> None:
    """Parts of an earlier, unfinished seed crawl must not be read as this one's."""
    for path in storage.list_files(cfg.output_folder, ".parquet"):
        if path.rsplit("/", 1)[-1].startswith("seeds-"):
            storage.remove(path)


_EXECUTION_OPTIONS = ("progress", "processes_count", "distributor", "ray_address", "incremental_mode",
                      "max_unit_retry", "warc", "seeds", "seed_file", "output_folder")


def output_settings(cfg: CrawlConfig) -> dict[str, Any]:
    """The options a unit's output depends on: a committed unit made with others is redone."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _EXECUTION_OPTIONS}


def crawl_seeds(seeds: list[str], cfg: CrawlConfig, enabled: bool) -> CrawlStats:
    marker = storage.join(cfg.output_folder, SEEDS_MARKER)
    if cfg.incremental_mode == "incremental" and storage.exists(marker):
        done = storage.read_json(marker)
        if done.get("seeds") == seeds and done.get("settings") == output_settings(cfg):
            return CrawlStats.from_dict(done)
    _remove_stale_seed_parts(cfg)
    domains = cfg.allowed_domains or sorted({host_of(url) for url in seeds})
    hosts = {host_of(url) for url in seeds}
    workers = 1 if cfg.distributor == "inline" else max(1, min(_slots(cfg), len(hosts)))
    frontier = Frontier(workers, cfg.max_pages)
    bar = _bar(cfg.max_pages, "page", "crawl", enabled)
    pages = [0] * workers

    def on_report(worker: int, report: StepReport) -> None:
        pages[worker] = report.pages
        bar.update(sum(pages) - bar.n)

    try:
        if cfg.distributor == "inline":
            results = asyncio.run(_crawl_inline(cfg, domains, frontier, seeds, on_report))
        else:
            results = _crawl_on_ray(cfg, domains, workers, frontier, seeds, on_report)
    finally:
        bar.close()
    total = CrawlStats()
    for result in results:
        total.add(result)
    total.add(frontier.stats)
    write_unit_stats(marker, total, seeds=seeds, domains=domains, workers=workers, settings=output_settings(cfg))
    return total


async def _crawl_inline(cfg, domains, frontier, seeds, on_report) -> list[dict]:
    worker = CrawlWorker(cfg, 0, _part(cfg, 0), domains)
    try:
        await drive(lambda _, links: worker.step(links), 1, frontier, seeds, on_report)
    except BaseException:
        await worker.finish(commit=False)
        raise
    return [await worker.finish()]


def _crawl_on_ray(cfg, domains, workers, frontier, seeds, on_report) -> list[dict]:
    import ray

    actor_class = ray.remote(num_cpus=1, max_restarts=0)(CrawlWorker)
    actors = [actor_class.remote(cfg, i, _part(cfg, i), domains) for i in range(workers)]
    try:
        asyncio.run(drive(lambda i, links: asyncio.wrap_future(actors[i].step.remote(links).future()),
                          workers, frontier, seeds, on_report))
        return ray.get([actor.finish.remote() for actor in actors])
    except BaseException:
        for actor in actors:  # drop what each wrote; an actor that died has nothing to drop
            try:
                ray.get(actor.finish.remote(commit=False))
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    finally:
        for actor in actors:
            ray.kill(actor)


# -- archives -------------------------------------------------------------------------


def _unit_paths(cfg: CrawlConfig, index: int) -> tuple[str, str]:
    name = f"warc-{index:05d}"
    return storage.join(cfg.output_folder, f"{name}.parquet"), storage.join(cfg.output_folder, f"{name}_stats.json")


def crawl_warc_unit(index: int, source: str, cfg: CrawlConfig) -> dict[str, Any]:
    """One archive file → its part file, then its marker. Idempotent: a rerun rewrites both."""
    part, marker = _unit_paths(cfg, index)
    stats = CrawlStats()
    writer = PairWriter(part)
    try:
        crawl_warc_file(source, cfg, writer, stats)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    write_unit_stats(marker, stats, source=source, unit=index, settings=output_settings(cfg))
    return stats.to_dict()


def _pending_units(files: list[str], cfg: CrawlConfig, done: Callable[[dict], None]) -> Iterator[tuple[int, str]]:
    for index, source in enumerate(files):
        marker = _unit_paths(cfg, index)[1]
        if cfg.incremental_mode == "incremental" and storage.exists(marker):
            stats = storage.read_json(marker)
            if stats.get("source") == source and stats.get("settings") == output_settings(cfg):
                done(stats)
                continue
        yield index, source


def crawl_archives(files: list[str], cfg: CrawlConfig, enabled: bool) -> CrawlStats:
    total = CrawlStats()
    bar = _bar(len(files), "file", "warc", enabled)

    def done(stats: dict) -> None:
        total.add(stats)
        bar.update()
        bar.set_postfix(pages=total.pages, pairs=total.pairs, refresh=False)

    try:
        units = _pending_units(files, cfg, done)
        if cfg.distributor == "inline":
            for index, source in units:
                done(crawl_warc_unit(index, source, cfg))
        else:
            _archives_on_ray(units, cfg, done)
    finally:
        bar.close()
    return total


def _archives_on_ray(units: Iterator[tuple[int, str]], cfg: CrawlConfig, done: Callable[[dict], None]) -> None:
    import ray

    task = ray.remote(num_cpus=1, max_retries=cfg.max_unit_retry, retry_exceptions=True)(crawl_warc_unit)
    limit = 2 * _slots(cfg)
    in_flight: list = []
    for index, source in units:
        while len(in_flight) >= limit:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            done(ray.get(ready[0]))
        in_flight.append(task.remote(index, source, cfg))
    while in_flight:
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        done(ray.get(ready[0]))


# -- the job ----------------------------------------------------------------------------


def _slots(cfg: CrawlConfig) -> int:
    import ray

    return cfg.processes_count or max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_crawl(cfg: CrawlConfig) -> CrawlStats:
    """Archives, then seeds, into ``cfg.output_folder``; returns the totals (also in _crawl_stats.json)."""
    start = time.time()
    seeds = load_seeds(cfg)
    try:
        files = warc_files(cfg.warc) if cfg.warc else []
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.incremental_mode == "overwrite":
        storage.remove(cfg.output_folder)
    storage.makedirs(cfg.output_folder)
    enabled = _progress_enabled(cfg.progress)
    total = CrawlStats()

    started_ray = cfg.distributor == "ray" and init_ray(cfg.ray_address, cfg.processes_count)
    try:
        if files:
            total.add(crawl_archives(files, cfg, enabled))
        if seeds:
            total.add(crawl_seeds(seeds, cfg, enabled))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    storage.write_json(
        storage.join(cfg.output_folder, STATS_FILE),
        {**total.to_dict(), "warc_files": len(files), "seeds": len(seeds), "duration": time.time() - start,
         "config": to_dict(cfg)},
    )
    return total
