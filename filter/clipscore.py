"""CLIP score of every pool sample: how well its caption matches its image, under a webclip model.

The filter's ``low_clip_score`` rule (a threshold, or keep the top fraction) needs one
number per sample. Unlike every other filter input it is not metadata: computing it
means decoding every image and running a model. So it is computed once, here, into a
folder of its own, and the filter reads it as one more column, joined on ``key``::

    {output_folder}/{shard:05d}.parquet    per committed pool shard, in key order:
        key          string   the pool key
        clip_score   float32  cosine of the L2-normalised image and text embeddings; null on failure
        score_error  string   a core.reasons code (decode_error, caption_missing, ...); null on success
    {output_folder}/_clipscore_stats.json  written last, only once every committed pool
                                           shard has its score file: counts per reason, a score
                                           histogram and quantiles, the checkpoint and the config

Why it is built this way:

* **One row per pool success row, never a silent drop.** The shard's tar is streamed
  (``core.tarreader`` through the trainer's member grouping) and every sample gets a row;
  a sample that fails gets a null score and the reason; a success row of the pool
  parquet that the tar does not hold (a cut tar) gets ``shard_error`` or ``image_missing``.
* **Training's preprocessing, not a copy of it.** Images are decoded by
  ``train.data.decode_image`` at the model's image size and normalised with the model's
  mean and std, captions read by ``train.data.decode_caption`` and tokenised by the
  model's tokenizer: a score measures what the model saw in training, and the two
  cannot drift apart.
* **A pool of workers, the shard as the unit of work.** ``core.executor``'s actor pool:
  each worker (a Ray actor, a local process, or this process) loads the model once
  (``setup``) and scores whole shards, one at a time: one per GPU (bf16 autocast) when
  there are GPUs, else one per CPU less one, each with its share of torch threads; a
  worker that dies is replaced and its shard scored again. Within a worker the next
  batch is read and decoded while the model runs on this one.
* **Resumable, and never mixed.** Each score file is written atomically and names the
  checkpoint that produced it in its parquet metadata; a rerun skips the files it
  finds, recomputes missing ones, and refuses a folder holding another checkpoint's.

Run ``python -m filter.clipscore --help``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core import storage
from core.config import ConfigError, DataError, at_least, option, parse_config, problem, require, to_dict
from core.device import prepare as prepare_device
from core.executor import Execution, Executor, Failed, SetupFailed
from core.layout import committed_shards, shard_id_of, shard_name
from train import checkpoint as ckpt
from train import data as data_mod
from train import model as model_mod

log = logging.getLogger(__name__)

STATS_NAME = "_clipscore_stats.json"
METADATA_KEY = b"webclip.clipscore"  # parquet schema metadata: which checkpoint made the scores
SCORE_SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("score_error", pa.string())])
HISTOGRAM_BINS = 200  # over [-1, 1]: quantiles in the stats are exact to 0.01
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def score_path(output_folder: str, shard_id: int) -> str:
    """Where the scores of pool shard ``shard_id`` go."""
    return storage.join(output_folder, f"{shard_name(shard_id)}.parquet")


# -- config ------------------------------------------------------------------------------------


@dataclass
class ClipScoreConfig(Execution):
    """The scorer's options, and where it runs (``Execution``'s options, ``workers`` sized for a model)."""

    workers: int = option(
        0, "scoring workers, each loading the model once: 0 = one per GPU (/ gpus_per_actor) when there are "
        "GPUs and device allows, else one per CPU less one"
    )  # fmt: skip
    pool: str = option("", "pool folder written by ingest, webdataset layout (local or s3://)")
    checkpoint: str = option(
        "", "webclip checkpoint: a step_*.pt model file, or a checkpoint folder whose latest.json is "
        "followed once, at start (local or s3://)"
    )  # fmt: skip
    output_folder: str = option(
        "", "where {shard}.parquet score files and _clipscore_stats.json go (local or s3://); a folder "
        "of its own, not the pool's or the filter's"
    )  # fmt: skip
    model: str = option("", "open_clip model name; empty = the name the checkpoint stores")
    model_config: str = option(
        "", "extra open_clip model JSON to register, for an architecture outside train/model_configs "
        "whose run config.yaml is not beside the checkpoint folder"
    )  # fmt: skip
    actors: int | None = option(
        None, "the old name of workers, kept for its command lines: -1 = --workers 0 (automatic), "
        "0 = --distributor inline (in this process), N = --workers N"
    )  # fmt: skip
    threads_per_actor: int = option(0, "torch and decode threads per worker; 0 = the CPUs / workers")
    gpus_per_actor: float = option(1.0, "GPUs each GPU actor holds; 0.5 puts two actors on one GPU")
    batch_size: int = option(256, "samples per forward pass")
    device: str = option("auto", "auto (cuda when GPUs are there), cpu or cuda")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU only)")
    max_image_pixels: int = option(1 << 26, "images announcing more pixels get too_many_pixels, undecoded")

    def __post_init__(self) -> None:
        self._take_actors()
        super().__post_init__()
        require(self, "pool", "checkpoint", "output_folder")
        if _same_folder(self.pool, self.output_folder):
            problem(f"output_folder={self.output_folder!r}: is the pool; score files would replace "
                              "the pool's parquet files")  # fmt: skip
        if self.device not in DEVICES:
            problem(f"device={self.device!r}: use one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            problem(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.device == "cpu" and self.precision in ("bf16", "fp16"):
            problem(f"precision={self.precision}: autocast is for GPUs; on CPU use fp32 (or auto)")
        if self.threads_per_actor < 0:
            problem(f"threads_per_actor={self.threads_per_actor}: 0 (automatic) or a positive count")
        if not self.gpus_per_actor > 0:
            problem(f"gpus_per_actor={self.gpus_per_actor}: must be positive")
        at_least(self, 1, "batch_size", "max_image_pixels")

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


def _same_folder(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return os.path.abspath(storage.filesystem(a)[1]) == os.path.abspath(storage.filesystem(b)[1])
    return a.rstrip("/") == b.rstrip("/")


def checkpoint_identity(path: str) -> str:
    """How score files name their checkpoint: the model file, absolute when local."""
    return os.path.abspath(storage.filesystem(path)[1]) if storage.is_local(path) else path


# -- scoring one shard ---------------------------------------------------------------------------


class Prepared(NamedTuple):
    """One sample on its way to the model: its tensors, or the reason it has none."""

    key: str
    image: torch.Tensor | None  # uint8 (3, S, S)
    caption: str | None
    error: str | None  # a core.reasons code


def prepare_sample(sample: data_mod.RawSample, image_size: int, max_pixels: int) -> Prepared:
    """Decode as the trainer does (caption first, then image); a failure becomes its reason."""
    try:
        caption = data_mod.decode_caption(sample.members)
        image = data_mod.decode_image(data_mod.image_bytes(sample.members), image_size, max_pixels)
    except data_mod.SkipSample as skip:
        return Prepared(sample.key, None, None, skip.reason)
    except Exception as exc:  # noqa: BLE001 - one hostile sample must not cost the shard
        log.warning("sample %s: %s: %s", sample.key, type(exc).__name__, exc)
        return Prepared(sample.key, None, None, data_mod.Skip.TRANSFORM_ERROR)
    return Prepared(sample.key, image, caption, None)


def _expected_keys(pool: str, shard_id: int) -> list[str]:
    """Keys of the pool parquet's success rows: each must end with a score row."""
    path = storage.join(pool, f"{shard_name(shard_id)}.parquet")
    if not storage.exists(path):
        return []  # a pool without per-row metadata: the tar alone says what there is
    with storage.open_file(path, "rb") as handle:
        table = pq.read_table(handle, columns=["key", "status"])
    return [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "success"]


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


