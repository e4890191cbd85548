"""One definition per command: a dataclass that is at once the Python API, the CLI and the YAML schema.

Every public operation of moecraft takes a config dataclass. The CLI builds its options from the
dataclass fields (``--field-name``), ``--config file.yaml`` fills the same fields from YAML (keys are the
field names), options given on the command line win over the file, and ``--print-config`` writes the
resolved config back as YAML. So whatever is done from Python can be done from the CLI or a YAML file,
and back, with nothing to keep in sync by hand.

Field help comes from ``field(metadata={"help": ...})``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moecraft.errors import MoecraftError

T = TypeVar("T")


class ConfigError(MoecraftError):
    """A config value is missing, unknown or of the wrong type."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check and convert a YAML/CLI value to the field's declared type, naming the field on error."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option '{name}' may not be empty")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            return _parse_bool(str(value))
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if base is not str and isinstance(value, bool):
                raise ValueError
            return base(value)
        if base is Path:
            return Path(value)
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"option '{name}' must be one of {list(choices)}, got {value!r}")
            return value
        if origin in (list, tuple):
            (item_tp, *_rest) = typing.get_args(base) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            items = [_coerce(name, item_tp, v) if item_tp is not Any else v for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict or base is dict:
            if isinstance(value, str):  # command line: key=value,key=value (a repeated key collects a list)
                value = _parse_pairs(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"option '{name}' expects {getattr(base, '__name__', base)}, got {value!r}") from exc
    return value


def _parse_pairs(text: str) -> dict[str, Any]:
    """``"a=1,b=2,b=3"`` -> ``{"a": "1", "b": ["2", "3"]}``; an item without ``=`` is a ValueError."""
    out: dict[str, Any] = {}
    for item in (i for i in text.split(",") if i.strip()):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(item)
        key, val = key.strip(), val.strip()
        if key in out:
            out[key] = [*(out[key] if isinstance(out[key], list) else [out[key]]), val]
        else:
            out[key] = val
    return out


def _checked_values(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` converted to the field types; unknown keys and bad values are errors naming ``source``."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}; known: {sorted(names)}")
    try:
        return {k: _coerce(k, hints[k], v) for k, v in data.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build a config dataclass from a plain dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
    values = _checked_values(cls, data, source)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: required option(s) missing: {missing}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-safe dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty file -> ``{}``); a missing file, bad YAML or a non-mapping
    is a :class:`ConfigError` naming the file (and the line, for YAML syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_yaml_mapping(path), source=str(path))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field. Defaults are left unset so YAML values are not overridden."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING:
            help_text += f" (default: {f.default_factory()})"
        else:
            help_text += " (required)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
        if base is bool:
            kwargs["type"] = _parse_bool
            kwargs["nargs"] = "?"
            kwargs["const"] = True
            kwargs["metavar"] = "BOOL"
        elif typing.get_origin(base) in (list, tuple):
            kwargs["metavar"] = "A,B,..."
        elif base is dict or typing.get_origin(base) is dict:
            kwargs["metavar"] = "K=V,..."
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", dest="_config", default=None, help="YAML file with any of the options above")
    parser.add_argument(
        "--print-config", dest="_print_config", action="store_true", help="print the resolved config as YAML and exit"
    )


def resolve(cls: type[T], namespace: argparse.Namespace) -> T:
    """YAML file first, then command-line options on top."""
    data: dict[str, Any] = {}
    source = "command line"
    if getattr(namespace, "_config", None):
        path = Path(namespace._config)
        data.update(_checked_values(cls, read_yaml_mapping(path), str(path)))  # errors here name the file
        source = f"{path} + command line"
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(namespace).items() if k in names})
    return from_dict(cls, data, source=source)
