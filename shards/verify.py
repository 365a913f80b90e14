"""``python -m shards.verify``: are the shards on storage the ones their records describe?

Recomputes every tar's and parquet's bytes and sha256, parses every tar to its end,
and checks each shard's tar against its parquet (the same samples, each with its
image and metadata members) and against the counts recorded for it. The records are
``manifest.json`` for train shards, else each shard's ``_stats.json`` (ours list the
files' sha256; img2dataset's hold counts only). Every finding is one of:

* ``missing``    — a shard (or one of its files) the records name is not there;
* ``extra``      — a shard file the manifest does not name;
* ``corrupted``  — bytes or sha256 differ from the record, or the tar / parquet cannot
                   be read to its end (a flipped byte, a truncated upload);
* ``mismatched`` — the files read fine but disagree: sample counts, keys in the tar
                   vs the parquet, a sample without its image or metadata member.

Exit status: 0 when nothing was found, 1 otherwise (2 for a bad command line).
Shards are checked in parallel by ``core.executor`` (local processes, or Ray tasks on
a cluster: a big pool checked by many machines); each streams its tar once.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.config import parse_config
from core.executor import Executor
from core.layout import IMAGE_EXTENSIONS, STATS_SUFFIX, shard_id_of, shard_name
from core.tarreader import TarStreamError, iter_tar_files
from shards.config import VerifyConfig
from shards.manifest import MANIFEST

KINDS = ("missing", "extra", "corrupted", "mismatched")
_EXAMPLES = 3  # keys quoted per finding
PARQUET_IN_MEMORY = 64 << 20  # a parquet up to this size is read once, hashed and parsed from memory


@dataclass
class Finding:
    kind: str  # one of KINDS
    path: str  # the file (or shard) concerned, relative to the folder
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.upper():<10} {self.path}: {self.detail}"


@dataclass
class ShardCheck:
    """What one shard's check found and counted."""

    shard: str
    samples: int = 0
    bytes: int = 0
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Expected:
    """What the records say about one shard (any part may be unknown)."""

    tar: dict[str, Any] | None = None  # name, bytes, sha256
    parquet: dict[str, Any] | None = None
    count: int | None = None  # samples in the tar
    source: str = "manifest.json"
    stats: dict | None = None  # the shard's _stats.json, when already read


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._handle.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


# -- one shard -------------------------------------------------------------------------------


def _compare_file(check: ShardCheck, name: str, record: dict | None, size: int, sha: str, source: str) -> bool:
    if not record:
        return True
    if record.get("bytes") is not None and record["bytes"] != size:
        check.findings.append(Finding("corrupted", name, f"{size} bytes, {source} says {record['bytes']}"))
        return False
    if record.get("sha256") and record["sha256"] != sha:
        check.findings.append(Finding("corrupted", name, f"sha256 {sha[:16]}… differs from {source}'s "
                                                         f"{record['sha256'][:16]}…"))
        return False
    return True


def _read_tar(check: ShardCheck, folder: str, name: str, expected: Expected) -> dict[str, set[str]] | None:
    """Members by key; None when the tar is damaged (the finding is recorded)."""
    path = storage.join(folder, name)
    members: dict[str, set[str]] = defaultdict(set)
    duplicates: list[str] = []
    with storage.open_file(path) as raw:
        reader = _HashingReader(raw)
        try:
            for member, _data in iter_tar_files(reader, reopen=lambda: storage.open_file(path)):
                key, _, ext = member.rpartition("/")[2].partition(".")
                if ext.lower() in members[key]:
                    duplicates.append(member)
                members[key].add(ext.lower())
            damage = None
        except TarStreamError as exc:
            damage = str(exc)
        reader.drain()
    check.bytes += reader.bytes
    intact = _compare_file(check, name, expected.tar, reader.bytes, reader.sha256.hexdigest(), expected.source)
    if damage is not None:
        check.findings.append(Finding("corrupted", name, f"cannot be read to its end: {damage}"))
        return None
    if duplicates:
        check.findings.append(Finding("mismatched", name, f"{len(duplicates)} members stored twice, e.g. "
                                                          f"{', '.join(duplicates[:_EXAMPLES])}"))
    return members if intact else None


