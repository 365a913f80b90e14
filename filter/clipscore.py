"""CLIP score of every pool sample: the cosine of its stored image and caption embeddings.

The filter's ``low_clip_score`` rule (a threshold, or keep the top fraction) needs one
number per sample. It comes from the embed stage (``apply.embed``), the one model pass
over the pool: a sample's score is the cosine of its image and text embeddings there.
The filter reads an embeddings folder directly (``--embeddings``); this command embeds
the pool if it is not embedded yet and writes the scores as files of their own, with
the reason of every sample that has none and a summary to choose a threshold from::

    {output_folder}/embeddings/              the embeddings (``--embeddings`` to put them elsewhere)
    {output_folder}/{shard:05d}.parquet    per committed pool shard, in key order:
        key          string   the pool key
        clip_score   float32  cosine of the image and text embeddings; null on failure
        score_error  string   a core.reasons code (decode_error, caption_missing, ...); null on success
    {output_folder}/_clipscore_stats.json  written last, only once every committed pool
                                           shard has its score file: counts per reason, a score
                                           histogram and quantiles, the checkpoint and the config

* **One row per pool success row, never a silent drop.** A sample the embed stage left
  out gets a null score and its reason; a success row of the pool parquet that the tar
  does not hold (a cut tar) gets ``shard_error`` or ``image_missing``.
* **Resumable, and never mixed.** Each score file is written atomically and names the
  checkpoint that produced it in its parquet metadata; a rerun skips the files it finds,
  recomputes missing ones (from the embeddings: no model pass for a shard already
  embedded), and refuses a folder holding another checkpoint's.

Run ``python -m filter.clipscore --help``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apply import embeddings as emb
from apply.options import WorkerModelOptions
from apply.embed import EmbedConfig, EmbedError, checkpoint_file, run_embed, same_folder
from core import outcome, storage
from core.config import ConfigError, DataError, option, parse_config, problem, require, to_dict
from core.executor import Execution
from core.layout import committed_shards, shard_id_of, shard_name
from train.data import Skip

log = logging.getLogger(__name__)

STATS_NAME = "_clipscore_stats.json"
METADATA_KEY = b"webclip.clipscore"  # parquet schema metadata: which checkpoint made the scores
SCORE_SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("score_error", pa.string())])
HISTOGRAM_BINS = 200  # over [-1, 1]: quantiles in the stats are exact to 0.01
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def score_path(output_folder: str, shard_id: int) -> str:
    """Where the scores of pool shard ``shard_id`` go."""
    return storage.join(output_folder, f"{shard_name(shard_id)}.parquet")


# -- config ------------------------------------------------------------------------------------


@dataclass
class ClipScoreConfig(WorkerModelOptions, Execution):
    """The scorer's options: the embed stage's model options, and this command's folders."""

    ALIASES: ClassVar[dict[str, str]] = {"threads_per_actor": "threads_per_worker", "gpus_per_actor": "gpus_per_worker"}

    workers: int = option(
        0, "embedding workers, each loading the model once: 0 = one per GPU (/ gpus_per_worker) when there are "
        "GPUs and device allows, else one per CPU less one"
    )  # fmt: skip
    pool: str = option("", "pool folder written by ingest, webdataset layout (local or s3://)")
    output_folder: str = option(
        "", "where {shard}.parquet score files and _clipscore_stats.json go (local or s3://); a folder "
        "of its own, not the pool's or the filter's"
    )  # fmt: skip
    embeddings: str = option(
        "", "the pool's embeddings folder (python -m apply.embed's layout), made here if not done yet; "
        "empty = {output_folder}/embeddings"
    )  # fmt: skip
    actors: int | None = option(
        None, "the old name of workers, kept for its command lines: -1 = --workers 0 (automatic), "
        "0 = --distributor inline (in this process), N = --workers N"
    )  # fmt: skip

    def __post_init__(self) -> None:
        self._take_actors()
        super().__post_init__()
        require(self, "pool", "output_folder")
        if self.pool and self.output_folder and same_folder(self.pool, self.output_folder):
            problem(f"output_folder={self.output_folder!r}: is the pool; score files would replace "
                    "the pool's parquet files")  # fmt: skip
        if self.output_folder and not self.embeddings:
            self.embeddings = storage.join(self.output_folder, "embeddings")

    def _take_actors(self) -> None:
        """``actors`` said as the execution options (then it is None): it never means anything else."""
        if self.actors is None:
            return
        if self.actors < -1:
            problem(f"actors={self.actors}: -1 (automatic), 0 (in this process) or a positive count")
        elif self.workers and self.actors != -1:
            problem(f"actors={self.actors} and workers={self.workers}: give one (actors is the old name of workers)")
        elif self.actors == 0:
            self.distributor = "inline"
        elif self.actors > 0:
            self.workers = self.actors
        self.actors = None

    def embed_config(self) -> EmbedConfig:
        """The embed stage's config for this pool: the same model and execution options."""
        shared = {f.name: getattr(self, f.name) for f in fields(WorkerModelOptions) + fields(Execution)}
        return EmbedConfig(**shared, shards=self.pool, output_folder=self.embeddings)


