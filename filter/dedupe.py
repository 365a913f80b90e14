"""Global dedupe as numpy kernels: near duplicates (first-of-group is ``core.groups``).

Every row carries a ``row_id`` (``shard << 32 | row``, see ``filter.facts``) whose
order is key order, and every rule here keeps **the smallest row id** of each group
— the first acceptable copy in key order. That makes the decisions independent of
how rows are partitioned or how many workers run: a partition holds whole groups
(rows are routed by their group key), and the minimum of a group does not depend
on the order its members arrive in.

Near duplicates: two 64-bit pHashes within ``threshold`` bits. Candidates come from
banded locality-sensitive hashing by bit sampling: band ``j`` reads ``bits`` fixed
bit positions (drawn once from a constant seed), and two hashes are candidates when
they agree on every position of some band. A pair at Hamming distance ``d`` agrees
on one band with probability ``C(64-d, bits) / C(64, bits)``, so ``bands`` bands
find it with ``1 - (1 - p)^bands`` — ``plan_bands`` picks bands for a wanted recall
at the threshold, and band width from the row count so that buckets stay small.
Candidates are verified by exact Hamming distance; verified pairs are edges, and
each connected component keeps its smallest row id (union of pairs, not a greedy
walk: the result cannot depend on the order pairs are found in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_BAND_SEED = 0x5EED_B17


# -- near duplicates -----------------------------------------------------------------


@dataclass(frozen=True)
class BandPlan:
    bands: int
    bits: int
    threshold: int

    def recall_at(self, distance: int) -> float:
        """Chance that a pair at ``distance`` shares at least one band."""
        if distance > 64 - self.bits:
            return 0.0
        agree = math.comb(64 - distance, self.bits) / math.comb(64, self.bits)
        return 1.0 - (1.0 - agree) ** self.bands

    def positions(self) -> np.ndarray:
        """(bands, bits) bit positions, the same in every process and every run."""
        rng = np.random.default_rng(_BAND_SEED)
        return np.stack([rng.choice(64, self.bits, replace=False) for _ in range(self.bands)])


def plan_bands(rows: int, threshold: int, recall: float, bands: int = 0, bits: int = 0,
               max_bands: int = 256) -> BandPlan:
    """Band width from the row count (about 16 rows per bucket), band count for ``recall``.

    Wider bands mean fewer random collisions but a lower chance per band for true
    pairs, hence more bands; 16 rows per bucket keeps the verified pairs per band
    near 8 per row whatever the pool size.
    """
    if not bits:
        bits = int(min(32, max(8, math.ceil(math.log2(max(rows, 2) / 16)))))
        bits = min(bits, 64 - threshold)
    if not bands:
        agree = math.comb(64 - threshold, bits) / math.comb(64, bits)
        bands = 1 if agree >= 1 else math.ceil(math.log(1 - recall) / math.log(1 - agree))
        bands = int(min(max(bands, 1), max_bands))
    return BandPlan(bands=bands, bits=bits, threshold=threshold)


def band_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, bands) uint64: band index in the high 32 bits, the sampled bits in the low 32."""
    return np.stack([band_key(hashes, positions, j) for j in range(positions.shape[0])], axis=1)


def band_key(hashes: np.ndarray, positions: np.ndarray, band: int) -> np.ndarray:
    """(n,) uint64 keys of one band: the band index in the high 32 bits, its bits below."""
    value = np.zeros(len(hashes), dtype=np.uint64)
    for k, position in enumerate(positions[band].tolist()):
        value |= ((hashes >> np.uint64(63 - position)) & np.uint64(1)) << np.uint64(k)
    return value | (np.uint64(band) << np.uint64(32))


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """A well-mixed partition number for each uint64 key (Fibonacci hashing)."""
    mixed = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(partitions)).astype(np.int64)


@dataclass(frozen=True)
class NearGuard:
    """What else a near duplicate must share besides its pHash (NaN values always pass).

    A re-encode, resize or slight crop keeps an image's shape and tonal spread; two
    different pictures whose hashes happen to be close rarely share both. On the
    demo corpus these guards take the false matches at 10 bits from 143 to 5
    (BENCHMARKS.md, curation).
    """

    max_log_aspect_change: float = float("inf")
    max_luma_change: float = float("inf")

    def passes(self, aspect_a, aspect_b, luma_a, luma_b) -> np.ndarray:
        aspect_gap = np.abs(aspect_a - aspect_b)
        luma_gap = np.abs(luma_a - luma_b)
        return ~(aspect_gap > self.max_log_aspect_change) & ~(luma_gap > self.max_luma_change)


def candidate_edges(bucket_keys: np.ndarray, row_ids: np.ndarray, hashes: np.ndarray, threshold: int,
                    log_aspect: np.ndarray | None = None, luma: np.ndarray | None = None,
                    guard: NearGuard = NearGuard()) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b, sharing a bucket key, within ``threshold`` bits, passing ``guard``.

    Pairs are enumerated run by run without Python loops over rows: for offset
    ``o``, every position whose run still has a member ``o`` places further on is
    paired with it, and positions whose run is exhausted drop out, so the work is
    the number of candidate pairs.
    """
    if len(row_ids) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.lexsort((row_ids, bucket_keys))
    keys, ids, codes = bucket_keys[order], row_ids[order], hashes[order]
    aspect = log_aspect[order] if log_aspect is not None else np.full(len(order), np.nan, np.float32)
    tone = luma[order] if luma is not None else np.full(len(order), np.nan, np.float32)
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    run_end = np.empty(len(keys), np.int64)
    bounds = np.flatnonzero(starts).tolist() + [len(keys)]
    run_end[:] = np.repeat(np.array(bounds[1:]), np.diff(np.array(bounds)))
    left_parts, right_parts = [], []
    active = np.flatnonzero(run_end - np.arange(len(keys)) > 1)  # positions with a later run-mate
    offset = 1
    while len(active):
        partner = active + offset
        distance = np.bitwise_count(codes[active] ^ codes[partner])
        close = (distance <= threshold) & guard.passes(aspect[active], aspect[partner], tone[active], tone[partner])
        left_parts.append(ids[active[close]])
        right_parts.append(ids[partner[close]])
        offset += 1
        active = active[run_end[active] - active > offset]
    if not left_parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    left, right = np.concatenate(left_parts), np.concatenate(right_parts)
    return np.minimum(left, right), np.maximum(left, right)


def unique_edges(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(left) == 0:
        return left, right
    pairs = np.unique(np.stack([left, right], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def components_first(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rejected row ids, keeper row ids): every node of a component but its smallest.

    Minimum-label propagation over the edge list with pointer jumping; converges in
    a few rounds for the shallow components near duplicates form.
    """
    if len(left) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inverse = np.unique(np.concatenate([left, right]), return_inverse=True)
    a, b = inverse[: len(left)], inverse[len(left):]
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # pointer jumping: follow labels to their own labels
        if np.array_equal(new, label):
            break
        label = new
    rejected = label != np.arange(len(nodes))
    return nodes[rejected], nodes[label[rejected]]


def hamming_to_set(hashes: np.ndarray, references: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each hash, the smallest Hamming distance to any reference (64 if none)."""
    best = np.full(len(hashes), 64, dtype=np.int64)
    if len(references) == 0 or len(hashes) == 0:
        return best
    for start in range(0, len(references), chunk):
        block = references[start : start + chunk]
        distances = np.bitwise_count(hashes[:, None] ^ block[None, :]).min(axis=1)
        best = np.minimum(best, distances)
    return best
