"""The filter job: pool metadata → one decision per pool row.

Five passes, each a set of independent tasks run by ``core.executor`` (local
processes, Ray tasks, or inline; ``FilterConfig``'s execution options):

    1. facts      one task per pool shard: per-row rules → ``_work/{shard}.parquet``
    2. dup_url    one task per partition of URL fingerprints: first successful copy kept
    3. clip       in the driver: threshold / top fraction over the acceptable rows' scores
    4. dup_exact  one task per partition of image digests: first acceptable copy kept
    5. dup_near   one task per partition of LSH band keys: verified pHash pairs → edges;
                  the driver joins edges into clusters, the first of each is kept
       dup_semantic  (with semantic_dedupe_threshold) one task per pool shard: its acceptable
                  rows' image embeddings against those of every later shard, exact, in blocks;
                  pairs at or above the cosine → edges → clusters, as for dup_near
    6. decisions  one task per pool shard: ``{shard}.parquet`` (key, keep, reason, scores)

Partitions route whole groups (by group key), so a partition task sees every member
of its groups and the rule "smallest row id wins" gives the same answer for any
number of partitions or workers. A partition holds at most ``partition_rows``
entries, which bounds each task's memory whatever the pool size. A task writes whole
files or nothing, so a retried one changes nothing. ``_filter_stats.json`` is written
last: its presence means every decision file is complete.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apply import embeddings as emb
from core import storage
from core.config import to_dict
from core.errors import DataError
from core.executor import Execution, Executor
from core.layout import STATS_SUFFIX, committed_shards, folder_fingerprint, shard_id_of, shard_name, uncommitted_shards
from core.reasons import Reason
from filter.config import FilterConfig
from core.groups import first_of_groups
from filter.dedupe import (
    BandPlan,
    NearGuard,
    band_key,
    candidate_edges,
    components_first,
    partition_of,
    plan_bands,
    unique_edges,
)
from filter.facts import shard_facts

DECISION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),  # the first failing rule (core.reasons), null when kept
        ("dup_of", pa.string()),  # for dup_url / dup_exact / dup_near / dup_semantic: the key of the copy kept
        ("clip_score", pa.float32()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("luma_std", pa.float32()),
    ]
)
STATS_FILE = "_filter_stats.json"
WORK = "_work"


@dataclass
class FilterSummary:
    rows: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    duration: float = 0.0
    passes: dict[str, float] = field(default_factory=dict)
    near_dup_plan: dict[str, Any] = field(default_factory=dict)
    semantic_dup: dict[str, Any] = field(default_factory=dict)
    skipped_checks: list[str] = field(default_factory=list)
    storage_retries: dict[str, int] = field(default_factory=dict)  # object-storage requests retried, workers' too


# -- task bodies: module level, so processes and Ray can ship them; the unit comes last ------


def _facts_task(cfg: FilterConfig, eval_hashes, work: str, shard_id: int) -> dict:
    table, notes = shard_facts(cfg.pool, shard_id, cfg, eval_hashes)
    with storage.atomic_write(storage.join(work, f"{shard_name(shard_id)}.parquet")) as handle:
        pq.write_table(table, handle, compression="zstd")
    open_rows = int(table.column("pre_reason").null_count)
    success = int(np.count_nonzero(table.column("url_fp").to_numpy()))
    return {"rows": table.num_rows, "open": open_rows, "success": success, **notes}


def _read_facts(work: str, shard_id: int, columns: list[str]) -> pa.Table:
    with storage.open_file(storage.join(work, f"{shard_name(shard_id)}.parquet")) as handle:
        return pq.read_table(handle, columns=columns)


def _eligible(table: pa.Table, exclude: np.ndarray) -> np.ndarray:
    """Rows still acceptable: no per-row reason and not rejected by an earlier global pass."""
    mask = table.column("pre_reason").is_null().to_numpy(zero_copy_only=False)
    if len(exclude):
        ids = table.column("row_id").to_numpy()
        mask &= ~np.isin(ids, exclude, assume_unique=False)
    return mask


def _url_partition_task(work: str, shard_ids: list[int], partitions: int, part: int) -> tuple:
    keys, ids = [], []
    for shard_id in shard_ids:
        table = _read_facts(work, shard_id, ["row_id", "url_fp"])
        fp = table.column("url_fp").to_numpy()
        take = (fp != 0) & (partition_of(fp, partitions) == part)
        keys.append(fp[take])
        ids.append(table.column("row_id").to_numpy()[take])
    return first_of_groups(np.concatenate(keys), np.concatenate(ids))


def _exact_partition_task(work: str, shard_ids: list[int], exclude, partitions: int, part: int) -> tuple:
    keys, ids = [], []
    for shard_id in shard_ids:
        table = _read_facts(work, shard_id, ["row_id", "pre_reason", "sha_hi", "sha_lo"])
        hi, lo = table.column("sha_hi").to_numpy(), table.column("sha_lo").to_numpy()
        take = _eligible(table, exclude) & (partition_of(hi, partitions) == part)
        keys.append(np.stack([hi[take], lo[take]], axis=1))
        ids.append(table.column("row_id").to_numpy()[take])
    return first_of_groups(np.concatenate(keys), np.concatenate(ids))


def _near_partition_task(work: str, shard_ids: list[int], exclude, plan: BandPlan, guard: NearGuard,
                         task: tuple[list[int], int, int]) -> tuple:
    """Verified pairs among rows sharing a key in one of ``bands``, sub-partition ``part``.

    Fact files are read one at a time and only this task's entries are kept, so its
    memory is one band's share of the rows (``partition_rows`` at most), not the pool.
    """
    bands, subparts, part = task
    positions = plan.positions()
    entries: dict[str, list[np.ndarray]] = {"key": [], "id": [], "hash": [], "aspect": [], "luma": []}
    for shard_id in shard_ids:
        table = _read_facts(work, shard_id, ["row_id", "pre_reason", "phash", "log_aspect", "luma_std"])
        take = _eligible(table, exclude)
        if not take.any():
            continue
        hashes = table.column("phash").to_numpy()[take]
        ids = table.column("row_id").to_numpy()[take]
        aspect = table.column("log_aspect").to_numpy(zero_copy_only=False)[take].astype(np.float32)
        luma = table.column("luma_std").to_numpy(zero_copy_only=False)[take].astype(np.float32)
        for band in bands:
            keys = band_key(hashes, positions, band)
            mine = partition_of(keys, subparts) == part if subparts > 1 else slice(None)
            for name, values in (("key", keys), ("id", ids), ("hash", hashes), ("aspect", aspect), ("luma", luma)):
                entries[name].append(values[mine])
    if not entries["key"]:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    joined = {name: np.concatenate(values) for name, values in entries.items()}
    left, right = candidate_edges(joined["key"], joined["id"], joined["hash"], plan.threshold,
                                  joined["aspect"], joined["luma"], guard)
    return unique_edges(left, right)


def near_tasks(plan: BandPlan, rows: int, partition_rows: int) -> list[tuple[list[int], int, int]]:
    """(bands, sub-partitions, sub-partition) per task: each holds at most ``partition_rows`` entries."""
    subparts = max(1, math.ceil(rows / partition_rows))
    per_task = max(1, partition_rows // max(1, math.ceil(rows / subparts)))
    groups = [list(range(b, min(b + per_task, plan.bands))) for b in range(0, plan.bands, per_task)]
    return [(group, subparts, part) for group in groups for part in range(subparts)]


def _semantic_rows(embeddings: str, work: str, shard_id: int, exclude) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, unit float32 image embeddings) of a shard's acceptable rows that were embedded."""
    table = _read_facts(work, shard_id, ["row_id", "key", "pre_reason"])
    take = _eligible(table, exclude)
    row_of = dict(zip(np.asarray(table.column("key").to_pylist(), dtype=object)[take].tolist(),
                      table.column("row_id").to_numpy()[take].tolist()))
    keys, vectors = emb.shard_images(embeddings, shard_id)
    found = [(row_of[k], i) for i, k in enumerate(keys) if k in row_of]
    if not found:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    found.sort()
    return np.array([r for r, _ in found], np.int64), vectors[[i for _, i in found]]


