"""A dataset's statistics from its metadata alone: one mergeable summary per pool shard.

``summarize_shard`` reads one pool shard's parquet (ours, or img2dataset's) and, when
given, its decisions, and counts everything the report shows with vectorised pyarrow /
numpy work; ``Summary.merge`` adds two summaries. Memory is bounded whatever the size
of the dataset: distributions are fixed fine-grained histograms (quantiles are read off
them: exact for integer sizes up to the range's end, within 1.2 percent for the
log-scaled ones; values past a range's ends fall in its end bins, and ``clamped`` says
when that happened), domains are
capped at ``DOMAIN_CAPACITY`` (the smallest are dropped, and the report says how many
rows that was), and only near-duplicate clusters grow with the data (8 bytes per
rejected duplicate).

The funnel, per input row:

    input rows ─ not unique (dup_url, before download) → unique
               ─ not attempted (caption or URL rules, before download) → attempted
               ─ failed (network, HTTP, safety, decode) → downloaded
               ─ rejected by the filter (decisions) → kept
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.layout import STATS_SUFFIX, shard_name
from core.reasons import NOT_ATTEMPTED, NOT_UNIQUE, Reason, reason_from_message

DOMAIN_CAPACITY = 100_000  # distinct domains held exactly; beyond it the smallest are dropped
DOMAIN_COLUMNS = ("rows", "attempted", "downloaded", "kept", "opt_out")
STEPS = ("input_rows", "unique", "attempted", "downloaded", "kept")
SERIES = ("downloaded", "kept")
UNCLASSIFIED = "unclassified"  # an img2dataset error message none of our reasons matches
UNDECIDED = "undecided"  # a pool row the decisions have no row for
CLIP_COLUMNS = ("clip_score", "similarity")  # ours (decisions), LAION-style input columns
# The authority of an http-like URL (scheme optional: "//cdn.example/x" too); the host is
# what follows its last "@", without the port. A backslash ends it, as in browsers.
_AUTHORITY = r"^\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//(?P<authority>[^/?#\\]*)"
_HOST = r"^(?P<host>\[[^\]]*\]|[^:]*)"
KEY_NAMES_HELD = 100_000  # non-numeric duplicate keys remembered for naming the largest clusters


@dataclass(frozen=True)
class Binning:
    """Fine bins of one distribution: integer values, or a log / linear scale."""

    label: str
    unit: str
    scale: str  # int | log10 | log2 | linear
    lo: float
    hi: float
    bins: int = 0  # for the non-integer scales

    @property
    def size(self) -> int:
        return int(self.hi - self.lo) + 1 if self.scale == "int" else self.bins

    def index(self, values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        if self.scale == "int":
            return np.clip(values, self.lo, self.hi).astype(np.int64) - int(self.lo)
        if self.scale in ("log10", "log2"):
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log10(values) if self.scale == "log10" else np.log2(values)
        position = (values - self.lo) / (self.hi - self.lo) * self.bins
        return np.clip(np.floor(np.nan_to_num(position, nan=0.0, neginf=0.0, posinf=self.bins - 1)), 0,
                       self.bins - 1).astype(np.int64)

    def value(self, i: np.ndarray | int, at: float = 0.0) -> np.ndarray | float:
        """The value at fraction ``at`` of fine bin ``i`` (0: its lower edge, 0.5: its middle on the scale)."""
        if self.scale == "int":
            return np.asarray(i) + self.lo
        x = self.lo + (np.asarray(i, dtype=np.float64) + at) * (self.hi - self.lo) / self.bins
        return 10 ** x if self.scale == "log10" else 2 ** x if self.scale == "log2" else x


DISTRIBUTIONS: dict[str, Binning] = {
    "width": Binning("width of the image as found", "px", "int", 0, 16384),
    "height": Binning("height of the image as found", "px", "int", 0, 16384),
    "aspect_ratio": Binning("aspect ratio (width / height)", "", "log2", -5, 5, 1000),
    "file_size": Binning("file size as downloaded", "bytes", "log10", 1, 9, 800),
    "caption_chars": Binning("caption length", "characters", "int", 0, 2000),
    "caption_words": Binning("caption length", "words", "int", 0, 400),
    "clip_score": Binning("CLIP score (image-caption cosine similarity)", "", "linear", -1, 1, 400),
}


@dataclass
class Summary:
    """Counts of one or more pool shards; ``merge`` adds another one."""

    layout: str = ""
    funnel: Counter = field(default_factory=Counter)  # step -> rows reaching it
    dropped: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STEPS[1:]})
    unclassified_messages: Counter = field(default_factory=Counter)
    hists: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    languages: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SERIES})
    domains: dict[str, np.ndarray] = field(default_factory=dict)
    domains_dropped_rows: int = 0
    duplicates_of: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"dup_near": [], "dup_exact": []})
    key_length: int = 0
    key_names: dict[int, str] = field(default_factory=dict)  # hashed non-numeric duplicate keys
    undecided: int = 0  # pool rows without a decision row (counted as not kept)
    opt_out_directives: Counter = field(default_factory=Counter)
    shards: list[dict[str, Any]] = field(default_factory=list)
    time_span: list[float | None] = field(default_factory=lambda: [None, None])
    has_decisions: bool = False

    def merge(self, other: Summary) -> Summary:
        self.layout = self.layout or other.layout
        self.funnel.update(other.funnel)
        for step, counts in other.dropped.items():
            self.dropped[step].update(counts)
        self.unclassified_messages.update(other.unclassified_messages)
        self.unclassified_messages = Counter(dict(self.unclassified_messages.most_common(50)))
        for name, series in other.hists.items():
            mine = self.hists.setdefault(name, {s: np.zeros_like(v) for s, v in series.items()})
            for s, v in series.items():
                mine[s] += v
        for s in SERIES:
            self.languages[s].update(other.languages[s])
        for domain, counts in other.domains.items():
            if domain in self.domains:
                self.domains[domain] += counts
            else:
                self.domains[domain] = counts.copy()
        self.domains_dropped_rows += other.domains_dropped_rows
        if len(self.domains) > DOMAIN_CAPACITY:
            ranked = sorted(self.domains.items(), key=lambda kv: -kv[1][0])
            for domain, counts in ranked[DOMAIN_CAPACITY:]:
                self.domains_dropped_rows += int(counts[0])
            self.domains = dict(ranked[:DOMAIN_CAPACITY])
        for kind, arrays in other.duplicates_of.items():
            self.duplicates_of[kind].extend(arrays)
        self.key_length = self.key_length or other.key_length
        for h, k in other.key_names.items():
            if len(self.key_names) >= KEY_NAMES_HELD:
                break
            self.key_names.setdefault(h, k)
        self.undecided += other.undecided
        self.opt_out_directives.update(other.opt_out_directives)
        self.shards.extend(other.shards)
        starts = [t for t in (self.time_span[0], other.time_span[0]) if t is not None]
        ends = [t for t in (self.time_span[1], other.time_span[1]) if t is not None]
        self.time_span = [min(starts) if starts else None, max(ends) if ends else None]
        self.has_decisions = self.has_decisions or other.has_decisions
        return self


# -- one pool shard ---------------------------------------------------------------------------


# The decisions' columns as they are meant to be: one written with nulls only comes back as type null.
DECISION_TYPES = {"key": pa.string(), "keep": pa.bool_(), "reason": pa.string(), "dup_of": pa.string(),
                  "clip_score": pa.float64(), "language": pa.string()}


def _read(path: str, wanted: tuple[str, ...], types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """The ``wanted`` columns the file has; those in ``types`` cast to their type (an all-null one, say)."""
    with storage.open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = [c for c in wanted if c in parquet.schema_arrow.names]
        table = parquet.read(columns=names)
    for name, kind in (types or {}).items():
        if name in table.column_names and table.schema.field(name).type != kind:
            table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table[name], kind))
    return table


def _strings(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A column as strings (all-null columns written without a schema come as type null)."""
    if name in table.column_names:
        return pc.cast(table[name], pa.string())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])


