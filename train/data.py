"""Streaming input: WebDataset/img2dataset tar shards -> batches of uint8 images and tokens.

Why it is built this way:

* **Streaming, constant memory.** Each shard is read once per epoch, front to back,
  through fsspec (local or ``s3://``) with ``core.tarreader`` (a streaming reader); only the shuffle
  buffer's raw bytes are held. No ``pipe:`` URLs, no subprocesses, no unpickling: a
  shard member is bytes that we decode as a JPEG or as UTF-8 text, nothing else.
* **Deterministic, so a resume is exact.** The shard order of epoch ``e`` is a
  permutation seeded by ``(seed, e)``, the same on every rank; readers (rank x
  DataLoader worker) take disjoint slices of it (or, in ``resampled`` mode, each draws
  shards with replacement from its own ``(seed, e, reader)`` stream); each reader's
  shuffle buffer is seeded by ``(seed, e, reader)`` and drained at the epoch's end. A
  reader's output is therefore a pure function of (seed, layout, epoch, position), and
  every batch says where its reader stood when the batch was completed. A resumed run
  replays each reader's current epoch up to that position *without decoding* (tar
  bytes are read and dropped) and continues with the identical next batch.
* **Every sample accounted for.** A corrupt or incomplete sample (bad image, missing or
  non-UTF-8 caption, a truncated shard, a transform that raises) is skipped and
  counted by reason (codes from ``core.reasons``). The counts ride along with each
  batch as a delta, so the training process sees the totals even when the reading
  happens in DataLoader worker processes.
* **No random crop or flip**: captions say "left" and "right". Images are only resized
  to the model's size (the JPEG decoder's DCT scaling does most of it for free).
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core import storage
from core.layout import STATS_SUFFIX, committed_shards, image_member, shard_id_of
from core.reasons import Reason
from core.tarreader import READ_ERRORS, TarSample
from core.tarreader import iter_tar_samples as _tar_samples

log = logging.getLogger(__name__)

CAPTION_EXTENSION = "txt"


class Skip:
    """The ``core.reasons`` codes a training sample can be skipped for."""

    DECODE_ERROR = Reason.DECODE_ERROR.value  # image bytes that do not decode
    TOO_MANY_PIXELS = Reason.TOO_MANY_PIXELS.value  # header announces more than the cap
    CAPTION_MISSING = Reason.CAPTION_MISSING.value  # no .txt member, or an empty caption
    IMAGE_MISSING = Reason.IMAGE_MISSING.value  # no image member for the key
    CAPTION_NOT_UTF8 = Reason.CAPTION_NOT_UTF8.value
    SHARD_ERROR = Reason.SHARD_ERROR.value  # a shard that cannot be opened, or ends mid-member
    TRANSFORM_ERROR = Reason.TRANSFORM_ERROR.value  # anything else that fails on the way to a tensor


@dataclass(frozen=True)
class Shard:
    path: str
    count: int | None  # from the manifest; None when shards were found by listing


def list_shards(folder: str) -> list[Shard]:
    """Shards named by ``manifest.json`` in ``folder``, else every ``*.tar`` there, in name order."""
    manifest_path = storage.join(folder, "manifest.json")
    if storage.exists(manifest_path):
        manifest = storage.read_json(manifest_path)
        entries = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{manifest_path}: expected a non-empty 'shards' list")
        shards = []
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{manifest_path}: shards[{i}].name={name!r} is not a plain file name")
            count = entry.get("count")
            shards.append(Shard(storage.join(folder, name), count if isinstance(count, int) else None))
        return shards
    paths = storage.list_files(folder, ".tar")
    if not paths:
        raise FileNotFoundError(f"data.train_shards={folder!r}: no manifest.json and no *.tar files there")
    # A pool or img2dataset folder commits each shard with {shard}_stats.json, written last:
    # where markers exist, a tar without one is half-written (a killed job) and is left out.
    markers = committed_shards(folder)
    if markers:
        committed = [p for p in paths if shard_id_of(p) in markers]
        if len(committed) < len(paths):
            log.warning("%s: %d tar(s) without %s (uncommitted) are not read", folder,
                        len(paths) - len(committed), STATS_SUFFIX)  # fmt: skip
        paths = committed
        if not paths:
            raise FileNotFoundError(f"data.train_shards={folder!r}: no committed shard (none has a {STATS_SUFFIX})")
    return [Shard(p, None) for p in paths]


def total_samples(shards: list[Shard]) -> int | None:
    """Sample count from the manifest, or None if any shard's count is unknown."""
    if any(s.count is None for s in shards):
        return None
    return sum(s.count for s in shards)  # type: ignore[misc]