def _semantic_task(embeddings: str, work: str, shard_ids: list[int], exclude, threshold: float,
                   index: int) -> tuple:
    """Pairs (a, b), a < b, of acceptable rows of shard ``shard_ids[index]`` and of it or a later shard
    whose image embeddings' cosine is at least ``threshold``. Holds two shards' embeddings at a time."""
    ids, vectors = _semantic_rows(embeddings, work, shard_ids[index], exclude)
    left, right = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    if len(ids):
        for other in shard_ids[index:]:
            same = other == shard_ids[index]
            other_ids, other_vectors = (ids, vectors) if same else _semantic_rows(embeddings, work, other, exclude)
            if not len(other_ids):
                continue
            for i, j in emb.pairs_at_least(vectors, other_vectors, threshold, same):
                left.append(np.minimum(ids[i], other_ids[j]))
                right.append(np.maximum(ids[i], other_ids[j]))
    return unique_edges(np.concatenate(left), np.concatenate(right))


def _decisions_task(cfg: FilterConfig, work: str, unit: tuple[int, dict[str, tuple]]) -> dict:
    shard_id, rejected = unit
    table = _read_facts(work, shard_id, ["row_id", "key", "pre_reason", "clip_score", "language",
                                         "language_score", "luma_std"])
    ids = table.column("row_id").to_numpy()
    keys = table.column("key").to_pylist()
    reasons = table.column("pre_reason").to_pylist()
    dup_of: list[str | None] = [None] * len(keys)
    digits = {len(k) - 5 for k in keys if k}
    width = digits.pop() if len(digits) == 1 else 4
    for reason in (Reason.DUP_URL, Reason.LOW_CLIP_SCORE, Reason.CLIP_SCORE_MISSING, Reason.DUP_EXACT,
                   Reason.DUP_NEAR, Reason.DUP_SEMANTIC):  # the global passes, in rule order
        if reason.value not in rejected:
            continue
        rows, keepers = rejected[reason.value]
        position = {int(r): int(k) for r, k in zip(rows, keepers)}
        for index, row in enumerate(ids.tolist()):
            if reasons[index] is None and row in position:
                reasons[index] = reason.value
                keeper = position[row]
                if keeper >= 0:
                    dup_of[index] = f"{keeper >> 32:05d}{keeper & 0xFFFFFFFF:0{width}d}"
    keep = [r is None for r in reasons]
    out = pa.table(
        {
            "key": keys,
            "keep": keep,
            "reason": pa.array(reasons, pa.string()),
            "dup_of": pa.array(dup_of, pa.string()),
            "clip_score": table.column("clip_score"),
            "language": table.column("language"),
            "language_score": table.column("language_score"),
            "luma_std": table.column("luma_std"),
        },
        schema=DECISION_SCHEMA,
    )
    with storage.atomic_write(storage.join(cfg.output_folder, f"{shard_name(shard_id)}.parquet")) as handle:
        pq.write_table(out, handle, compression="zstd")
    counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    return {"rows": len(keys), "kept": sum(keep), "reasons": counts}