def hosts_of(urls: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Lower-cased host of each URL, without userinfo, port or a trailing dot; "(no host)" if none."""
    authority = pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _AUTHORITY), "authority")
    authority = pc.replace_substring_regex(pc.fill_null(authority, ""), r"^.*@", "")
    host = pc.struct_field(pc.extract_regex(authority, _HOST), "host")
    host = pc.utf8_rtrim(pc.utf8_lower(pc.fill_null(host, "")), ".")
    return pc.if_else(pc.equal(host, ""), "(no host)", host)


def _numbers(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return pc.fill_null(pc.cast(table[name], pa.float64()), np.nan).to_numpy()


def _is(values: pa.ChunkedArray, codes: list[str]) -> np.ndarray:
    """Row mask: the value is one of ``codes`` (null is none of them)."""
    return pc.is_in(values, value_set=pa.array(codes, pa.string())).to_numpy(zero_copy_only=False)


def _value_counts(values: pa.Array | pa.ChunkedArray, mask: np.ndarray, null_as: str) -> Counter:
    chosen = pc.fill_null(pc.filter(values, pa.array(mask)), null_as)
    return Counter({d["values"]: d["counts"] for d in pc.value_counts(chosen).to_pylist()})


def _reasons(pool: pa.Table, layout: str) -> pa.ChunkedArray:
    """The pool rows' reason codes; for img2dataset, mapped from its error messages."""
    if layout == "webclip":
        return pool["reason"]
    messages = pc.dictionary_encode(_strings(pool, "error_message").combine_chunks())
    mapped = [None if m is None else (r.value if (r := reason_from_message(m)) else UNCLASSIFIED)
              for m in messages.dictionary.to_pylist()]
    return pa.chunked_array([pc.take(pa.array(mapped, pa.string()), messages.indices)])


def _as_int_keys(keys: pa.Array, names: dict[int, str]) -> np.ndarray:
    """Keys as int64 (ours are digits); others hashed to 64 bits, remembered in ``names`` (capped)."""
    if pc.all(pc.match_substring_regex(keys, r"^[0-9]{1,18}$")).as_py() is not False:
        return pc.cast(keys, pa.int64()).to_numpy(zero_copy_only=False)
    hashed = []
    for k in keys.to_pylist():
        h = int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True)
        if len(names) < KEY_NAMES_HELD:
            names.setdefault(h, k)
        hashed.append(h)
    return np.array(hashed, dtype=np.int64)