class ClipScorer:
    """Scores whole pool shards with one model, loaded once.

    A plain class: ``run_clipscore`` has the executor make one in each worker (its ``setup``:
    a Ray actor, a local process, or the calling process when inline).
    """

    def __init__(self, cfg: ClipScoreConfig, model_path: str, device: str, threads: int):
        compute = prepare_device(device, cfg.precision, threads)  # threads, TF32, autocast dtype
        if cfg.model_config:
            model_mod.register_model_config(cfg.model_config)
        self.cfg = cfg
        self.device = compute.device
        loaded = ckpt.load_model(model_path, name=cfg.model or None, device=self.device)
        # channels_last: faster convolutions on CPU (oneDNN) and GPU, as in training.
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.tokenizer, self.image_size = loaded.tokenizer, loaded.image_size
        self.mean, self.std = model_mod.normaliser(self.model, self.device)
        self.amp_dtype = compute.amp_dtype
        self.info = {
            "checkpoint": checkpoint_identity(loaded.path),
            "model": loaded.name,
            "image_size": loaded.image_size,
            "step": loaded.step,
            "device": str(self.device),
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
            "threads": threads,
        }
        # Decoding: a reader thread fetches and decodes the next batch while the model runs
        # on this one; with more than one thread, a batch's images decode in parallel (PIL
        # and libjpeg release the GIL).
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="clipscore-read")
        self._decoders = ThreadPoolExecutor(threads, thread_name_prefix="clipscore-decode") if threads > 1 else None

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """float32 cosine similarity of each uint8 image (B, 3, S, S) with its caption."""
        if self.device.type == "cuda":
            images = images.pin_memory()  # the copy is then asynchronous: it overlaps the tokenising
        images = images.to(self.device, non_blocking=True)
        tokens = self.tokenizer(captions).to(self.device, non_blocking=True)
        pixels = model_mod.normalise(images, self.mean, self.std)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            image_features = self.model.encode_image(pixels)
            text_features = self.model.encode_text(tokens)
        # Normalised in fp32, whatever the autocast dtype: the score is compared to thresholds.
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        return (image_features * text_features).sum(dim=-1).cpu().numpy().astype(np.float32)

    def _prepare_batch(self, samples: Iterator[data_mod.RawSample]) -> list[Prepared]:
        raw = list(islice(samples, self.cfg.batch_size))
        args = (self.image_size, self.cfg.max_image_pixels)
        if self._decoders is None:
            return [prepare_sample(sample, *args) for sample in raw]
        return list(self._decoders.map(lambda sample: prepare_sample(sample, *args), raw))

    def _batches(self, samples: Iterator[data_mod.RawSample]) -> Iterator[list[Prepared]]:
        """Prepared batches, the next one read and decoded while the caller works on this one."""
        upcoming: Future = self._reader.submit(self._prepare_batch, samples)
        while batch := upcoming.result():
            upcoming = self._reader.submit(self._prepare_batch, samples)
            yield batch

    def score_shard(self, shard_id: int) -> dict[str, Any]:
        """Score pool shard ``shard_id`` and write its score file; returns the file's summary."""
        start = time.time()
        cfg = self.cfg
        tar_path = storage.join(cfg.pool, f"{shard_name(shard_id)}.tar")
        if not storage.exists(tar_path):
            raise FileNotFoundError(f"{tar_path}: missing, though the shard is committed")
        expected = _expected_keys(cfg.pool, shard_id)  # first: an unreadable parquet fails the shard at once
        skipped: Counter = Counter()  # shard_error, counted by the trainer's reader
        rows: dict[str, tuple[float | None, str | None]] = {}
        for batch in self._batches(data_mod.iter_tar_samples(tar_path, skipped)):
            good = [p for p in batch if p.error is None]
            values = iter(self.scores(torch.stack([p.image for p in good]), [p.caption for p in good]) if good else ())
            for prepared in batch:
                row = (None, prepared.error) if prepared.error else (float(next(values)), None)
                if prepared.key in rows:  # not from our writers; one row per key all the same
                    log.warning("%s: key %s appears again; its first sample is the one scored", tar_path, prepared.key)
                    continue
                rows[prepared.key] = row
        # A success row whose sample the tar does not hold: lost to damage, or never written.
        lost = data_mod.Skip.SHARD_ERROR if skipped else data_mod.Skip.IMAGE_MISSING
        for key in expected:
            rows.setdefault(key, (None, lost))
        keys = sorted(rows)
        table = pa.Table.from_arrays(
            [
                pa.array(keys, pa.string()),
                pa.array([rows[k][0] for k in keys], pa.float32()),
                pa.array([rows[k][1] for k in keys], pa.string()),
            ],
            schema=SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(self.info).encode()}),
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        with storage.atomic_write(score_path(cfg.output_folder, shard_id), "wb") as handle:
            handle.write(buffer.getvalue())
        return {"shard": shard_id, **summarise(table["clip_score"], table["score_error"]),
                "duration": time.time() - start}  # fmt: skip


