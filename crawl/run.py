"""The crawl job: archives and seed pages → a folder of pair files ingest reads.

Both run on ``core.executor`` (``CrawlConfig``'s execution options: inline, local
processes, or Ray tasks), Ray started once for both when it is used:

* **Archives**: one unit per WARC/WAT file, each writing ``warc-NNNNN.parquet`` then
  its marker ``warc-NNNNN_stats.json``. A rerun skips the files whose marker names the
  same source, so a killed job loses at most the files in flight. Memory per unit:
  one record and one row group.
* **Seeds**: the hosts are split into ``workers`` partitions (one when inline), and the
  crawl runs in rounds: each round, one unit per partition with links to crawl
  (crawl/worker.py), which follows at once the links it finds to its own hosts, up to
  its share of the page budget, and hands back the others. This driver keeps the
  crawl-wide frontier — which URLs were scheduled, the budget left — and routes the
  links handed back into the next round; the crawl ends when a round hands back
  nothing new. Each unit writes ``seeds-NNNNN.parquet`` (NNNNN: the unit's number);
  they count once ``seeds_stats.json`` exists; a killed seed crawl is redone from the
  seeds (politely: robots.txt and delays apply again).
* ``_crawl_stats.json``, the totals and the config, is written last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from core import storage
from core.config import DataError, to_dict
from core.executor import Execution, Executor
from core.reasons import Reason
from crawl.archive import crawl_warc_file
from crawl.config import CrawlConfig
from crawl.extract import resolve
from crawl.output import STATS_FILE, CrawlStats, PairWriter, write_unit_stats
from crawl.warc import warc_files
from crawl.worker import Assignment, Budget, CrawlWorker, Frontier, Link, Outcome, host_of, owner_of

SEEDS_MARKER = "seeds_stats.json"


# -- seeds -----------------------------------------------------------------------------


def load_seeds(cfg: CrawlConfig) -> list[str]:
    """``--seeds`` then ``--seed_file`` lines (blank lines and ``#`` comments skipped), normalised, unique."""
    raw = list(cfg.seeds)
    if cfg.seed_file:
        try:
            with storage.open_file(cfg.seed_file, "r") as handle:
                raw += [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except FileNotFoundError:
            raise DataError(f"seed_file={cfg.seed_file!r}: no such file") from None
    seeds: list[str] = []
    for value in raw:
        url, problem = resolve(value, value)
        if url is None:
            raise DataError(f"seed {value!r} is not an absolute http(s) URL ({problem.value})")
        if url not in seeds:
            seeds.append(url)
    return seeds


def _part(cfg: CrawlConfig, part: int) -> str:
    return storage.join(cfg.output_folder, f"seeds-{part:05d}.parquet")


def _remove_stale_seed_parts(cfg: CrawlConfig) -> None:
    """Parts of an earlier, unfinished seed crawl must not be read as this one's."""
    for path in storage.list_files(cfg.output_folder, ".parquet"):
        if path.rsplit("/", 1)[-1].startswith("seeds-"):
            storage.remove(path)


_NOT_OUTPUT = {f.name for f in dataclasses.fields(Execution)} | {"incremental_mode", "warc", "seeds", "seed_file",
                                                                 "output_folder"}


def output_settings(cfg: CrawlConfig) -> dict[str, Any]:
    """The options a unit's output depends on: a committed unit made with others is redone."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _NOT_OUTPUT}


def crawl_seed_unit(cfg: CrawlConfig, domains: list[str], assignment: Assignment) -> Outcome:
    """One unit of a seed crawl: a partition's links → its part file. A rerun rewrites the file."""
    return asyncio.run(CrawlWorker(cfg, assignment, _part(cfg, assignment.part), domains).crawl())


def _shares(budget: int, partitions: list[int]) -> dict[int, int]:
    """The budget split between the partitions of a round (the first ones get the remainder)."""
    each, extra = divmod(max(budget, 0), len(partitions))
    return {p: each + (i < extra) for i, p in enumerate(partitions)}


def crawl_seeds(seeds: list[str], cfg: CrawlConfig) -> CrawlStats:
    marker = storage.join(cfg.output_folder, SEEDS_MARKER)
    if cfg.incremental_mode == "incremental" and storage.exists(marker):
        done = storage.read_json(marker)
        refuse_changed(cfg, "the seed crawl", done, {"seeds": seeds})
        return CrawlStats.from_dict(done)
    _remove_stale_seed_parts(cfg)
    domains = cfg.allowed_domains or sorted({host_of(url) for url in seeds})
    hosts = {host_of(url) for url in seeds}
    total = CrawlStats()
    budget = Budget(cfg.max_pages)  # the crawl's; each unit gets a share of what is left
    executor = Executor(cfg, desc="crawl", unit="unit", item="page", postfix=lambda t: {"pairs": t.get("pairs", 0)})
    with executor as ex:
        partitions = max(1, min(ex.workers, len(hosts)))
        frontiers = [Frontier(budget, set(), total) for _ in range(partitions)]  # every URL scheduled, by partition
        robots: list[dict] = [{} for _ in range(partitions)]  # origin -> robots.txt policy, by partition
        handed_back, parts, rounds = [Link(url, 0) for url in seeds], 0, 0
        while handed_back:
            routed: dict[int, list[Link]] = {}
            for link in handed_back:
                owner = owner_of(host_of(link.url), partitions)
                admitted = frontiers[owner].admit(link)
                if admitted:
                    routed.setdefault(owner, []).append(link)
                elif admitted is None:  # the budget is spent, for good
                    total.count(Reason.PAGE_LIMIT.value)
            if not routed:
                break
            shares = _shares(budget.left, sorted(routed))
            units = [Assignment(parts + i, p, partitions, routed[p], shares[p], frontiers[p].scheduled, robots[p])
                     for i, p in enumerate(sorted(routed))]
            parts, rounds, handed_back = parts + len(units), rounds + 1, []
            run = ex.map(partial(crawl_seed_unit, cfg, domains), units, ordered=True, desc=f"crawl: round {rounds}")
            for outcome in run:  # in unit order: which links the budget admits next does not depend on timing
                total.add(outcome.stats)
                handed_back += outcome.links
                frontiers[outcome.partition].scheduled.update(outcome.scheduled)
                budget.left -= len(outcome.scheduled)
                robots[outcome.partition].update(outcome.robots)
    write_unit_stats(marker, total, seeds=seeds, domains=domains, workers=partitions, units=parts, rounds=rounds,
                     settings=output_settings(cfg))
    return total


# -- archives -------------------------------------------------------------------------


def _unit_paths(cfg: CrawlConfig, index: int) -> tuple[str, str]:
    name = f"warc-{index:05d}"
    return storage.join(cfg.output_folder, f"{name}.parquet"), storage.join(cfg.output_folder, f"{name}_stats.json")


def crawl_warc_unit(cfg: CrawlConfig, unit: tuple[int, str]) -> dict[str, Any]:
    """One archive file → its part file, then its marker. Idempotent: a rerun rewrites both."""
    index, source = unit
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


_START_OVER = "to start over, rerun with --incremental_mode overwrite (deletes {folder}) or choose another --output_folder"


def refuse_changed(cfg: CrawlConfig, what: str, made: dict[str, Any], inputs: dict[str, Any]) -> None:
    """A committed unit made from other inputs or with other settings: stop and say what differs."""
    now = output_settings(cfg)
    old = made.get("settings") or {}
    differs = [f"{k} ({made.get(k)!r} -> {v!r})" for k, v in inputs.items() if made.get(k) != v]
    differs += [f"{k} ({old.get(k)!r} -> {v!r})" for k, v in now.items() if old.get(k) != v]
    if differs:
        raise DataError(f"{what} in {cfg.output_folder} was made from other inputs or with other settings: "
                        f"{'; '.join(differs)[:500]}; {_START_OVER.format(folder=cfg.output_folder)}")


def _pending_units(files: list[str], cfg: CrawlConfig, done: Callable[[dict], None]) -> Iterator[tuple[int, str]]:
    committed = {}
    for index, source in enumerate(files):  # every committed unit checked before any work
        marker = _unit_paths(cfg, index)[1]
        if cfg.incremental_mode == "incremental" and storage.exists(marker):
            committed[index] = stats = storage.read_json(marker)
            refuse_changed(cfg, f"unit warc-{index:05d}", stats, {"source": source})
    for index, source in enumerate(files):
        if index in committed:
            done(committed[index])
            continue
        yield index, source


def crawl_archives(files: list[str], cfg: CrawlConfig) -> CrawlStats:
    total = CrawlStats()
    with Executor(cfg, desc="warc", unit="file", total=len(files)) as ex:

        def skipped(stats: dict) -> None:
            total.add(stats)
            ex.skipped()

        pending = list(_pending_units(files, cfg, skipped))  # a list of (index, path): small
        for stats in ex.map(partial(crawl_warc_unit, cfg), pending):
            total.add(stats)
    return total


# -- the job ----------------------------------------------------------------------------


def run_crawl(cfg: CrawlConfig) -> CrawlStats:
    """Archives, then seeds, into ``cfg.output_folder``; returns the totals (also in _crawl_stats.json)."""
    start = time.time()
    seeds = load_seeds(cfg)
    try:
        files = warc_files(cfg.warc) if cfg.warc else []
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    storage.refuse_overlap("output_folder", cfg.output_folder, {"warc": cfg.warc, "seed_file": cfg.seed_file})
    if cfg.incremental_mode == "overwrite" and storage.exists(cfg.output_folder):
        print(f"crawl: incremental_mode=overwrite: deleting {cfg.output_folder} "
              f"({storage.describe_contents(cfg.output_folder)})", file=sys.stderr)
        storage.clear_folder(cfg.output_folder)  # all but its lock (core.lock)
    storage.makedirs(cfg.output_folder)
    total = CrawlStats()
    with Executor(cfg):  # where both run; Ray, when it is used, started once for both (and stopped after)
        if files:
            total.add(crawl_archives(files, cfg))
        if seeds:
            total.add(crawl_seeds(seeds, cfg))
    storage.write_json(
        storage.join(cfg.output_folder, STATS_FILE),
        {**total.to_dict(), "warc_files": len(files), "seeds": len(seeds), "duration": time.time() - start,
         "config": to_dict(cfg)},
    )
    return total