# -- reading tar members ------------------------------------------------------------


RawSample = TarSample  # (key, {extension: bytes}): one sample's members, undecoded


def iter_tar_samples(path: str, skipped: Counter) -> Iterator[RawSample]:
    """A tar's samples (``core.tarreader.iter_tar_samples``); a broken shard ends early and is counted."""
    try:
        with storage.open_file(path, "rb") as handle:
            yield from _tar_samples(handle, reopen=lambda: storage.open_file(path, "rb"))
    except READ_ERRORS as exc:
        skipped[Skip.SHARD_ERROR] += 1
        log.warning("shard %s: stopped reading (%s); samples after this point are skipped", path, exc)


# -- decoding -----------------------------------------------------------------------


def decode_image(data: bytes, size: int, max_pixels: int = 1 << 26) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 tensor (3, size, size); raises ``SkipSample``.

    Shortest side resized to ``size``, then a centre crop (the square images of
    ``border`` shards are only resized). For JPEG, ``draft`` asks libjpeg for a
    DCT-scaled decode no smaller than needed: 128 px -> 64 px costs a quarter of a
    full decode and no separate resize.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise SkipSample(Skip.TOO_MANY_PIXELS)
            scale = size / min(width, height)
            image.draft("RGB", (max(size, round(width * scale)), max(size, round(height * scale))))
            image.load()  # decode now, while the file is open
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    except SkipSample:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SkipSample(Skip.DECODE_ERROR, str(exc)) from None
    if rgb.size != (size, size):
        width, height = rgb.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        if (new_w, new_h) != rgb.size:
            rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    # One copy into a writable array; the CHW view is made contiguous by torch.stack later.
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_caption(members: dict[str, bytes]) -> str:
    if CAPTION_EXTENSION not in members:
        raise SkipSample(Skip.CAPTION_MISSING)
    try:
        text = members[CAPTION_EXTENSION].decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample(Skip.CAPTION_NOT_UTF8) from None
    text = text.strip()
    if not text:
        raise SkipSample(Skip.CAPTION_MISSING)
    return text


def image_bytes(members: dict[str, bytes]) -> bytes:
    image = image_member(members)
    if image is None:
        raise SkipSample(Skip.IMAGE_MISSING)
    return image[1]


# -- the stream ---------------------------------------------------------------------


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 (B, 3, H, W)
    texts: torch.Tensor  # int64 (B, context_length)
    keys: list[str]
    skipped: dict[str, int]  # samples skipped by reason since the previous batch of this reader
    epoch: int  # the reader's epoch when the batch was completed
    worker: int  # the logical worker (see ShardStream) that made the batch
    position: tuple[int, int]  # (epoch, samples drawn in it): where this reader resumes after this batch