# -- reading score files back --------------------------------------------------------------------


def read_scores(path: str) -> tuple[pa.Table, dict[str, Any]]:
    """A score file's table and the scorer description it was written with."""
    with storage.open_file(path, "rb") as handle:
        table = pq.read_table(handle)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return table, (json.loads(raw) if raw else {})


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
        self.shards_now = self.samples_now = 0  # scored by this run
        self.busy_seconds = 0.0  # the actors' time on this run's shards, model loading excluded

    def add(self, summary: dict[str, Any], now: bool = True) -> None:
        if now:
            self.shards_now += 1
            self.samples_now += summary["samples"]
            self.busy_seconds += summary["duration"]
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
    """Score every committed pool shard that has no score file yet; write the stats last.

    Raises ``ClipScoreError`` (after finishing the other shards) if some shards failed.
    """
    start = time.time()
    shards = sorted(committed_shards(cfg.pool))
    if not shards:
        raise DataError(f"pool={cfg.pool!r}: no committed shard (no *_stats.json there)")
    tars = {shard_id_of(p) for p in storage.list_files(cfg.pool, ".tar")}
    if missing := [s for s in shards if s not in tars]:
        raise DataError(
            f"pool={cfg.pool!r}: shard {shard_name(missing[0])} (and {len(missing) - 1} more) has no tar; "
            "clip scoring reads webdataset pools (ingest --output_format webdataset)"
        )
    try:
        model_path = ckpt.model_file(cfg.checkpoint)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    identity = checkpoint_identity(model_path)
    done = _existing_scores(cfg, shards, identity)
    pending = [s for s in shards if s not in done]
    stats_path = storage.join(cfg.output_folder, STATS_NAME)
    if pending and storage.exists(stats_path):
        storage.remove(stats_path)  # the stats say "complete"; for now the folder is not

    totals = _Totals()
    for summary in done.values():
        totals.add(summary, now=False)
    failed: dict[int, str] = {}
    scorer: dict[str, Any] = {}
    if pending:
        scorer = _score(cfg, model_path, pending, len(done), totals, failed)
    if failed:
        names = ", ".join(map(shard_name, sorted(failed)[:5])) + (", ..." if len(failed) > 5 else "")
        raise ClipScoreError(f"{len(failed)} of {len(pending)} shard(s) failed ({names}); the others are "
                             "written: rerun the same command to retry", failed)  # fmt: skip
    duration = time.time() - start
    if pending or not storage.exists(stats_path):
        storage.write_json(stats_path, _stats(cfg, len(shards), totals, identity, scorer, duration))
    return ClipScoreSummary(len(shards), len(pending), totals.samples, totals.scored, dict(totals.errors), duration)


