"""The one config system of every stage: typed dataclasses, filled from YAML and flags.

A stage declares its options once, as dataclass fields made with ``option(default,
help)``; a field whose type is itself such a dataclass is a section (``optim.lr``).
From those declarations this module makes the command line and its ``--help``, reads
``--config FILE.yaml`` (local or ``s3://``; keys are option names, sections nested
mappings or dotted keys), applies flags over it (``--key value``, ``--section.key
value``, ``--set section.key=value``) and checks everything before any work.

Checks run in each dataclass's ``__post_init__`` with ``problem``, ``require``,
``at_least`` and ``one_of``: while a config is loaded they are collected, so a user
sees every bad value at once, in one ``ConfigError`` (outside loading, the first one
raises). A class may map old option names to new ones with ``ALIASES`` (ingest keeps
img2dataset's spellings this way).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import yaml

from core.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError", "option", "problem", "require", "at_least", "one_of", "from_dict",
           "load", "parse_config", "load_cli", "to_dict", "to_yaml", "describe"]

T = TypeVar("T")
_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (lists and sections get a fresh default each time)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# -- checks, collected while a config loads -----------------------------------------------


def problem(message: str) -> None:
    """Report one bad setting: collected while a config loads, raised otherwise."""
    found = _collected.get()
    if found is None:
        raise ConfigError(message)
    if message not in found:
        found.append(message)


def require(config: Any, *names: str) -> None:
    """Each of ``names`` left empty is a problem."""
    for name in names:
        if not getattr(config, name):
            problem(f"{name}: required")


def at_least(config: Any, minimum: int, *names: str) -> None:
    """Each of ``names`` below ``minimum`` is a problem (0: "zero or more", 1: "a positive integer")."""
    wanted = {0: "must be zero or more", 1: "must be a positive integer"}.get(minimum, f"must be {minimum} or more")
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            problem(f"{name}={value}: {wanted}")


def one_of(config: Any, name: str, choices: Sequence[str]) -> None:
    if getattr(config, name) not in choices:
        problem(f"{name}={getattr(config, name)!r}: choose one of {', '.join(choices)}")


@contextlib.contextmanager
def _collecting() -> Iterator[list[str]]:
    found: list[str] = []
    token = _collected.set(found)
    try:
        yield found
    finally:
        _collected.reset(token)


# -- values ------------------------------------------------------------------------------


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(type, optional) for ``X``, ``X | None`` and ``Optional[X]``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) and isinstance(annotation, type)


def _list_items(value: Any) -> list:
    """A list from YAML, ``a,b`` or a list literal (``'["a","b"]'``, as img2dataset's CLI takes)."""
    if not isinstance(value, str):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if value.strip().startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"not a list literal: {exc}") from None
        if isinstance(parsed, list):
            return [str(v) if not isinstance(v, (str, int, float, bool)) else v for v in parsed]
    return value.split(",")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """A YAML or command-line value as the field's type, or a ConfigError naming ``name=value``."""
    base, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}=null: a value is required")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        try:
            items = _list_items(value)
        except ValueError as exc:
            raise ConfigError(f"{name}={value!r}: {exc}") from None
        return [coerce(name, item, v.strip() if isinstance(v, str) else v) for v in items if v != ""]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{name}={value!r}: must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.strip())
        raise ConfigError(f"{name}={value!r}: must be an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; flags are strings
            with contextlib.suppress(ValueError):
                return float(value.strip())
        raise ConfigError(f"{name}={value!r}: must be a number")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r}: must be a string")
    return value


# -- building a config from a mapping ------------------------------------------------------


def _aliases(cls: type) -> dict[str, str]:
    return getattr(cls, "ALIASES", {})


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``; later keys win."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        *sections, leaf = str(key).split(".")
        node = tree
        for part in sections:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **_nest(value)}
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return tree