def epoch_shard_order(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    """The same permutation on every rank and worker: a function of (seed, epoch) only."""
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def resampled_shards(shards: list[Shard], seed: int, epoch: int, reader: int, readers: int) -> list[Shard]:
    """Resampled mode: ``ceil(len(shards) / readers)`` shards drawn with replacement for one reader.

    An "epoch" here is only a unit of bookkeeping (about one pass over the data across all
    readers); it keeps resume replays short and makes the draw a pure function of its inputs.
    """
    rng = random.Random(f"resample:{seed}:{epoch}:{reader}:{readers}")
    return [rng.choice(shards) for _ in range(math.ceil(len(shards) / readers))]


def shuffled(items: Iterator[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    """A seeded shuffle buffer: fill to ``buffer_size``, then emit a random slot per new item."""
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class ShardStream(torch.utils.data.IterableDataset):
    """Batches from a list of shards, for one rank; DataLoader workers split it further.

    ``repeat=True`` (training) loops over epochs forever, batches flowing across epoch
    boundaries, so every rank yields as many batches as the loop asks for even when
    shards do not divide evenly among readers. ``repeat=False`` reads one epoch and
    yields a last partial batch.

    Readers are ``world_size * workers``. With at least as many shards as readers,
    each reader gets whole shards of each epoch's order; with fewer, every reader reads
    every shard and keeps every ``n``-th sample (correct, but more bytes read).

    Resuming: the DataLoader takes batches from its workers in turn (0, 1, ..., 0, 1, ...).
    After ``k`` batches, the next one is due from worker ``k % workers``; so a resumed
    stream is given ``worker_offset = k % workers`` and its physical worker ``p`` plays
    logical worker ``(p + worker_offset) % workers``, whose reading starts at
    ``start_positions[logical]`` (an ``(epoch, drawn)`` pair from ``Batch.position``).
    """

    shards: list[Shard]
    batch_size: int  # per rank
    image_size: int
    tokenize: Callable[[list[str]], torch.Tensor]
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 2000
    repeat: bool = True
    resampled: bool = False
    start_epoch: int = 0  # where a logical worker without a start position begins
    start_positions: tuple[tuple[int, int], ...] = ()  # per logical worker: (epoch, samples drawn)
    worker_offset: int = 0
    max_image_pixels: int = 1 << 26

    def __post_init__(self) -> None:
        super().__init__()
        if not self.shards:
            raise ValueError("ShardStream needs at least one shard")

    def _reader(self) -> tuple[int, int, int]:
        """(reader index, reader count, logical worker index) of the calling process."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (worker + self.worker_offset) % workers
        # Interleaved (worker-major), so each rank's workers get shards spread over the order
        # and ranks end up with equal shares whenever the shard count allows.
        return logical * self.world_size + self.rank, self.world_size * workers, logical

    def _epoch_samples(self, epoch: int, reader: int, readers: int, skipped: Counter) -> Iterator[RawSample]:
        """This reader's samples of one epoch, in shard order (before the shuffle buffer)."""
        if self.resampled:
            for shard in resampled_shards(self.shards, self.seed, epoch, reader, readers):
                yield from iter_tar_samples(shard.path, skipped)
            return
        order = epoch_shard_order(self.shards, self.seed, epoch)
        if len(order) >= readers:
            for shard in order[reader::readers]:
                yield from iter_tar_samples(shard.path, skipped)
            return
        index = 0
        for shard in order:
            for sample in iter_tar_samples(shard.path, skipped):
                if index % readers == reader:
                    yield sample
                index += 1

    def _drawn(self, reader: int, readers: int, logical: int, skipped: Counter) -> Iterator[tuple[int, int, RawSample]]:
        """``(epoch, n, sample)``: the shuffled stream, where ``sample`` is the epoch's ``n``-th draw.

        Draws up to the start position are replayed and dropped without decoding; the skip
        counts they raise were already reported before the checkpoint, so they are dropped too.
        """
        epoch, resume_at = (
            self.start_positions[logical] if logical < len(self.start_positions) else (self.start_epoch, 0)
        )
        while True:
            rng = random.Random(f"buffer:{self.seed}:{epoch}:{reader}:{readers}")
            drawn = 0
            for sample in shuffled(self._epoch_samples(epoch, reader, readers, skipped), self.shuffle_buffer, rng):
                drawn += 1
                if drawn <= resume_at:
                    if drawn == resume_at:
                        skipped.clear()
                    continue
                yield epoch, drawn, sample
            if not self.repeat:
                return
            if drawn == 0:  # looping again would spin forever on the same failures
                raise RuntimeError(
                    f"reader {reader} of {readers} read no samples in epoch {epoch} "
                    f"(skipped: {dict(skipped) or 'none'}); are the shards still there?"
                )
            epoch, resume_at = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        reader, readers, logical = self._reader()
        if not self.resampled and len(self.shards) < readers and reader == 0:
            log.warning("%d shards for %d readers: every reader reads every shard", len(self.shards), readers)
        skipped: Counter = Counter()
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        position = (self.start_epoch, 0)
        for epoch, drawn, sample in self._drawn(reader, readers, logical, skipped):
            position = (epoch, drawn)
            try:
                caption = decode_caption(sample.members)
                image = decode_image(image_bytes(sample.members), self.image_size, self.max_image_pixels)
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - one bad sample must not end a week-long run
                skipped[Skip.TRANSFORM_ERROR] += 1
                if skipped[Skip.TRANSFORM_ERROR] == 1:
                    log.warning("sample %s: transform failed (%s: %s); skipped", sample.key, type(exc).__name__, exc)
                continue
            images.append(image)
            captions.append(caption)
            keys.append(sample.key)
            if len(images) == self.batch_size:
                yield self._batch(images, captions, keys, skipped, logical, position)
                images, captions, keys = [], [], []
        if images or skipped:  # with no images left, an empty batch still carries the counts
            yield self._batch(images, captions, keys, skipped, logical, position)

    def _batch(self, images, captions, keys, skipped: Counter, logical: int, position: tuple[int, int]) -> Batch:
        """Assemble a batch; takes (and clears) the skip counts gathered since the last one."""
        delta = dict(skipped)
        skipped.clear()  # cleared, not replaced: the readers hold this same Counter
        if images:
            stacked = torch.stack(images)
            tokens = self.tokenize(captions)
        else:
            stacked = torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
            tokens = torch.empty((0, 0), dtype=torch.long)
        return Batch(stacked, tokens, keys, delta, position[0], logical, position)


def make_loader(stream: ShardStream, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader that passes the stream's ready-made batches through unchanged.

    Its workers are taken in strict turn (the default ``in_order``): the resume
    bookkeeping in ``ShardStream`` relies on it.
    """
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # the stream batches (so skip counts travel with batches)
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        in_order=True,
    )


# -- the training stream and where it stands ----------------------------------------


@dataclass
class Cursor:
    """Where one rank's training stream stands: with the same shards and layout, enough to go on exactly."""

    epoch: int = 0  # of the last batch taken; where a reader without a position starts
    batches_taken: int = 0
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # logical worker -> (epoch, drawn)
    skipped: Counter = field(default_factory=Counter)  # this rank's skipped samples so far, by reason

    def advance(self, batch: Batch) -> None:
        self.skipped.update(batch.skipped)
        self.positions[batch.worker] = batch.position
        self.batches_taken += 1
        self.epoch = batch.epoch

    def state_dict(self) -> dict:
        return {
            "batches_taken": self.batches_taken,
            "positions": {w: list(p) for w, p in self.positions.items()},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_state(cls, state: dict, epoch: int) -> Cursor:
        positions = {int(w): (int(e), int(n)) for w, (e, n) in state["positions"].items()}
        return cls(epoch, int(state["batches_taken"]), positions, Counter(state["skipped"]))


class TrainStream:
    """This rank's endless training batches, from where ``cursor`` stands; taking a batch moves the cursor.

    ``stream_options`` are ``ShardStream``'s (batch size, tokenizer, seed, rank, ...).
    """

    def __init__(self, shards: list[Shard], cursor: Cursor, workers: int, **stream_options):
        logical = max(1, workers)  # logical workers (see ShardStream): at least the main process
        stream = ShardStream(
            shards,
            repeat=True,
            start_epoch=cursor.epoch,
            start_positions=tuple(cursor.positions.get(w, (0, 0)) for w in range(logical)) if cursor.positions else (),
            worker_offset=cursor.batches_taken % logical,
            **stream_options,
        )
        self.cursor = cursor
        self.wait_s = 0.0  # seconds spent waiting for batches
        self._batches = iter(make_loader(stream, workers))

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        began = time.perf_counter()
        batch = next(self._batches)
        self.wait_s += time.perf_counter() - began
        self.cursor.advance(batch)
        return batch
