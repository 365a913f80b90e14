"""core.config: one loader for every stage — sections, lists, aliases, YAML (local or s3://), every problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from core import storage
from core.config import ConfigError, at_least, load, load_cli, one_of, option, parse_config, problem, to_dict


@dataclass
class Inner:
    rate: float = option(0.5, "a rate in 0..1")
    names: list[str] = option(["a"], "some names")

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            problem(f"rate={self.rate}: must be in 0..1")


@dataclass
class Outer:
    ALIASES: ClassVar[dict[str, str]] = {"processes_count": "workers"}
    inner: Inner = option(Inner, "a section")
    workers: int = option(0, "workers (0: one per CPU)")
    mode: str = option("fast", "fast or slow")
    path: str | None = option(None, "somewhere")

    def __post_init__(self) -> None:
        at_least(self, 0, "workers")
        one_of(self, "mode", ("fast", "slow"))


def test_every_problem_is_reported_at_once_with_section_names():
    with pytest.raises(ConfigError) as info:
        load(Outer, None, ["inner.rate=2", "inner.rat=1", "workers=-1", "mode=quick", "inner.names=[x"])
    problems = info.value.problems
    assert "inner.rate=2.0: must be in 0..1" in problems
    assert any(p.startswith("unknown setting inner.rat; did you mean inner.rate?") for p in problems)
    assert "workers=-1: must be zero or more" in problems
    assert "mode='quick': choose one of fast, slow" in problems
    assert any(p.startswith("inner.names='[x'") for p in problems)
    assert str(info.value).startswith(f"{len(problems)} settings to fix:")


def test_types_lists_nulls_and_aliases():
    config = load(Outer, None, {"inner.names": "x,y", "processes_count": "3", "path": "null", "inner.rate": "1e-1"})
    assert (config.inner.names, config.workers, config.path, config.inner.rate) == (["x", "y"], 3, None, 0.1)
    with pytest.raises(ConfigError, match=r"workers='many': must be an integer"):
        load(Outer, None, ["workers=many"])
    assert to_dict(config) == {"inner": {"rate": 0.1, "names": ["x", "y"]}, "workers": 3, "mode": "fast",
                               "path": None}


def test_yaml_sections_nested_or_dotted_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 0.25\ninner.names: [p, q]\nworkers: 2\n")
    config, _ = load_cli(Outer, ["--config", str(path), "--inner.rate", "0.75", "--processes_count=4"], "prog", "")
    assert (config.inner.rate, config.inner.names, config.workers) == (0.75, ["p", "q"], 4)


def test_config_file_on_s3(s3_env):
    with storage.atomic_write("s3://webclip/configs/outer.yaml") as handle:
        handle.write(b"mode: slow\ninner:\n  names: [s3]\n")
    config = load(Outer, "s3://webclip/configs/outer.yaml")
    assert (config.mode, config.inner.names) == ("slow", ["s3"])


def test_cli_prints_every_problem_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(Outer, ["--workers", "-2", "--nope", "1", "--inner.rate", "9"], "prog", "")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 settings to fix:")
    for expected in ("workers=-2", "unknown setting nope", "inner.rate=9.0"):
        assert expected in err


def test_help_lists_every_option_by_section_and_aliases(capsys):
    with pytest.raises(SystemExit):
        parse_config(Outer, ["--help"], "prog", "what it does")
    out = capsys.readouterr().out
    assert "inner options:" in out and "--inner.rate X" in out and "(default: 0.5)" in out
    assert "--workers N" in out and "--processes_count]" in " ".join(out.split())


def test_print_config_shows_the_resolved_yaml(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(Outer, ["--print_config", "--mode", "slow"], "prog", "")
    assert exit_.value.code == 0
    assert "mode: slow" in capsys.readouterr().out