def _build(cls: type, values: Any, prefix: str, errors: list[str]) -> Any:
    """``cls`` from ``values``; every problem goes to ``errors`` (a bad value keeps its default)."""
    if not isinstance(values, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of option: value, got {values!r}")
        values = {}
    fields = _fields(cls)
    aliases = _aliases(cls)
    kwargs: dict[str, Any] = {}
    for old, new in aliases.items():
        if old in values and new in values:
            errors.append(f"{prefix}{old!r} and {prefix}{new!r} are the same option: give one of them")
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in fields:
            known = [prefix + k for k in list(fields) + list(aliases)]
            close = difflib.get_close_matches(prefix + str(key), known, n=1)
            errors.append(f"unknown setting {prefix}{key}" + (f"; did you mean {close[0]}?" if close else ""))
            continue
        annotation = fields[name][1]
        try:
            kwargs[name] = (_build(annotation, value or {}, f"{prefix}{name}.", errors) if _is_section(annotation)
                            else coerce(prefix + name, annotation, value))
        except ConfigError as exc:
            errors.extend(exc.problems)
    for name, (_, annotation) in fields.items():  # sections not given are checked too
        if name not in kwargs and _is_section(annotation):
            kwargs[name] = _build(annotation, {}, f"{prefix}{name}.", errors)
    return _construct(cls, kwargs, prefix, errors)


def _construct(cls: type, kwargs: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    """``cls(**kwargs)``, its ``__post_init__``'s problems collected (nested ones named with ``prefix``)."""
    with _collecting() as found:
        try:
            instance = cls(**kwargs)
        except ConfigError as exc:  # a check that raised instead of reporting: its message still counts
            found.extend(exc.problems)
            instance = None
    errors.extend(p if not prefix or p.startswith(prefix) else f"{prefix}{p}" for p in found)
    if instance is None:  # keep going with the defaults, so the problems of other sections are found too
        with _collecting():
            try:
                instance = cls()
            except (ConfigError, TypeError):
                instance = None
    return instance


def from_dict(cls: type[T], values: dict[str, Any], source: str | None = None) -> T:
    """``cls`` from a mapping (nested or dotted keys); one ConfigError listing every problem."""
    errors: list[str] = []
    config = _build(cls, _nest(values), "", errors)
    if errors or config is None:
        unique = list(dict.fromkeys(errors)) or [f"{cls.__name__}: invalid"]
        raise ConfigError([f"{source}: {e}" if source and e.startswith("unknown setting") else e for e in unique])
    return config


def load_yaml(path: str) -> dict[str, Any]:
    """A config file's mapping, local or ``s3://``."""
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


def parse_override(text: str) -> tuple[str, str]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", "1e-3")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    return key.strip(), value


def load(cls: type[T], path: str | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> T:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (``KEY=VALUE`` or a mapping)."""
    values = _flatten(_nest(load_yaml(path))) if path else {}
    values = {_canonical(cls, key): value for key, value in values.items()}
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in pairs:
        values[_canonical(cls, key)] = value
    return from_dict(cls, _nest(values))


def _canonical(cls: type, key: str) -> str:
    """``key`` with every alias along its dotted path replaced by the option's own name."""
    parts = []
    for part in key.split("."):
        part = _aliases(cls).get(part, part) if cls is not None else part
        parts.append(part)
        field = _fields(cls).get(part) if cls is not None else None
        cls = field[1] if field is not None and _is_section(field[1]) else None
    return ".".join(parts)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- the command line ------------------------------------------------------------------------


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted name, field, type, default) of every option of ``cls``, sections flattened."""
    for name, (f, annotation) in _fields(cls).items():
        if _is_section(annotation):
            yield from _leaves(annotation, f"{prefix}{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        yield prefix + name, f, annotation, default


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None or value == "" else str(value)


def describe(cls: type) -> str:
    """Every option with its default and help, one line each (for docs and ``--help``)."""
    return "\n".join(f"  {name} = {_show(default)}  {f.metadata.get('help', '')}"
                     for name, f, _, default in _leaves(cls))


def build_parser(cls: type, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    from core.cli import EXIT_CODES

    epilog = f"{epilog.rstrip()}\n\n{EXIT_CODES}" if epilog else EXIT_CODES
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     usage=f"{prog} [--config FILE.yaml] [--OPTION VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (local or s3://); "
                        "flags override it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set one option, e.g. --set section.key=value (repeatable; same as --KEY VALUE)")
    parser.add_argument("--print_config", "--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show its traceback (also: WEBCLIP_DEBUG=1 in the environment)")
    groups: dict[str, Any] = {"": parser}
    metavars: dict[str, str] = {}
    for name, f, annotation, default in _leaves(cls):
        section = name.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        base, _ = _base_type(annotation)
        metavar = {bool: "BOOL", int: "N", float: "X"}.get(base, "LIST" if typing.get_origin(base) is list else "STR")
        metavars[name] = metavar
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})".replace("%", "%%")
        flag = {"nargs": "?", "const": "true"} if base is bool else {}  # a bare --flag means true
        groups[section].add_argument(f"--{name}", dest=name, metavar=metavar, default=argparse.SUPPRESS,
                                     help=help_text, **flag)
    for old, new in _aliases(cls).items():
        parser.add_argument(f"--{old}", dest=new, metavar=metavars.get(new),
                            default=argparse.SUPPRESS, help=f"the same as --{new}")
    return parser


def _flag_values(tokens: list[str]) -> list[tuple[str, str]]:
    """Flags argparse did not know: ``--key value`` / ``--key=value`` pairs, named as settings."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: options are --KEY VALUE or --set KEY=VALUE")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{token}: needs a value, e.g. {token} 10")
            value, i = tokens[i + 1], i + 1
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def load_cli(cls: type[T], argv: Sequence[str] | None, prog: str, description: str,
             epilog: str | None = None) -> tuple[T, argparse.Namespace]:
    """(config, the parsed flags) from ``argv``; raises ConfigError listing every problem."""
    parser = build_parser(cls, prog, description, epilog)
    args, rest = parser.parse_known_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "print_config", "debug")}
    if args.debug:
        os.environ["WEBCLIP_DEBUG"] = "1"  # core.cli reads it; worker processes inherit it
    overrides = [f"{k}={v}" for k, v in _flag_values(rest)]  # unknown keys: reported by the loader
    overrides += [f"{k}={v}" for k, v in flags.items()] + list(args.overrides)
    return load(cls, args.config, overrides), args


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str,
                 epilog: str | None = None) -> T:
    """``load_cli``'s config; on a bad value print every problem and exit 2 (``--print_config``: exit 0)."""
    try:
        config, args = load_cli(cls, argv, prog, description, epilog)
    except ConfigError as exc:
        print(f"error: {exc}\n(`{prog} --help` lists every option)", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(config), end="")
        raise SystemExit(0)
    return config


# -- writing a config down -----------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, for manifests and stats (infinities as strings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return str(value)
        return value

    return plain(dataclasses.asdict(config))


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