# -- the job ------------------------------------------------------------------------------


_NOT_DECISIONS = {f.name for f in dataclasses.fields(Execution)} | {"output_folder", "overwrite", "partition_rows"}


def decision_settings(cfg: FilterConfig) -> dict[str, Any]:
    """The options the decisions depend on (not where or how fast they run)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _NOT_DECISIONS}


def committed_or_files(folder: str) -> set[int]:
    """Shard ids with a parquet file in ``folder``."""
    return {i for i in (shard_id_of(p) for p in storage.list_files(folder, ".parquet")) if i is not None}


def _check_previous(cfg: FilterConfig, identity: dict[str, Any]) -> None:
    """Decisions already in output_folder from another pool or other settings: stop, unless --overwrite."""
    stats_path = storage.join(cfg.output_folder, STATS_FILE)
    if not storage.exists(stats_path):
        return
    previous = storage.read_json(stats_path)
    differs = [k for k in ("pool_fingerprint",) if previous.get(k) != identity[k]]
    old = previous.get("settings", {})
    differs += [f"{k} ({old.get(k)!r} -> {v!r})" for k, v in identity["settings"].items() if old.get(k) != v]
    if not differs:
        return  # the same pool and settings: the same decisions, rewritten
    if not cfg.overwrite:
        raise DataError(f"output_folder={cfg.output_folder!r} holds decisions made from another pool or with other "
                        f"settings (differs in: {', '.join(differs)[:400]}); choose another output_folder or rerun "
                        "with --overwrite true to replace them")
    print(f"filter: overwrite: replacing the decisions in {cfg.output_folder} "
          f"({len(committed_or_files(cfg.output_folder))} shard files; differs in: {', '.join(differs)[:200]})",
          file=sys.stderr)


def run_filter(cfg: FilterConfig) -> FilterSummary:
    start, retries = time.time(), storage.retry_counts()
    storage.refuse_overlap("output_folder", cfg.output_folder, {
        "pool": cfg.pool, "embeddings": cfg.embeddings or None, "clip_scores": cfg.clip_scores or None,
        "decontaminate": cfg.decontaminate or None})
    shard_ids = sorted(committed_shards(cfg.pool))
    if not shard_ids:
        raise SystemExit(f"filter: no committed pool shards in {cfg.pool!r} (run ingest first)")
    uncommitted = uncommitted_shards(cfg.pool)
    if uncommitted:
        raise DataError(f"pool={cfg.pool!r}: shards {', '.join(uncommitted[:5])}{' …' if len(uncommitted) > 5 else ''} "
                        "have files but no commit marker (_stats.json): an ingest was killed or is still running; "
                        "rerun the ingest command to finish them, then filter")
    if cfg.clip_scores:
        scored = committed_or_files(cfg.clip_scores)
        if not scored & set(shard_ids):
            raise DataError(f"clip_scores={cfg.clip_scores!r}: no score file of this pool's shards there (the folder "
                            "is missing, empty or made from another pool); run `python -m filter.clipscore "
                            f"--pool {cfg.pool} --output_folder {cfg.clip_scores}`")
    identity = {"pool_fingerprint": folder_fingerprint(cfg.pool, shard_ids, (".parquet", STATS_SUFFIX)),
                "settings": decision_settings(cfg)}
    _check_previous(cfg, identity)
    if cfg.embeddings:
        made_over = emb.read_manifest(cfg.embeddings)["shards"]  # DataError unless a finished folder
        if not set(made_over) & {str(s) for s in shard_ids}:
            raise DataError(f"embeddings={cfg.embeddings!r}: holds no shard of pool {cfg.pool!r} (it was made over "
                            "another folder); run `python -m apply.embed --shards POOL` for this pool")
    storage.makedirs(cfg.output_folder)
    stats_path = storage.join(cfg.output_folder, STATS_FILE)
    if storage.exists(stats_path):
        storage.remove(stats_path)  # decisions are being rewritten: not complete until the end
    work = storage.join(cfg.output_folder, WORK)
    storage.makedirs(work)
    eval_hashes = None
    if cfg.decontaminate:
        from filter.decontaminate import load_eval_hashes

        eval_hashes = load_eval_hashes(cfg.decontaminate)
    summary = FilterSummary()
    with Executor(cfg, desc="filter", unit="task") as ex:
        _passes(cfg, ex, shard_ids, work, eval_hashes, summary)
    storage.remove(work)
    summary.duration = time.time() - start
    summary.storage_retries = storage.retries_since(retries)
    storage.write_json(stats_path, {
        "rows": summary.rows,
        "kept": summary.kept,
        "rejected": summary.rows - summary.kept,
        "reasons": dict(sorted(summary.reasons.items())),
        "pool_shards": [shard_name(i) for i in shard_ids],
        "near_dup_plan": summary.near_dup_plan,
        "semantic_dup": summary.semantic_dup,
        "skipped_checks": summary.skipped_checks,
        "eval_images": 0 if eval_hashes is None else len(eval_hashes),
        "pass_seconds": summary.passes,
        "config": to_dict(cfg),
        **identity,
        "duration": summary.duration,
        **summary.storage_retries,
    })
    return summary


def _timed(summary: FilterSummary, name: str):
    class _Timer:
        def __enter__(self):
            self.t = time.time()

        def __exit__(self, *exc):
            summary.passes[name] = round(time.time() - self.t, 3)

    return _Timer()


def _partitions(entries: int, cfg: FilterConfig) -> int:
    return max(1, math.ceil(entries / cfg.partition_rows))


def _join(results: Iterable[tuple]) -> tuple[np.ndarray, np.ndarray]:
    results = list(results)
    if not results:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _run(ex: Executor, name: str, fn, units: list) -> list:
    """One pass: ``fn`` on every unit, the results in the units' order.

    What the units share is bound into ``fn`` (``partial``): it travels to each worker
    once per pass, not with every unit.
    """
    return list(ex.map(fn, units, ordered=True, desc=f"filter: {name}"))


def _passes(cfg: FilterConfig, ex: Executor, shard_ids: list[int], work: str, eval_hashes,
            summary: FilterSummary) -> None:
    with _timed(summary, "facts"):
        facts = _run(ex, "facts", partial(_facts_task, cfg, eval_hashes, work), shard_ids)
    skipped = sorted({note for f in facts for note in f.get("skipped_checks", [])})
    summary.skipped_checks = skipped
    open_rows = sum(f["open"] for f in facts)
    success_rows = sum(f["success"] for f in facts)
    rejected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    excluded = np.empty(0, np.int64)

    if cfg.dedupe_url:
        with _timed(summary, "dup_url"):
            n = _partitions(success_rows, cfg)
            rejected[Reason.DUP_URL.value] = _join(_run(
                ex, "dup_url", partial(_url_partition_task, work, shard_ids, n), list(range(n))))
        excluded = np.union1d(excluded, rejected[Reason.DUP_URL.value][0])

    if cfg.uses_clip:
        with _timed(summary, "clip"):
            low, missing = _clip_rule(cfg, work, shard_ids, excluded)
        rejected[Reason.LOW_CLIP_SCORE.value] = (low, np.full(len(low), -1, np.int64))
        rejected[Reason.CLIP_SCORE_MISSING.value] = (missing, np.full(len(missing), -1, np.int64))
        excluded = np.union1d(excluded, np.concatenate([low, missing]))

    if cfg.dedupe_exact:
        with _timed(summary, "dup_exact"):
            n = _partitions(open_rows, cfg)
            rejected[Reason.DUP_EXACT.value] = _join(_run(
                ex, "dup_exact", partial(_exact_partition_task, work, shard_ids, excluded, n), list(range(n))))
        excluded = np.union1d(excluded, rejected[Reason.DUP_EXACT.value][0])

    if cfg.dedupe_near:
        with _timed(summary, "dup_near"):
            rejected[Reason.DUP_NEAR.value], summary.near_dup_plan = near_duplicate_pass(
                cfg, ex, work, shard_ids, excluded, open_rows)
        excluded = np.union1d(excluded, rejected[Reason.DUP_NEAR.value][0])

    if cfg.semantic_dedupe_threshold is not None:
        with _timed(summary, "dup_semantic"):
            left, right = unique_edges(*_join(_run(ex, "dup_semantic", partial(
                _semantic_task, cfg.embeddings, work, shard_ids, excluded, cfg.semantic_dedupe_threshold),
                list(range(len(shard_ids))))))
            rejected[Reason.DUP_SEMANTIC.value] = components_first(left, right)
        summary.semantic_dup = {"threshold": cfg.semantic_dedupe_threshold, "pairs": len(left),
                                "tasks": len(shard_ids)}

    with _timed(summary, "decisions"):
        per_shard = _split_by_shard(rejected, shard_ids)
        results = _run(ex, "decisions", partial(_decisions_task, cfg, work), [(s, per_shard[s]) for s in shard_ids])
    for result in results:
        summary.rows += result["rows"]
        summary.kept += result["kept"]
        for reason, n in result["reasons"].items():
            summary.reasons[reason] = summary.reasons.get(reason, 0) + n
    summary.shards = len(shard_ids)


def near_duplicate_pass(cfg: FilterConfig, ex: Executor, work: str, shard_ids: list[int], excluded: np.ndarray,
                        open_rows: int) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """((rejected row ids, keeper row ids), what was done) for the pHash clusters."""
    plan = plan_bands(open_rows, cfg.near_dup_threshold, cfg.near_dup_recall, cfg.near_dup_bands,
                      cfg.near_dup_band_bits)
    guard = NearGuard(cfg.near_dup_max_aspect_change, cfg.near_dup_max_luma_change)
    tasks = near_tasks(plan, open_rows, cfg.partition_rows)
    left, right = _join(_run(ex, "dup_near", partial(_near_partition_task, work, shard_ids, excluded, plan, guard),
                             tasks))
    left, right = unique_edges(left, right)
    info = {
        "bands": plan.bands, "bits_per_band": plan.bits, "threshold": plan.threshold, "tasks": len(tasks),
        "candidate_recall_at_threshold": round(plan.recall_at(plan.threshold), 4), "verified_pairs": len(left),
    }
    return components_first(left, right), info


def _clip_rule(cfg: FilterConfig, work: str, shard_ids: list[int], excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows below the CLIP bar, acceptable rows without a score)."""
    ids, scores = [], []
    for shard_id in shard_ids:
        table = _read_facts(work, shard_id, ["row_id", "pre_reason", "clip_score"])
        take = _eligible(table, excluded)
        ids.append(table.column("row_id").to_numpy()[take])
        scores.append(table.column("clip_score").to_numpy(zero_copy_only=False)[take].astype(np.float64))
    ids_all, score_all = np.concatenate(ids), np.concatenate(scores)
    missing = np.isnan(score_all)
    low = np.zeros(len(ids_all), dtype=bool)
    if cfg.clip_threshold is not None:
        low |= score_all < cfg.clip_threshold
    if cfg.clip_top_fraction:
        scored = ~missing & ~low
        keep_n = int(math.floor(cfg.clip_top_fraction * int((~missing).sum())))
        if keep_n < scored.sum():
            # Rank by (score desc, row id asc): ties are broken by key order, deterministically.
            candidates = np.flatnonzero(scored)
            order = np.lexsort((ids_all[candidates], -score_all[candidates]))
            low[candidates[order[keep_n:]]] = True
    return ids_all[low & ~missing], ids_all[missing]


def _split_by_shard(rejected: dict[str, tuple[np.ndarray, np.ndarray]], shard_ids: list[int]) -> dict[int, dict]:
    out: dict[int, dict] = {s: {} for s in shard_ids}
    for reason, (rows, keepers) in rejected.items():
        shard_of = rows >> 32
        for s in np.unique(shard_of).tolist():
            take = shard_of == s
            if s in out:
                out[s][reason] = (rows[take], keepers[take])
    return out


def load_decisions(decisions: str, shard_id: int) -> dict[str, bool]:
    """key → keep for one pool shard."""
    with storage.open_file(storage.join(decisions, f"{shard_name(shard_id)}.parquet")) as handle:
        table = pq.read_table(handle, columns=["key", "keep"])
    return dict(zip(table.column("key").to_pylist(), table.column("keep").to_pylist()))
