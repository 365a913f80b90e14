"""``python -m apply.embed``: image and caption embeddings of every sample of a set of shards.

Reads pool shards (ingest's ``{n:05d}.tar`` + parquet + ``_stats.json``: only committed
shards) or train shards (``{n:05d}.tar``, listed by ``manifest.json`` when there is one)
and writes an embeddings folder in clip-retrieval's layout (``apply.embeddings``): float16
image and text embeddings and key/url/caption metadata per shard, row-aligned, rows in
the tar's order, then ``embeddings.json`` last.

* **The model once per worker.** ``core.executor``'s pool of workers, each loading the
  model once (``setup``): one per GPU when there are GPUs, else one per CPU less one
  (``--workers`` to choose); a worker embeds one whole shard at a time, in batches of
  ``--batch_size``, so memory does not grow with the number of shards. Within a worker
  the next batch is read and decoded while the model runs on this one.
* **The trainer's decoding.** Images go through ``apply.model`` (``train.data``'s decode
  and the model's own normalisation), captions through ``train.data.decode_caption``: an
  embedding means what the model saw in training. A sample that fails is left out of all
  three files and counted by its ``core.reasons`` code in ``done/{n}.json``.
* **Resumable, never mixed, deterministic.** A shard is done when ``done/{n}.json`` exists
  (written after its three files); a rerun skips done shards and refuses a folder made by
  another checkpoint or from other shards. Batches are cut per shard and a CPU worker
  computes with one torch thread (oneDNN's convolutions round differently with more), so
  the same inputs give byte-identical ``.npy`` files whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from apply import embeddings as layout
from apply.options import WorkerModelOptions
from core import outcome, storage
from core.config import ConfigError, DataError, option, parse_config, problem, require
from core.executor import Execution, Executor, Failed, SetupFailed, report
from core.layout import committed_shards, shard_id_of, shard_name
from train import data as data_mod

log = logging.getLogger(__name__)

OPEN_CLIP_WEIGHTS = (".pth", ".bin", ".safetensors")  # a .pt may be either: read to tell


@dataclass
class EmbedConfig(WorkerModelOptions, Execution):
    """Where the shards are, which model embeds them (``WorkerModelOptions``), and where the embeddings go."""

    workers: int = option(
        0, "embedding workers, each loading the model once: 0 = one per GPU (/ gpus_per_worker) when there are "
        "GPUs and device allows, else one per CPU less one")  # fmt: skip
    shards: str = option("", "folder of pool shards (ingest) or train shards (shards/): *.tar (local or s3://)")
    output_folder: str = option("", "the embeddings folder: img_emb/, text_emb/, metadata/, embeddings.json "
                                    "(local or s3://)")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "shards", "output_folder")
        if self.shards and self.output_folder and same_folder(self.shards, self.output_folder):
            problem(f"output_folder={self.output_folder!r}: is the shards folder; give the embeddings a folder "
                    "of their own")  # fmt: skip


def same_folder(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return os.path.abspath(storage.filesystem(a)[1]) == os.path.abspath(storage.filesystem(b)[1])
    return a.rstrip("/") == b.rstrip("/")


def checkpoint_file(checkpoint: str) -> str:
    """The weights file a run will read (a folder's latest, resolved once), as it names it: absolute when local."""
    from train import checkpoint as ckpt

    if not storage.exists(checkpoint):
        raise DataError(f"--checkpoint {checkpoint}: no such file or folder")
    try:
        path = checkpoint if checkpoint.endswith(OPEN_CLIP_WEIGHTS) else ckpt.model_file(checkpoint)
    except FileNotFoundError as exc:
        raise DataError(f"--checkpoint: {str(exc).strip(chr(34))}") from None
    return os.path.abspath(storage.filesystem(path)[1]) if storage.is_local(path) else path


def input_shards(folder: str) -> list[tuple[int, str]]:
    """(n, tar path) of every shard to embed, in order; ``DataError`` when there is none to read."""
    try:
        shards = data_mod.list_shards(folder)
    except (FileNotFoundError, ValueError) as exc:  # the trainer's reader names its own option: not ours
        raise DataError(f"--shards {folder}: {str(exc).replace(f'data.train_shards={folder!r}: ', '')}") from None
    committed = committed_shards(folder)
    tars = {shard_id_of(s.path) for s in shards}
    if missing := sorted(committed - tars):
        raise DataError(f"--shards {folder}: shard {shard_name(missing[0])} (and {len(missing) - 1} more) is "
                        "committed but has no tar; embed reads webdataset shards (ingest --output_format webdataset)")
    numbered = [(shard_id_of(s.path), s.path) for s in shards]
    unnamed = [p for n, p in numbered if n is None]
    if unnamed:
        raise DataError(f"--shards {folder}: {unnamed[0]}: a shard's name must end in its number ({{n}}.tar)")
    counts = Counter(n for n, _ in numbered)
    if repeated := [n for n, c in counts.items() if c > 1]:
        raise DataError(f"--shards {folder}: two shards are numbered {repeated[0]}; names must give distinct numbers")
    return numbered


# -- one worker: a model, and whole shards --------------------------------------------------------


class Prepared(NamedTuple):
    """One sample on its way to the model: its image and metadata, or the reason it has none."""

    key: str
    image: Any  # uint8 tensor (3, S, S), None on failure
    caption: str | None
    error: str | None  # a core.reasons code
    url: str | None = None
    width: int | None = None
    height: int | None = None


def _meta(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's ``.json`` member (ingest writes url, width, height), or nothing; never trusted further."""
    try:
        meta = json.loads(members.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else None


def prepare_sample(sample: data_mod.RawSample, decode, max_pixels: int) -> Prepared:
    """Decode as the trainer does (caption first, then image); a failure becomes its reason."""
    try:
        caption = data_mod.decode_caption(sample.members)
        image = decode(data_mod.image_bytes(sample.members), max_pixels)
    except data_mod.SkipSample as skip:
        return Prepared(sample.key, None, None, skip.reason)
    except Exception as exc:  # noqa: BLE001 - one hostile sample must not cost the shard
        log.warning("sample %s: %s: %s", sample.key, type(exc).__name__, exc)
        return Prepared(sample.key, None, None, data_mod.Skip.TRANSFORM_ERROR)
    meta = _meta(sample.members)
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    return Prepared(sample.key, image, caption, None, url, _int_or_none(meta.get("width")),
                    _int_or_none(meta.get("height")))


class Embedder:
    """Embeds whole shards with one model, loaded once (the executor's ``setup`` in each worker)."""

    def __init__(self, cfg: EmbedConfig, model_file: str, device: str, threads: int):
        import torch  # noqa: F401 - in the worker, not when the command only parses options

        from apply import model as apply_model
        from core.device import prepare

        self.torch = torch
        self.compute = prepare(device, cfg.precision, threads)  # threads, TF32, autocast dtype
        self.cfg, self.model_file = cfg, model_file
        self.model = apply_model.load(model_file, model=cfg.model or None, model_config=cfg.model_config or None,
                                      device=self.compute.device)  # fmt: skip
        self.info = {"model": self.model.name, "step": self.model.step, "dim": self.model.embed_dim,
                     "image_size": self.model.image_size, "device": str(self.compute.device),
                     "precision": self.compute.precision, "threads": threads}  # fmt: skip
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="embed-read")
        self._decoders = ThreadPoolExecutor(threads, thread_name_prefix="embed-decode") if threads > 1 else None

    def _decode(self, data: bytes, max_pixels: int):
        return data_mod.decode_image(data, self.model.image_size, max_pixels)

    def _prepare_batch(self, samples: Iterator[data_mod.RawSample]) -> list[Prepared]:
        raw = list(islice(samples, self.cfg.batch_size))
        work = partial(prepare_sample, decode=self._decode, max_pixels=self.cfg.max_image_pixels)
        return list(self._decoders.map(work, raw)) if self._decoders else [work(s) for s in raw]

    def _batches(self, samples: Iterator[data_mod.RawSample]) -> Iterator[list[Prepared]]:
        """Prepared batches, the next one read and decoded while the caller works on this one."""
        upcoming: Future = self._reader.submit(self._prepare_batch, samples)
        while batch := upcoming.result():
            upcoming = self._reader.submit(self._prepare_batch, samples)
            yield batch

    def encode(self, images, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, S, S) and B captions -> float16 (B, D) image and text embeddings."""
        with self.compute.autocast():
            image_rows = self.model.encode_images(images)
            text_rows = self.model.encode_texts(captions)
        return image_rows.numpy().astype(np.float16), text_rows.numpy().astype(np.float16)

    def embed_shard(self, n: int, tar: str, output: str) -> dict[str, Any]:
        """Embed shard ``n`` (``tar``) into ``output``; returns its ``done/{n}.json`` content."""
        start = time.time()
        skipped: Counter = Counter()  # shard_error, counted by the trainer's reader
        failed: dict[str, str] = {}  # key -> reason, for the samples left out
        seen: set[str] = set()
        images, texts, rows = [], [], []
        for batch in self._batches(data_mod.iter_tar_samples(tar, skipped)):
            fresh = []
            for p in batch:
                if p.key in seen:  # not from our writers; one row per key all the same
                    log.warning("%s: key %s appears again; its first sample is the one embedded", tar, p.key)
                    continue
                seen.add(p.key)
                if p.error:
                    failed[p.key] = p.error
                    skipped[p.error] += 1
                else:
                    fresh.append(p)
            if fresh:
                image_rows, text_rows = self.encode(self.torch.stack([p.image for p in fresh]),
                                                    [p.caption for p in fresh])  # fmt: skip
                images.append(image_rows)
                texts.append(text_rows)
                rows += [p._replace(image=None) for p in fresh]  # the metadata; the pixels can go
            report(len(rows), skipped=sum(skipped.values()))
        empty = np.empty((0, self.model.embed_dim), np.float16)
        layout.write_array(layout.image_path(output, n), np.concatenate(images) if images else empty)
        layout.write_array(layout.text_path(output, n), np.concatenate(texts) if texts else empty)
        layout.write_table(layout.metadata_path(output, n), pa.Table.from_arrays([
            pa.array([p.key for p in rows], pa.string()),
            pa.array([p.url for p in rows], pa.string()),
            pa.array([p.caption for p in rows], pa.string()),
            pa.array([tar] * len(rows), pa.string()),
            pa.array([p.width for p in rows], pa.int32()),
            pa.array([p.height for p in rows], pa.int32()),
        ], schema=layout.METADATA_SCHEMA))  # fmt: skip
        done = {"rows": len(rows), "tar": tar, "checkpoint": self.model_file, "settings": settings(self.cfg), **self.info,
                "skipped": dict(sorted(skipped.items())), "failed": failed, "seconds": round(time.time() - start, 3)}
        storage.write_json(layout.done_path(output, n), done)  # last: the shard is done
        return done


def _embed_unit(embedder: Embedder, unit: tuple[int, str, str]) -> dict[str, Any]:
    """One unit of work: a shard ``(n, tar, output folder)`` embedded by this worker's model."""
    return {"n": unit[0], **embedder.embed_shard(*unit)}


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class EmbedSummary:
    shards: int  # input shards, all of which are now embedded
    shards_now: int  # of which this run embedded
    rows: int  # embedded rows in the whole folder
    skipped: dict[str, int]  # samples left out, by reason, in the whole folder
    duration: float
    rows_now: int = 0
    busy_seconds: float = 0.0  # the workers' time on this run's shards, model loading excluded
    info: dict[str, Any] = field(default_factory=dict)  # model, step, dim, device, ... and the workers


class EmbedError(RuntimeError):
    """Some shards failed; the others are written, and a rerun retries only the failed ones."""

    def __init__(self, message: str, failed: dict[int, str]):
        super().__init__(message)
        self.failed = failed  # shard number -> what went wrong


def settings(cfg: EmbedConfig) -> dict[str, Any]:
    """The options besides the checkpoint that change which rows a shard's files hold, or what model made them:
    a rerun must repeat them (precision and threads only change the last bits, and 'auto' resolves per machine)."""
    return {name: getattr(cfg, name) for name in ("model", "model_config", "max_image_pixels")}


def _done_shards(cfg: EmbedConfig, shards: list[tuple[int, str]], checkpoint: str) -> dict[int, dict]:
    """``done/{n}.json`` of the shards already embedded, which must come from this checkpoint and tar."""
    manifest = storage.join(cfg.output_folder, layout.MANIFEST)
    made_by = storage.read_json(manifest).get("checkpoint") if storage.exists(manifest) else checkpoint
    if made_by != checkpoint:
        raise ConfigError(f"output_folder={cfg.output_folder!r}: holds embeddings of checkpoint {made_by!r}, not of "
                          f"{checkpoint!r}; use another output_folder, or delete it to re-embed")  # fmt: skip
    present = {p.rsplit("/", 1)[-1] for p in storage.list_files(storage.join(cfg.output_folder, "done"), ".json")}
    done = {}
    for n, tar in shards:
        if f"{n}.json" not in present:
            continue
        marker = storage.read_json(layout.done_path(cfg.output_folder, n))
        for what, ours in (("checkpoint", checkpoint), ("tar", tar)):
            if marker.get(what) != ours:
                raise ConfigError(
                    f"output_folder={cfg.output_folder!r}: shard {n} was embedded with {what} {marker.get(what)!r}, "
                    f"not {ours!r}; use another output_folder, or delete it to re-embed")  # fmt: skip
        before = marker.get("settings", settings(cfg))
        differ = [f"{k} ({before.get(k)!r} -> {v!r})" for k, v in settings(cfg).items() if before.get(k) != v]
        if differ:
            raise ConfigError(
                f"output_folder={cfg.output_folder!r}: shard {n} was embedded with other settings: {', '.join(differ)}; "
                "rerun with the same settings, or use another output_folder (or delete it) to re-embed")  # fmt: skip
        done[n] = marker
    return done


def run_embed(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every input shard without a ``done`` marker; write ``embeddings.json`` last.

    Raises ``EmbedError`` (after finishing the other shards) if some shards failed.
    """
    start = time.time()
    shards = input_shards(cfg.shards)
    checkpoint = checkpoint_file(cfg.checkpoint)
    done = _done_shards(cfg, shards, checkpoint)
    pending = [(n, tar) for n, tar in shards if n not in done]
    manifest_path = storage.join(cfg.output_folder, layout.MANIFEST)
    if pending and storage.exists(manifest_path):
        storage.remove(manifest_path)  # it says "complete"; for now the folder is not
    storage.makedirs(cfg.output_folder)
    info: dict[str, Any] = {}
    failed: dict[int, str] = {}
    rows_now = busy = 0.0
    if pending:
        for result in _embed(cfg, checkpoint, pending, done, info):
            if isinstance(result, Failed):
                failed[result.unit[0]] = f"{type(result.error).__name__}: {result.error}"
                log.error("shard %s: %s", result.unit[1], failed[result.unit[0]])
                continue
            done[result.pop("n")] = result
            rows_now += result["rows"]
            busy += result["seconds"]
    if failed:
        names = ", ".join(map(str, sorted(failed)[:5])) + (", ..." if len(failed) > 5 else "")
        raise EmbedError(f"{len(failed)} of {len(pending)} shard(s) failed ({names}); the others are written: "
                         "rerun the same command to retry", failed)  # fmt: skip
    skipped: Counter = Counter()
    for marker in done.values():
        skipped.update(marker.get("skipped", {}))
    first = done[shards[0][0]]
    manifest = {
        "checkpoint": checkpoint,
        "model": first["model"],
        "step": first["step"],
        "dim": first["dim"],
        "image_size": first["image_size"],
        "shards": {str(n): {"tar": tar, "rows": done[n]["rows"]} for n, tar in shards},
        "rows": sum(done[n]["rows"] for n, _ in shards),
        "source": cfg.shards,
        "skipped": dict(sorted(skipped.items())),
    }
    if pending or not storage.exists(manifest_path):
        storage.write_json(manifest_path, manifest)
    return EmbedSummary(len(shards), len(pending), manifest["rows"], manifest["skipped"], time.time() - start,
                        int(rows_now), busy, {k: first.get(k) for k in ("model", "step", "dim", "image_size")} | info)


def _embed(cfg: EmbedConfig, checkpoint: str, pending: list[tuple[int, str]], done: dict, info: dict) -> Iterator:
    """Results of ``pending`` (done markers, or ``Failed``) from the executor's pool of workers,
    each with the model loaded once; ``info`` gets the workers' description."""
    # Before torch loads OpenMP in a worker (as train/__main__.py does): idle OpenMP threads sleep
    # instead of spinning on cores the decode threads need. Local processes and a local Ray
    # inherit it; a cluster is told explicitly (a runtime_env costs seconds of actor start).
    omp = {"OMP_WAIT_POLICY": os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")}
    joins = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    with Executor(_where(cfg), desc="embed", unit="shard", item="image") as ex:
        for marker in done.values():
            ex.skipped(marker["rows"])  # counted in the bar
        if ex.distributor == "ray":
            import ray

            cluster, where = ray.cluster_resources(), "the Ray cluster"
            cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
        else:
            cpus, gpus, where = float(os.cpu_count() or 1), float(_local_gpus(cfg)), "this machine"
        workers, threads, resources = worker_plan(cfg, cpus, gpus, where)
        workers = min(workers, len(pending))
        inline = ex.runs_inline(pending, workers=workers)
        if not inline and ex.distributor == "processes" and "num_gpus" in resources and workers > 1:
            raise ConfigError(f"distributor={cfg.distributor}: {workers} GPU workers would share one GPU as local "
                              "processes; use distributor ray (or auto), which gives each its own")  # fmt: skip
        device = "cuda" if "num_gpus" in resources else "cpu"
        options = {**resources, **({"runtime_env": {"env_vars": omp}} if joins else {})}
        units = [(n, tar, cfg.output_folder) for n, tar in pending]
        info.update({"device": device, "threads": threads, "workers": 0 if inline else workers,
                     "distributor": "inline" if inline else ex.distributor})  # fmt: skip
        try:
            yield from ex.map(_embed_unit, units, setup=partial(Embedder, cfg, checkpoint, device, threads),
                              keep_going=True, workers=workers, ray_options=options)
        except SetupFailed as exc:  # the checkpoint, the model, the device
            raise DataError(f"the embedding workers could not start: {str(exc).splitlines()[0]}") from None


def _where(cfg: EmbedConfig) -> Execution:
    """``cfg``'s execution options; ``auto`` on a machine of several GPUs becomes Ray (one GPU per worker)."""
    execution = Execution(**cfg.execution_options())
    if cfg.distributor == "auto" and Executor(execution).distributor == "processes" and _local_gpus(cfg) > 1:
        execution.distributor = "ray"
    return execution


def _local_gpus(cfg: EmbedConfig) -> int:
    if cfg.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def worker_plan(cfg: EmbedConfig, cpus: float, gpus: float,
                where: str = "the Ray cluster") -> tuple[int, int, dict[str, float]]:
    """(workers, threads per worker, Ray resources per worker) for ``cpus`` and ``gpus`` (of ``where``)."""
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if on_gpu and gpus <= 0:
        raise ConfigError(f"device=cuda: {where} has no GPU")
    if cfg.workers > 0:
        workers = cfg.workers
    elif on_gpu:
        workers = max(1, int(gpus / cfg.gpus_per_worker))
    else:
        workers = max(1, int(cpus) - 1)  # one core for the driver (and on Ray, the raylet and object store)
    if not on_gpu and cfg.precision in ("bf16", "fp16"):
        raise ConfigError(f"precision={cfg.precision}: autocast is for GPUs, and {where} has none")
    # On CPU one torch thread per worker unless told otherwise: oneDNN's convolutions give other
    # low bits with other thread counts, and the embeddings must not depend on the worker count.
    threads = cfg.threads_per_worker or (max(1, int(cpus) // workers) if on_gpu else 1)
    resources = {"num_cpus": min(float(threads), cpus / workers)}  # never more than the cluster has
    if on_gpu:
        resources["num_gpus"] = cfg.gpus_per_worker
    return workers, threads, resources


# -- command line --------------------------------------------------------------------------------------

DESCRIPTION = """\
Image and caption embeddings of every sample of a folder of shards (pool shards from
ingest, or train shards), by a pool of workers that each load the model once (one per
GPU when there are GPUs, else one per CPU less one: local processes, or Ray actors given
a cluster or --distributor ray). Writes clip-retrieval's layout into --output_folder:
img_emb/img_emb_{n}.npy and text_emb/text_emb_{n}.npy (float16, L2-normalised, one row
per sample), metadata/metadata_{n}.parquet (key, url, caption, shard, image size), a
done/{n}.json marker per shard, and embeddings.json last. A rerun skips the shards
already done. Samples that do not decode are left out and counted by reason.

  python -m apply.embed --checkpoint runs/demo/checkpoints --shards data/demo/train \\
      --output_folder data/demo/embeddings
"""


def main(argv: list[str] | None = None) -> int:
    """The command; every error ends in one explained line (``core.cli.run``: exit codes 1, 2, 130)."""
    from core import cli

    return cli.run("python -m apply.embed", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(EmbedConfig, argv, prog="python -m apply.embed", description=DESCRIPTION)
    from core import cli

    cli.hold_output(cfg.output_folder)
    summary = run_embed(cfg)
    print(f"{summary.rows} samples embedded in {summary.shards} shards ({summary.shards_now} embedded now, "
          f"{summary.duration:.1f}s) with {summary.info.get('model')} (dim {summary.info.get('dim')})")
    for reason, n in sorted(summary.skipped.items(), key=lambda kv: -kv[1]):
        print(f"  left out: {reason:<20} {n}")
    print(f"embeddings written to {cfg.output_folder}")
    outcome.verdict("apply.embed", summary.rows + sum(summary.skipped.values()), summary.rows, summary.skipped,
                    "embedded")  # nothing embedded: exit 1 with the dominant reason
    return 0


if __name__ == "__main__":
    # Through the importable module, so workers unpickle ``apply.embed.Embedder`` by name.
    from apply.embed import main as _main

    sys.exit(_main())
