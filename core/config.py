"""One typed config per stage: a dataclass, filled from a YAML file and flags.

A stage declares its options once, as dataclass fields with a ``help`` in their
metadata; this module turns that into a command line (``--help`` included), reads
``--config FILE.yaml`` (keys are the option names) and lets flags override the
file. Bad values are reported before any work starts, naming the option and the
value (a stage's ``__post_init__`` raises ``ConfigError``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value a user must fix; the message names the option and the value."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (``default_factory`` for lists)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def require(config: Any, *names: str) -> None:
    """Stop on the first of ``names`` left empty."""
    for name in names:
        if not getattr(config, name):
            raise ConfigError(f"{name}: required")


def at_least(config: Any, minimum: int, *names: str) -> None:
    """Stop on the first of ``names`` below ``minimum`` (0: "zero or more", 1: "a positive integer")."""
    wanted = {0: "must be zero or more", 1: "must be a positive integer"}.get(minimum, f"must be {minimum} or more")
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{name}={getattr(config, name)}: {wanted}")


def one_of(config: Any, name: str, choices: Sequence[str]) -> None:
    if getattr(config, name) not in choices:
        raise ConfigError(f"{name}={getattr(config, name)!r}: choose one of {', '.join(choices)}")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _list_items(value: Any) -> list:
    """A list from YAML, ``a,b`` or a list literal (``'["a","b"]'``, as img2dataset's CLI takes)."""
    if not isinstance(value, str):
        return list(value)
    if value.strip().startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"not a list literal: {exc}") from None
        if isinstance(parsed, list):
            return [str(v) if not isinstance(v, (str, int, float, bool)) else v for v in parsed]
    return value.split(",")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(type, optional) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError."""
    base, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            items = _list_items(value)
            return [coerce(name, item, v.strip() if isinstance(v, str) else v) for v in items if v != ""]
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}={value!r}: expected {getattr(base, '__name__', base)} ({exc})") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unalias(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys spelled as in ``cls.ALIASES`` (e.g. img2dataset's ``processes_count``) under their own names."""
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in out:
            raise ConfigError(f"{source}: {given[name]!r} and {key!r} are the same option; give one")
        out[name], given[name] = value, key
    return out


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys with a suggestion."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in _unalias(cls, values, source).items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}{hint}")
        kwargs[key] = coerce(key, hints[key], value)
    return cls(**kwargs)


def load_yaml(path: str) -> dict[str, Any]:
    from core.storage import open_file

    try:
        with open_file(path, "r") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return data


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value; flags override it")
    hints = _hints(cls)
    metavars = {}
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "(none)"
        metavar = metavars[f.name] = {bool: "BOOL", int: "N", float: "X"}.get(
            base, "LIST" if typing.get_origin(base) is list else "STR")
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        parser.add_argument(f"--{f.name}", dest=f.name, metavar=metavar, default=argparse.SUPPRESS, help=help_text)
    for alias, name in getattr(cls, "ALIASES", {}).items():
        parser.add_argument(f"--{alias}", dest=name, metavar=metavars[name], default=argparse.SUPPRESS,
                            help=f"the same as --{name}")
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """Parse ``argv`` into ``cls``; on a bad value print the problem and exit 2."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    try:
        values = _unalias(cls, load_yaml(config_path), config_path) if config_path else {}
        values.update(args)
        return from_dict(cls, values, source=config_path or "command line")
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, for manifests and stats (infinities as strings)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = str(value) if isinstance(value, float) and value in (float("inf"), float("-inf")) else value
    return out