def _align(decided: pa.Table, keys: pa.ChunkedArray, summary: Summary) -> pa.Table:
    """Decision rows in the pool's row order; a pool row without one gets keep=false, reason "undecided"."""
    if decided.num_rows == len(keys) and (not len(keys) or pc.all(pc.equal(decided["key"], keys)).as_py()):
        return decided
    order = pc.index_in(keys, decided["key"])
    missing = pc.is_null(order)
    summary.undecided += int(pc.sum(missing).as_py() or 0)
    aligned = decided.take(order)  # a row without a decision: nulls
    for name, value in (("keep", False), ("reason", UNDECIDED)):
        if name in aligned.column_names:
            index = aligned.schema.get_field_index(name)
            aligned = aligned.set_column(index, name, pc.if_else(missing, value, aligned[name]))
    return aligned


def _histograms(summary: Summary, columns: dict[str, np.ndarray | None], masks: dict[str, np.ndarray]) -> None:
    for name, values in columns.items():
        if values is None:
            continue
        binning = DISTRIBUTIONS[name]
        valid = np.isfinite(values)
        if binning.scale in ("log10", "log2"):
            valid &= values > 0
        elif binning.scale == "int":
            valid &= values >= 0
        series = {}
        for s, mask in masks.items():
            chosen = values[mask & valid]
            series[s] = np.bincount(binning.index(chosen), minlength=binning.size).astype(np.int64)
        if any(v.any() for v in series.values()) or name != "clip_score":
            summary.hists[name] = series