def _stats(cfg, shards: int, totals: _Totals, checkpoint: str, scorer: dict, duration: float) -> dict[str, Any]:
    """The content of ``_clipscore_stats.json``: the whole folder, plus this run's speed."""
    return {
        "shards": shards,
        "samples": totals.samples,
        "scored": totals.scored,
        "errors": dict(sorted(totals.errors.items())),
        "mean_score": round(totals.score_sum / totals.scored, 6) if totals.scored else None,
        "quantiles": totals.quantiles(),
        "histogram": totals.sparse_histogram(),
        "checkpoint": checkpoint,
        "scorer": scorer,  # model, image size, device, precision, actors: from the first worker
        "this_run": {
            "shards": totals.shards_now,
            "samples": totals.samples_now,
            "duration": round(duration, 3),  # Ray start and model loading included
            "samples_per_second": round(totals.samples_now / duration, 1),
            "samples_per_actor_second": (  # one actor's steady rate: loading excluded
                round(totals.samples_now / totals.busy_seconds, 1) if totals.busy_seconds else None
            ),
        },
        "config": to_dict(cfg),
    }


def _score_shard(scorer: ClipScorer, shard_id: int) -> dict[str, Any]:
    """One unit: a shard scored by this worker's model; its summary, and who scored it."""
    return {**scorer.score_shard(shard_id), "scorer": scorer.describe()}