def _read_parquet_keys(check: ShardCheck, folder: str, name: str, expected: Expected) -> tuple[set[str], int] | None:
    """(keys of successful rows, row count); None when unreadable."""
    path = storage.join(folder, name)
    digest = hashlib.sha256()
    with storage.open_file(path) as handle:  # one read, hashed and parsed from memory: metadata parquets are small
        data: bytes | None = handle.read(PARQUET_IN_MEMORY + 1)
        digest.update(data)
        size = len(data)
        if size > PARQUET_IN_MEMORY:  # a parquet-layout shard holds its images: the rest hashed as a stream,
            data = None  # then the file parsed where it is
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    sha = digest.hexdigest()
    check.bytes += size
    if not _compare_file(check, name, expected.parquet, size, sha, expected.source):
        return None
    try:
        with contextlib.nullcontext(pa.BufferReader(data)) if data is not None else storage.open_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            if "key" not in parquet.schema_arrow.names:
                check.findings.append(Finding("mismatched", name, "no key column"))
                return None
            table = parquet.read(columns=[c for c in ("key", "status") if c in parquet.schema_arrow.names])
    except Exception as exc:  # noqa: BLE001  (any parse failure is this file's finding)
        check.findings.append(Finding("corrupted", name, f"not a readable parquet file: {exc}"))
        return None
    rows = table.num_rows
    if "status" in table.column_names:  # a pool: failures have rows too
        table = table.filter(pc.equal(table["status"], "success"))
    return set(table["key"].to_pylist()), rows


def check_shard(folder: str, shard_id: int, expected: Expected, files: set[str]) -> ShardCheck:
    """Every check of one shard whose files are ``files`` (names present in the folder)."""
    name = shard_name(shard_id)
    check = ShardCheck(name)
    marker = f"{name}{STATS_SUFFIX}"
    stats = expected.stats
    if stats is None and marker in files:
        stats = _read_json(check.findings, folder, marker)
    tar_name, parquet_name = f"{name}.tar", f"{name}.parquet"
    if tar_name in files:
        members = _read_tar(check, folder, tar_name, expected)
    elif f"{name}/" in files:  # img2dataset's `files` layout: a folder of key.ext files per shard
        members = _read_sample_folder(folder, name)
        tar_name = f"{name}/"
    else:
        members = None
    parquet = _read_parquet_keys(check, folder, parquet_name, expected) if parquet_name in files else None
    if members is None:
        return check
    samples = {k for k, exts in members.items() if exts & set(IMAGE_EXTENSIONS)}
    check.samples = len(samples)
    without_image = sorted(set(members) - samples)
    if without_image:
        check.findings.append(Finding("mismatched", tar_name, f"{len(without_image)} keys without an image member, "
                                                              f"e.g. {', '.join(without_image[:_EXAMPLES])}"))
    without_json = sorted(k for k in samples if "json" not in members[k])
    if without_json:
        check.findings.append(Finding("mismatched", tar_name, f"{len(without_json)} samples without a .json member, "
                                                              f"e.g. {', '.join(without_json[:_EXAMPLES])}"))
    if expected.count is not None and expected.count != len(samples):
        check.findings.append(Finding("mismatched", tar_name, f"holds {len(samples)} samples, {expected.source} "
                                                              f"says {expected.count}"))
    if stats is not None and stats.get("successes") is not None and stats["successes"] != len(samples):
        check.findings.append(Finding("mismatched", tar_name, f"holds {len(samples)} samples, {name}{STATS_SUFFIX} "
                                                              f"says {stats['successes']} successes"))
    if parquet is not None:
        keys, rows = parquet
        if stats is not None and stats.get("count") is not None and stats["count"] != rows:
            check.findings.append(Finding("mismatched", parquet_name, f"{rows} rows, {name}{STATS_SUFFIX} says "
                                                                      f"{stats['count']}"))
        only_parquet, only_tar = sorted(keys - samples), sorted(samples - keys)
        if only_parquet:
            check.findings.append(Finding("mismatched", tar_name, f"{len(only_parquet)} samples of {parquet_name} "
                                                                  f"missing from the tar, e.g. {', '.join(only_parquet[:_EXAMPLES])}"))
        if only_tar:
            check.findings.append(Finding("mismatched", tar_name, f"{len(only_tar)} samples not in {parquet_name}, "
                                                                  f"e.g. {', '.join(only_tar[:_EXAMPLES])}"))
    return check