def summarize_shard(pool: str, decisions: str, shard_id: int) -> Summary:
    """Everything the report counts, for one pool shard (``decisions`` may be empty)."""
    name = shard_name(shard_id)
    table = _read(storage.join(pool, f"{name}.parquet"),
                  ("key", "url", "caption", "status", "reason", "error_message", "original_width", "original_height",
                   "download_bytes", *CLIP_COLUMNS))
    layout = "webclip" if "reason" in table.column_names else "img2dataset"
    summary = Summary(layout=layout)
    n = table.num_rows
    reasons = _reasons(table, layout)
    reasons = pc.cast(reasons, pa.string())
    success = pc.fill_null(pc.equal(_strings(table, "status"), "success"), False).to_numpy(zero_copy_only=False)
    not_unique = _is(reasons, [r.value for r in NOT_UNIQUE]) & ~success
    not_attempted = _is(reasons, [r.value for r in NOT_ATTEMPTED]) & ~success & ~not_unique
    attempted = ~not_unique & ~not_attempted
    keep = success.copy()
    decided = None
    if decisions:
        summary.has_decisions = True
        decided = _align(_read(storage.join(decisions, f"{name}.parquet"), tuple(DECISION_TYPES), DECISION_TYPES),
                         table["key"], summary)
        keep = success & pc.fill_null(decided["keep"], False).to_numpy(zero_copy_only=False)

    summary.funnel.update({"input_rows": n, "unique": int((~not_unique).sum()), "attempted": int(attempted.sum()),
                           "downloaded": int(success.sum()), "kept": int(keep.sum())})
    summary.dropped["unique"] = _value_counts(reasons, not_unique, UNCLASSIFIED)
    summary.dropped["attempted"] = _value_counts(reasons, not_attempted, UNCLASSIFIED)
    failed = attempted & ~success
    summary.dropped["downloaded"] = _value_counts(reasons, failed, UNCLASSIFIED)
    if layout == "img2dataset":
        unmatched = failed & _is(reasons, [UNCLASSIFIED])
        summary.unclassified_messages = _value_counts(_strings(table, "error_message"), unmatched, "(none)")
    if decided is not None:
        summary.dropped["kept"] = _value_counts(decided["reason"], success & ~keep, UNCLASSIFIED)

    # Domains: rows, attempted, downloaded, kept and opt-outs per host.
    hosts = hosts_of(_strings(table, "url"))
    opt_out = _is(reasons, [Reason.OPT_OUT.value])
    grouped = pa.table({"host": hosts, "rows": np.ones(n, np.int64), "attempted": attempted.astype(np.int64),
                        "downloaded": success.astype(np.int64), "kept": keep.astype(np.int64),
                        "opt_out": opt_out.astype(np.int64)}).group_by("host").aggregate(
        [(c, "sum") for c in DOMAIN_COLUMNS])
    counts = np.stack([grouped[f"{c}_sum"].to_numpy() for c in DOMAIN_COLUMNS], axis=1) if n else np.zeros((0, 5))
    summary.domains = dict(zip(grouped["host"].to_pylist(), counts.astype(np.int64)))
    summary.opt_out_directives = _value_counts(_strings(table, "error_message"), opt_out, "(no detail)")

    # Distributions, for the downloaded rows and the kept ones.
    width, height = _numbers(table, "original_width"), _numbers(table, "original_height")
    captions = pc.fill_null(_strings(table, "caption"), "")
    clip = None
    if decided is not None and "clip_score" in decided.column_names:
        clip = _numbers(decided, "clip_score")
    if clip is None or not np.isfinite(clip).any():
        for column in CLIP_COLUMNS:
            if (candidate := _numbers(table, column)) is not None:
                clip = candidate
    aspect = None if width is None or height is None else np.divide(width, height, out=np.full(n, np.nan),
                                                                    where=height > 0)
    columns = {
        "width": width, "height": height, "aspect_ratio": aspect,
        "file_size": _numbers(table, "download_bytes"),
        "caption_chars": pc.utf8_length(captions).to_numpy().astype(np.float64),
        "caption_words": pc.list_value_length(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(captions)))
        .to_numpy().astype(np.float64) if n else np.zeros(0),
        "clip_score": clip,
    }
    _histograms(summary, columns, {"downloaded": success, "kept": keep})
    if decided is not None:
        languages = _strings(decided, "language")
        summary.languages = {"downloaded": _value_counts(languages, success, "(unknown)"),
                             "kept": _value_counts(languages, keep, "(unknown)")}
        for kind in ("dup_near", "dup_exact"):
            rows = pc.fill_null(pc.equal(decided["reason"], kind), False).to_numpy(zero_copy_only=False)
            if rows.any():
                of = pc.drop_null(pc.filter(_strings(decided, "dup_of"), pa.array(rows))).combine_chunks()
                if len(of):  # a duplicate whose kept copy is not named counts nowhere
                    summary.duplicates_of[kind].append(_as_int_keys(of, summary.key_names))
                    summary.key_length = summary.key_length or len(of[0].as_py())
    summary.shards.append(_shard_row(pool, name, summary, reasons, failed))
    stats_path = storage.join(pool, name + STATS_SUFFIX)
    if storage.exists(stats_path):
        stats = storage.read_json(stats_path)
        summary.time_span = [stats.get("start_time"), stats.get("end_time")]
        summary.shards[-1]["duration_s"] = round(stats["duration"], 1) if stats.get("duration") else None
    return summary