def _score(cfg: ClipScoreConfig, model_path: str, pending: list[int], skipped: int, totals: _Totals,
           failed: dict[int, str]) -> dict[str, Any]:
    """Score ``pending`` on the executor's pool of workers, each with the model loaded once; returns
    the scorer's description. Failed shards go to ``failed``, the others' summaries to ``totals``."""
    # Set before torch loads OpenMP in a worker's process (as train/__main__.py does): idle OpenMP
    # threads sleep instead of spinning on cores the decode threads and other jobs need. Local
    # processes and a local Ray instance inherit our environment; on a cluster it is said explicitly
    # (a runtime_env costs seconds of actor start, so only there).
    omp = {"OMP_WAIT_POLICY": os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")}
    joins = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS")) or _ray_running()
    with Executor(_where(cfg), desc="clipscore", unit="shard") as ex:
        for _ in range(skipped):
            ex.skipped()  # counted in the bar
        if ex.distributor == "ray":
            import ray

            cluster, where = ray.cluster_resources(), "the Ray cluster"
            cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
        else:
            cpus, gpus, where = float(os.cpu_count() or 1), float(_local_gpus(cfg)), "this machine"
        actors, threads, resources = _actor_plan(cfg, cpus, gpus, where)
        actors = min(actors, len(pending))
        inline = ex.runs_inline(pending, workers=actors)
        if inline:
            threads = cfg.threads_per_actor or int(cpus)
        elif ex.distributor == "processes" and "num_gpus" in resources and actors > 1:
            raise ConfigError(f"distributor={cfg.distributor}: {actors} GPU workers would share one GPU as local "
                              "processes; use distributor ray (or auto), which gives each its own")
        device = "cuda" if "num_gpus" in resources else "cpu"
        options = {**resources, **({"runtime_env": {"env_vars": omp}} if joins else {})}
        info: dict[str, Any] = {}
        try:
            for result in ex.map(_score_shard, pending, setup=partial(ClipScorer, cfg, model_path, device, threads),
                                 keep_going=True, workers=actors, ray_options=options):
                if isinstance(result, Failed):
                    failed[result.unit] = f"{type(result.error).__name__}: {result.error}"
                    log.error("shard %s: %s", shard_name(result.unit), failed[result.unit])
                    continue
                scorer = result.pop("scorer")
                info = info or scorer
                totals.add(result)
        except SetupFailed as exc:  # the checkpoint, the model, the device
            raise ClipScoreError(f"the scoring workers could not start: {exc}") from None
        placement = {"actors": 0} if inline else {"actors": actors, "distributor": ex.distributor}
        if ex.distributor == "ray" and not inline:
            placement["actor_resources"] = resources
    return {**info, **placement}


def _where(cfg: ClipScoreConfig) -> Execution:
    """``cfg``'s execution options; ``auto`` on a machine of several GPUs becomes Ray (one GPU per actor)."""
    execution = Execution(**cfg.execution_options())
    if cfg.distributor == "auto" and Executor(execution).distributor == "processes" and _local_gpus(cfg) > 1:
        execution.distributor = "ray"
    return execution


def _local_gpus(cfg: ClipScoreConfig) -> int:
    return torch.cuda.device_count() if cfg.device != "cpu" else 0


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _actor_plan(cfg: ClipScoreConfig, cpus: float, gpus: float,
                where: str = "the Ray cluster") -> tuple[int, int, dict[str, float]]:
    """(workers, threads per worker, Ray resources per worker) for ``cpus`` and ``gpus`` (of ``where``)."""
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if on_gpu and gpus <= 0:
        raise ConfigError(f"device=cuda: {where} has no GPU")
    if cfg.workers > 0:
        actors = cfg.workers
    elif on_gpu:
        actors = max(1, int(gpus / cfg.gpus_per_actor))
    else:
        actors = max(1, int(cpus) - 1)  # one core for the driver (and on Ray, the raylet and object store)
    if not on_gpu and cfg.precision in ("bf16", "fp16"):
        raise ConfigError(f"precision={cfg.precision}: autocast is for GPUs, and {where} has none")
    threads = cfg.threads_per_actor or max(1, int(cpus) // actors)
    resources = {"num_cpus": min(float(threads), cpus / actors)}  # never more than the cluster has
    if on_gpu:
        resources["num_gpus"] = cfg.gpus_per_actor
    return actors, threads, resources


# -- command line --------------------------------------------------------------------------------

DESCRIPTION = """\
CLIP score of every sample of a pool: the cosine similarity of the image and caption
embeddings of a webclip checkpoint, computed by a pool of workers that each load the
model once (one per GPU when there are GPUs, else one per CPU less one: local
processes, or Ray actors given a cluster or --distributor ray), with the trainer's
own image decoding and normalisation. Writes {shard}.parquet (key, clip_score,
score_error) per committed pool shard into --output_folder, then
_clipscore_stats.json (counts per reason, score quantiles) once all are there. A
rerun skips the shards already scored. The filter turns the scores into keep /
reject (low_clip_score).

  python -m filter.clipscore --pool data/demo/pool --checkpoint runs/demo/checkpoints \\
      --output_folder data/demo/clipscore
"""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(ClipScoreConfig, argv, prog="python -m filter.clipscore", description=DESCRIPTION)
    try:
        summary = run_clipscore(cfg)
    except (ConfigError, DataError, ClipScoreError) as exc:
        print(f"python -m filter.clipscore: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ClipScoreError) else 2
    print(f"{summary.samples} samples in {summary.shards} shards ({summary.shards_scored_now} scored now, "
          f"{summary.duration:.1f}s): {summary.scored} scored")  # fmt: skip
    for reason, n in sorted(summary.errors.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {n}")
    print(f"scores written to {cfg.output_folder}")
    return 0


if __name__ == "__main__":
    # Run through the importable module, so workers unpickle ``filter.clipscore.ClipScorer``
    # (a class defined in ``__main__`` would travel by value, and its module globals with it).
    from filter.clipscore import main as _main

    sys.exit(_main())