# -- one shard's scores, from its embeddings ------------------------------------------------------


def _expected_keys(pool: str, shard_id: int) -> list[str]:
    """Keys of the pool parquet's success rows: each must end with a score row."""
    path = storage.join(pool, f"{shard_name(shard_id)}.parquet")
    if not storage.exists(path):
        return []  # a pool without per-row metadata: the tar alone says what there is
    with storage.open_file(path, "rb") as handle:
        table = pq.read_table(handle, columns=["key", "status"])
    return [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "success"]


def score_table(pool: str, embeddings: str, shard_id: int, scorer: dict[str, Any]) -> pa.Table:
    """Pool shard ``shard_id``'s score rows, in key order, from its embeddings."""
    expected = _expected_keys(pool, shard_id)  # first: an unreadable parquet fails the shard at once
    done = storage.read_json(emb.done_path(embeddings, shard_id))
    rows: dict[str, tuple[float | None, str | None]] = {
        key: (None, reason) for key, reason in done.get("failed", {}).items()
    }
    rows.update((key, (score, None)) for key, score in emb.shard_scores(embeddings, shard_id).items())
    # A success row whose sample the tar does not hold: lost to damage, or never written.
    lost = Skip.SHARD_ERROR if done.get("skipped", {}).get(Skip.SHARD_ERROR) else Skip.IMAGE_MISSING
    for key in expected:
        rows.setdefault(key, (None, lost))
    keys = sorted(rows)
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array([rows[k][0] for k in keys], pa.float32()),
            pa.array([rows[k][1] for k in keys], pa.string()),
        ],
        schema=SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(scorer).encode()}),
    )


def read_scores(path: str) -> tuple[pa.Table, dict[str, Any]]:
    """A score file's table and the scorer description it was written with."""
    with storage.open_file(path, "rb") as handle:
        table = pq.read_table(handle)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return table, (json.loads(raw) if raw else {})