def _shard_row(pool: str, name: str, summary: Summary, reasons, failed: np.ndarray) -> dict[str, Any]:
    f = summary.funnel
    top = _value_counts(reasons, failed, UNCLASSIFIED).most_common(1)
    return {
        "shard": name,
        "rows": f["input_rows"],
        "attempted": f["attempted"],
        "downloaded": f["downloaded"],
        "success_rate": round(f["downloaded"] / f["attempted"], 4) if f["attempted"] else None,
        "kept": f["kept"],
        "keep_rate": round(f["kept"] / f["downloaded"], 4) if f["downloaded"] else None,
        "top_failure": f"{top[0][0]} ({top[0][1]})" if top else "",
        "duration_s": None,
    }


# -- the whole dataset --------------------------------------------------------------------------


def quantiles(binning: Binning, counts: np.ndarray) -> dict[str, float] | None:
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(counts)
    out = {}
    for label, q in (("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9),
                     ("max", 1.0)):
        rank = max(1, int(np.ceil(q * total)))
        i = int(np.searchsorted(cumulative, rank))
        value = float(binning.value(i, 0.5))
        out[label] = int(value) if binning.scale == "int" else round(value, 4 if binning.scale == "linear" else 3)
    centres = binning.value(np.arange(len(counts)), 0.5)
    out["mean_approx"] = round(float((counts * centres).sum() / total), 3)
    out["count"] = total
    # Values beyond the binned range are counted in the end bins: then min / max (and any
    # quantile there) are bounds, not values.
    out["clamped"] = bool(counts[-1] > 0 if binning.scale == "int" else counts[0] > 0 or counts[-1] > 0)
    return out


def display_bins(binning: Binning, series: dict[str, np.ndarray], target: int = 40) -> dict[str, Any]:
    """Coarse bins for a plot: the fine bins between the 0.5th and 99.5th percentiles, grouped."""
    combined = sum(series.values())
    total = combined.sum()
    if total == 0:
        return {"edges": [], "series": {s: [] for s in series}}
    cumulative = np.cumsum(combined)
    lo = int(np.searchsorted(cumulative, max(1, total * 0.005)))
    hi = int(np.searchsorted(cumulative, total * 0.995)) + 1
    width = max(1, int(np.ceil((hi - lo) / target)))
    starts = list(range(lo, hi, width))
    edges = [float(binning.value(i)) for i in starts] + [float(binning.value(min(hi, starts[-1] + width)))]
    out = {}
    for s, counts in series.items():
        grouped = [int(counts[a : a + width].sum()) for a in starts]
        grouped[0] += int(counts[:lo].sum())  # the tails go into the end bins, so bars add up
        grouped[-1] += int(counts[starts[-1] + width :].sum())
        out[s] = grouped
    return {"edges": edges, "series": out}


def cluster_sizes(summary: Summary, kind: str) -> dict[str, Any]:
    arrays = summary.duplicates_of[kind]
    if not arrays:
        return {"clusters": 0, "rejected": 0, "sizes": {}, "largest": []}
    keys, counts = np.unique(np.concatenate(arrays), return_counts=True)
    sizes, clusters = np.unique(counts + 1, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:10]
    largest = [{"kept_key": summary.key_names.get(int(keys[i])) or str(int(keys[i])).zfill(summary.key_length),
                "size": int(counts[i] + 1)} for i in order]
    return {"clusters": len(keys), "rejected": int(counts.sum()),
            "sizes": {str(int(s)): int(c) for s, c in zip(sizes, clusters)}, "largest": largest}