def _read_json(findings: list[Finding], folder: str, name: str) -> dict | None:
    """A record (manifest, marker) as a dict; a truncated or damaged one is a finding, and None."""
    try:
        value = storage.read_json(storage.join(folder, name))
    except (ValueError, UnicodeDecodeError) as exc:
        findings.append(Finding("corrupted", name, f"not readable JSON: {exc}"))
        return None
    if not isinstance(value, dict) or not all(isinstance(f, dict) and "name" in f for f in value.get("files", [])):
        findings.append(Finding("corrupted", name, "not a record of this layout"))
        return None
    return value


def _read_sample_folder(folder: str, name: str) -> dict[str, set[str]]:
    members: dict[str, set[str]] = defaultdict(set)
    for path in storage.list_files(storage.join(folder, name)):
        key, _, ext = path.rsplit("/", 1)[-1].partition(".")
        members[key].add(ext.lower())
    return members


# -- the folder ------------------------------------------------------------------------------


def _shard_files(folder: str) -> dict[int, set[str]]:
    by_shard: dict[int, set[str]] = defaultdict(set)
    for path in storage.list_files(folder):
        name = path.rsplit("/", 1)[-1]
        shard_id = shard_id_of(name)
        if shard_id is not None:
            by_shard[shard_id].add(name)
        elif name.isdigit():  # a shard folder ({N}/, the files layout)
            by_shard[int(name)].add(f"{name}/")
    return by_shard


def plan_checks(folder: str) -> tuple[list[tuple], list[Finding], dict[str, Any]]:
    """(check-task arguments, findings from the listing alone, what the folder is)."""
    by_shard = _shard_files(folder)
    findings: list[Finding] = []
    tasks: list[tuple] = []
    manifest_path = storage.join(folder, MANIFEST)
    if storage.exists(manifest_path):
        manifest = _read_json(findings, folder, MANIFEST)
        if manifest is None:  # a truncated upload: nothing to check against
            return [], findings, {"records": MANIFEST}
        described = {"records": MANIFEST, "manifest_samples": manifest.get("total_samples")}
        listed: set[int] = set()
        for entry in manifest.get("shards", []):
            shard_id = shard_id_of(entry["name"])
            if shard_id is None:
                findings.append(Finding("mismatched", MANIFEST, f"names a shard {entry['name']!r} of no known layout"))
                continue
            listed.add(shard_id)
            name = shard_name(shard_id)
            present = by_shard.get(shard_id, set())
            wanted = [entry["name"], (entry.get("metadata") or {}).get("name") or f"{name}.parquet"]
            absent = [n for n in wanted if n not in present]
            for n in absent:
                findings.append(Finding("missing", n, f"listed in {MANIFEST}, not in the folder"))
            if len(absent) == len(wanted):
                continue
            if f"{name}{STATS_SUFFIX}" not in present:
                findings.append(Finding("missing", f"{name}{STATS_SUFFIX}", "commit marker absent: the shard was "
                                                                          "never committed"))
            expected = Expected(tar=entry, parquet=entry.get("metadata"), count=entry.get("count"))
            tasks.append((folder, shard_id, expected, present))
        for shard_id in sorted(set(by_shard) - listed):
            for n in sorted(by_shard[shard_id]):
                findings.append(Finding("extra", n, f"in the folder, not listed in {MANIFEST}"))
        total = sum(e.get("count", 0) for e in manifest.get("shards", []))
        if manifest.get("total_samples") is not None and manifest["total_samples"] != total:
            findings.append(Finding("mismatched", MANIFEST, f"total_samples {manifest['total_samples']} but its "
                                                            f"shards add up to {total}"))
        return tasks, findings, described
    # No manifest: a pool (ours or img2dataset's); each shard's _stats.json is its record.
    webdataset = any(n.endswith(".tar") for names in by_shard.values() for n in names)
    folders = any(n.endswith("/") for names in by_shard.values() for n in names)
    for shard_id, present in sorted(by_shard.items()):
        name = shard_name(shard_id)
        marker = f"{name}{STATS_SUFFIX}"
        if marker not in present:
            findings.append(Finding("missing", marker, "commit marker absent: the shard is incomplete "
                                                       "(a run still going, or killed)"))
            continue
        stats = _read_json(findings, folder, marker)
        if stats is None:
            continue
        files = {f["name"]: f for f in stats.get("files", [])}
        tar_record, parquet_record = files.get(f"{name}.tar"), files.get(f"{name}.parquet")
        # What the shard must hold: the files its marker lists (ours), else what the layout implies.
        wanted = set(files) or {f"{name}.parquet"}
        if not files and webdataset:
            wanted.add(f"{name}.tar")
        elif not files and folders:
            wanted.add(f"{name}/")
        for file in sorted(wanted - present):
            findings.append(Finding("missing", file, f"the shard is committed ({marker}) but this file is absent"))
        expected = Expected(tar=tar_record, parquet=parquet_record, count=None, source=marker, stats=stats)
        tasks.append((folder, shard_id, expected, present))
    return tasks, findings, {"records": f"{{shard}}{STATS_SUFFIX} (no {MANIFEST})"}


