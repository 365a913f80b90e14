"""URL lists are streamed into deterministic shards; bad config values are named."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, DataError, from_dict, parse_config
from core.layout import sample_key, shard_id_of
from ingest.config import IngestConfig
from ingest.reader import read_shards


def write_inputs(tmp_path, rows):
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows],
                             "license": ["cc-by"] * len(rows)}), tmp_path / "list.parquet", row_group_size=3)
    with open(tmp_path / "list.csv", "w") as f:
        f.write("url,caption,license\n" + "".join(f'{u},"{c}",cc-by\n' for u, c in rows))
    with open(tmp_path / "list.tsv", "w") as f:
        f.write("url\tcaption\tlicense\n" + "".join(f"{u}\t{c}\tcc-by\n" for u, c in rows))
    with gzip.open(tmp_path / "list.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"url": u, "caption": c, "license": "cc-by"}) + "\n" for u, c in rows)
    with open(tmp_path / "list.txt", "w") as f:
        f.write("".join(f"{u}\n" for u, _ in rows))


@pytest.mark.parametrize("name, fmt", [("list.parquet", "parquet"), ("list.csv", "csv"), ("list.tsv", "tsv"),
                                       ("list.jsonl.gz", "jsonl"), ("list.txt", "txt")])
def test_every_format_gives_the_same_shards(tmp_path, name, fmt):
    rows = [(f"http://example.com/{i}.jpg", f"caption, number {i}") for i in range(10)]
    write_inputs(tmp_path, rows)
    caption_col = None if fmt == "txt" else "caption"
    extras = [] if fmt == "txt" else ["license"]
    shards = list(read_shards(str(tmp_path / name), fmt, "url", caption_col, extras, 4))
    assert [s.shard_id for s in shards] == [0, 1, 2]
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [u for s in shards for u in s.urls] == [u for u, _ in rows]
    if caption_col:
        assert [c for s in shards for c in s.captions] == [c for _, c in rows]
        assert shards[0].extras["license"] == ["cc-by"] * 4


def test_missing_column_is_a_clear_error(tmp_path):
    write_inputs(tmp_path, [("http://a/1.jpg", "x y")])
    with pytest.raises(DataError, match="no column.*'image_url'"):
        list(read_shards(str(tmp_path / "list.parquet"), "parquet", "image_url", None, [], 10))


def test_broken_json_lines_become_rows_not_crashes(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"url": "http://a/1.jpg"}\nnot json\n[1,2]\n{"url": "http://a/2.jpg"}\n')
    (shard,) = read_shards(str(tmp_path / "l.jsonl"), "jsonl", "url", None, [], 10)
    assert shard.urls == ["http://a/1.jpg", None, None, "http://a/2.jpg"]


def test_keys_are_deterministic_and_sortable():
    assert sample_key(3, 7, 10000) == "000030007"
    assert sample_key(0, 999, 1000) == "00000999"
    assert shard_id_of("s3://b/pool/00012_stats.json") == 12
    assert shard_id_of("/x/00003.tar") == 3
    assert shard_id_of("/x/manifest.json") is None


def test_config_errors_name_the_value(tmp_path, capsys):
    with pytest.raises(ConfigError, match="thread_count=0"):
        from_dict(IngestConfig, {"url_list": "x", "output_folder": "y", "thread_count": 0})
    with pytest.raises(ConfigError, match="unknown setting thread_cont; did you mean thread_count"):
        from_dict(IngestConfig, {"url_list": "x", "output_folder": "y", "thread_cont": 3})
    with pytest.raises(ConfigError, match="allow_networks"):
        from_dict(IngestConfig, {"url_list": "x", "output_folder": "y", "allow_networks": "300.1.1.1/8"})
    with pytest.raises(ConfigError, match="resize_mode='squash'"):
        from_dict(IngestConfig, {"url_list": "x", "output_folder": "y", "resize_mode": "squash"})
    config = tmp_path / "c.yaml"
    config.write_text("url_list: a.parquet\noutput_folder: out\ntimeout: soon\n")
    with pytest.raises(SystemExit) as exit_:
        parse_config(IngestConfig, ["--config", str(config)], "python -m ingest", "")
    assert exit_.value.code == 2
    assert "timeout='soon'" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("url_list: a.parquet\noutput_folder: out\nthread_count: 8\nallow_networks: [127.0.0.1/32]\n")
    cfg = parse_config(IngestConfig, ["--config", str(config), "--thread_count", "16"], "p", "")
    assert cfg.thread_count == 16 and cfg.allow_networks == ["127.0.0.1/32"]