def summarise(scores: pa.Array, errors: pa.Array) -> dict[str, Any]:
    """Counts, errors by reason and a score histogram of one score file: what the stats add up."""
    values = scores.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
    values = values[np.isfinite(values)]
    histogram, _ = np.histogram(np.clip(values, -1.0, 1.0), bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return {
        "samples": len(scores),
        "scored": len(values),
        "errors": dict(Counter(e for e in errors.to_pylist() if e is not None)),
        "score_sum": float(values.sum()),
        "histogram": histogram.tolist(),
    }


# -- the run -------------------------------------------------------------------------------------


@dataclass
class ClipScoreSummary:
    shards: int  # committed pool shards, all of which now have a score file
    shards_scored_now: int  # of which this run scored
    samples: int
    scored: int
    errors: dict[str, int]
    duration: float


class ClipScoreError(RuntimeError):
    """Some shards failed; the others are written, and a rerun retries only the failed ones."""

    def __init__(self, message: str, failed: dict[int, str] | None = None):
        super().__init__(message)
        self.failed = failed or {}  # shard id -> what went wrong


class _Totals:
    def __init__(self) -> None:
        self.samples = self.scored = 0
        self.score_sum = 0.0
        self.errors: Counter = Counter()
        self.histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add(self, summary: dict[str, Any]) -> None:
        self.samples += summary["samples"]
        self.scored += summary["scored"]
        self.score_sum += summary["score_sum"]
        self.errors.update(summary["errors"])
        self.histogram += np.asarray(summary["histogram"], dtype=np.int64)

    def sparse_histogram(self) -> dict[str, Any]:
        """Non-empty bins only, each named by its lower edge: short enough to read."""
        width = 2.0 / HISTOGRAM_BINS
        counts = {f"{round(-1.0 + i * width, 2) + 0.0:.2f}": int(n) for i, n in enumerate(self.histogram) if n}
        return {"bin_width": width, "counts_by_lower_edge": counts}

    def quantiles(self) -> dict[str, float | None]:
        """Score quantiles from the histogram: the upper edge of the bin where each falls."""
        cumulative = np.cumsum(self.histogram)
        edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
        if not self.scored:
            return {f"p{round(q * 100)}": None for q in QUANTILES}
        return {f"p{round(q * 100)}": round(float(edges[np.searchsorted(cumulative, q * self.scored) + 1]), 4)
                for q in QUANTILES}  # fmt: skip


def _existing_scores(cfg: ClipScoreConfig, shards: list[int], checkpoint: str) -> dict[int, dict[str, Any]]:
    """Summaries of the score files already there, which must come from ``checkpoint``."""
    present = {shard_id_of(p) for p in storage.list_files(cfg.output_folder, ".parquet")}
    done = {}
    for shard_id in shards:
        if shard_id not in present:
            continue
        path = score_path(cfg.output_folder, shard_id)
        table, info = read_scores(path)
        if info.get("checkpoint") != checkpoint:
            raise ConfigError(
                f"output_folder={cfg.output_folder!r}: {path} holds scores of checkpoint "
                f"{info.get('checkpoint')!r}, not of {checkpoint!r}; use another output_folder, or delete "
                "its score files to rescore"
            )
        done[shard_id] = summarise(table["clip_score"], table["score_error"])
    return done


def run_clipscore(cfg: ClipScoreConfig) -> ClipScoreSummary:
    """Embed the pool where needed, then score every committed shard that has no score file yet;
    write the stats last. Raises ``ClipScoreError`` (after the other shards) if some shards failed."""
    start = time.time()
    shards = sorted(committed_shards(cfg.pool))
    if not shards:
        raise DataError(f"pool={cfg.pool!r}: no committed shard (no *_stats.json there)")
    checkpoint = checkpoint_file(cfg.checkpoint)
    done = _existing_scores(cfg, shards, checkpoint)
    pending = [s for s in shards if s not in done]
    stats_path = storage.join(cfg.output_folder, STATS_NAME)
    if pending and storage.exists(stats_path):
        storage.remove(stats_path)  # the stats say "complete"; for now the folder is not

    totals = _Totals()
    for summary in done.values():
        totals.add(summary)
    failed: dict[int, str] = {}
    scorer: dict[str, Any] = {}
    this_run: dict[str, Any] = {"shards": len(pending), "samples": 0}
    if pending:
        try:
            embedded = run_embed(cfg.embed_config())
        except EmbedError as exc:
            raise ClipScoreError(f"embedding the pool: {exc}", exc.failed) from None
        info = embedded.info
        scorer = {"checkpoint": checkpoint, "embeddings": cfg.embeddings,
                  **{k: info.get(k) for k in ("model", "image_size", "step", "dim", "device", "threads")},
                  "actors": info.get("workers", 0), "distributor": info.get("distributor")}  # fmt: skip
        this_run["embedded_now"] = {"shards": embedded.shards_now, "samples": embedded.rows_now,
                                    "samples_per_actor_second": round(embedded.rows_now / embedded.busy_seconds, 1)
                                    if embedded.busy_seconds else None}  # fmt: skip
        description = {k: scorer[k] for k in ("checkpoint", "model", "image_size", "step", "embeddings")}
        for shard_id in pending:
            try:
                table = score_table(cfg.pool, cfg.embeddings, shard_id, description)
                with storage.atomic_write(score_path(cfg.output_folder, shard_id), "wb") as handle:
                    pq.write_table(table, handle, compression="zstd")
            except Exception as exc:  # noqa: BLE001 - the other shards go on; a rerun retries this one
                failed[shard_id] = f"{type(exc).__name__}: {exc}"
                log.error("shard %s: %s", shard_name(shard_id), failed[shard_id])
                continue
            summary = summarise(table["clip_score"], table["score_error"])
            totals.add(summary)
            this_run["samples"] += summary["samples"]
    if failed:
        names = ", ".join(map(shard_name, sorted(failed)[:5])) + (", ..." if len(failed) > 5 else "")
        raise ClipScoreError(f"{len(failed)} of {len(pending)} shard(s) failed ({names}); the others are "
                             "written: rerun the same command to retry", failed)  # fmt: skip
    duration = time.time() - start
    this_run["duration"] = round(duration, 3)
    if pending or not storage.exists(stats_path):
        storage.write_json(stats_path, _stats(cfg, len(shards), totals, checkpoint, scorer, this_run))
    return ClipScoreSummary(len(shards), len(pending), totals.samples, totals.scored, dict(totals.errors), duration)


def _stats(cfg, shards: int, totals: _Totals, checkpoint: str, scorer: dict, this_run: dict) -> dict[str, Any]:
    """The content of ``_clipscore_stats.json``: the whole folder, plus this run's work."""
    return {
        "shards": shards,
        "samples": totals.samples,
        "scored": totals.scored,
        "errors": dict(sorted(totals.errors.items())),
        "mean_score": round(totals.score_sum / totals.scored, 6) if totals.scored else None,
        "quantiles": totals.quantiles(),
        "histogram": totals.sparse_histogram(),
        "checkpoint": checkpoint,
        "scorer": scorer,  # model, image size, device, workers of the embed stage
        "this_run": this_run,
        "config": to_dict(cfg),
    }


# -- command line --------------------------------------------------------------------------------

DESCRIPTION = """\
CLIP score of every sample of a pool: the cosine similarity of its image and caption
embeddings under a webclip checkpoint. Embeds the pool first where it is not embedded
yet (python -m apply.embed, into --embeddings: by default {output_folder}/embeddings;
one model pass, by workers that each load the model once), then writes
{shard}.parquet (key, clip_score, score_error) per committed pool shard into
--output_folder, then _clipscore_stats.json (counts per reason, score quantiles) once
all are there. A rerun skips the shards already scored. The filter turns the scores
into keep / reject (low_clip_score); it also reads an embeddings folder directly
(python -m filter --embeddings E).

  python -m filter.clipscore --pool data/demo/pool --checkpoint runs/demo/checkpoints \\
      --output_folder data/demo/clipscore
"""


def main(argv: list[str] | None = None) -> int:
    from core import cli

    return cli.run("python -m filter.clipscore", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from core import cli

    cfg = parse_config(ClipScoreConfig, argv, prog="python -m filter.clipscore", description=DESCRIPTION)
    cli.using(cfg, cli.shards_committed(cfg.output_folder, "score files"))
    cli.hold_output(cfg.output_folder)
    summary = run_clipscore(cfg)
    print(f"{summary.samples} samples in {summary.shards} shards ({summary.shards_scored_now} scored now, "
          f"{summary.duration:.1f}s): {summary.scored} scored")  # fmt: skip
    for reason, n in sorted(summary.errors.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {n}")
    print(f"scores written to {cfg.output_folder}")
    outcome.verdict("filter.clipscore", summary.samples, summary.scored, summary.errors, "scored")
    return 0


if __name__ == "__main__":
    # Through the importable module, so workers unpickle ``apply.embed.Embedder`` by name.
    from filter.clipscore import main as _main

    sys.exit(_main())