def check_task(task: tuple) -> ShardCheck:
    """One unit of the executor: ``check_shard(*task)``."""
    return check_shard(*task)


def verify(cfg: VerifyConfig) -> dict[str, Any]:
    """Check the folder; return the findings and totals (``ok`` says whether all is well)."""
    retries = storage.retry_counts()
    if not storage.exists(cfg.folder):
        raise SystemExit(f"verify: {cfg.folder!r} does not exist")
    tasks, findings, described = plan_checks(cfg.folder)
    if not tasks and not findings and described.get("manifest_samples") != 0:  # an empty dataset may be empty
        findings.append(Finding("missing", ".", "no shards here (no {shard}.tar, .parquet or _stats.json)"))
    with Executor(cfg, desc="verify", unit="shard") as ex:
        checks = list(ex.map(check_task, tasks, ordered=True))
    for check in checks:
        findings.extend(check.findings)
    counts = {kind: sum(1 for f in findings if f.kind == kind) for kind in KINDS}
    return {
        "folder": cfg.folder,
        **described,
        "shards_checked": len(checks),
        "samples": sum(c.samples for c in checks),
        "bytes": sum(c.bytes for c in checks),
        "ok": not findings,
        "counts": counts,
        "findings": [asdict(f) for f in findings],
        **storage.retries_since(retries),  # object-storage requests retried, workers' included
    }


DESCRIPTION = __doc__.split("\n", 1)[1] + """
Examples:
  python -m shards.verify --folder data/demo/train        (train shards: against manifest.json)
  python -m shards.verify --folder s3://bucket/pool       (a pool: against each _stats.json)
  make verify ARGS="--folder data/demo/pool"
"""


def main(argv: list[str] | None = None) -> int:
    from core import cli

    return cli.run("python -m shards.verify", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from core import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--folder", *argv]  # `python -m shards.verify FOLDER`
    cfg = parse_config(VerifyConfig, argv, prog="python -m shards.verify", description=DESCRIPTION)
    cli.using(cfg)
    result = verify(cfg)
    for finding in result["findings"]:
        print(Finding(**finding))
    if cfg.output_json:
        storage.write_json(cfg.output_json, result)
    size = f"{result['bytes'] / 1e6:,.1f} MB"
    if result["ok"]:
        print(f"verify: OK — {result['shards_checked']} shards, {result['samples']:,} samples, {size} "
              f"checked against {result['records']}{storage.retries_note(result)}")
        return 0
    summary = ", ".join(f"{n} {kind}" for kind, n in result["counts"].items() if n)
    print(f"verify: FAILED — {summary} ({result['shards_checked']} shards, {result['samples']:,} samples, {size} "
          f"read; records: {result['records']}){storage.retries_note(result)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
