"""One definition per command: a dataclass that is at once the Python API, the CLI and the YAML schema.

Every public operation of moecraft takes a config dataclass. The CLI builds its options from the
dataclass fields (``--field-name``), ``--config file.yaml`` fills the same fields from YAML (keys are the
field names), options given on the command line win over the file, and ``--print-config`` writes the
resolved config back as YAML. So whatever is done from Python can be done from the CLI or a YAML file,
and back, with nothing to keep in sync by hand.

Field help comes from ``field(metadata={"help": ...})``. A list option is ``--opt a,b`` on the command line,
or ``--opt a b`` where its metadata says ``"nargs": "+"`` (``"metavar"`` names the values).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import operator
import os
import re
import types
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moecraft.errors import MoecraftError

T = TypeVar("T")


class ConfigError(MoecraftError):
    """A config value is missing, unknown, of the wrong type or out of range.

    ``option`` names the field at fault (when one is), so that :func:`resolve` can say whether the value
    came from the YAML file or the command line.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {_show(text)}")


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: an error message stays one short line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Number syntax of the command line (and of quoted YAML numbers): ASCII digits only, so that '1_000', '0x10',
# ' 5', '٣' or '３' are errors rather than silently read; nan/inf are read, then refused as not finite.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)",
                         re.IGNORECASE)
_INT64 = 2**63 - 1  # every int option fits torch's int64 (seeds, counts, lengths)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check and convert a YAML/CLI value to the field's declared type, naming the field on error.

    Strings (all command-line values, quoted YAML values) are parsed; any other value must already have
    the declared type: a YAML list, number or mapping is never stringified into a ``str`` option.
    """
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option '{name}' may not be empty", name)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return _parse_bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, str) and _INT_TEXT.fullmatch(value):
                return int(value)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return int(value)
            if isinstance(value, float) and value.is_integer():  # YAML 64.0
                return int(value)
            raise ValueError
        if base is float:
            if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
                return float(value)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                return float(value)  # OverflowError for ints beyond float: caught below
            raise ValueError
        if base is str:
            if isinstance(value, str):
                return value
            raise ValueError
        if base is Path:
            if isinstance(value, os.PathLike) or (isinstance(value, str) and value != ""):
                return Path(value)
            if isinstance(value, str):
                raise ConfigError(f"option '{name}' may not be empty", name)
            raise ValueError
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if not any(value == c and type(value) is type(c) for c in choices):
                raise ConfigError(f"option '{name}' must be one of {list(choices)}, got {_show(value)}", name)
            return value
        if origin in (list, tuple):
            (item_tp, *_rest) = typing.get_args(base) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            elif not isinstance(value, (list, tuple)):
                raise ValueError
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
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as exc:
        what = getattr(base, "__name__", None) or str(base).replace("typing.", "")
        raise ConfigError(f"option '{name}' expects {what}, got {_show(value)}", name) from exc
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


def _unknown_keys(cls: type, data: dict[str, Any], source: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=str)  # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {_show(unknown, 200)}; known: {sorted(names)}")


def _checked_values(cls: type, data: dict[str, Any], source: str | dict[str, str]) -> dict[str, Any]:
    """``data`` converted to the field types; unknown keys and bad values are errors naming ``source``
    (one source for all values, or each option's own)."""
    hints = _field_types(cls)
    where = (lambda k: source.get(k, "command line")) if isinstance(source, dict) else (lambda k: source)
    _unknown_keys(cls, data, "config" if isinstance(source, dict) else source)
    out = {}
    for k, v in data.items():
        try:
            out[k] = _coerce(k, hints[k], v)
        except ConfigError as exc:
            raise ConfigError(f"{where(k)}: {exc}", k) from exc
    return out


# ----------------------------------------------------------------------------- checks of a built config
_RANGE = re.compile(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])")
_COMPARE = re.compile(r"(>=|>|<=|<)\s*(\S+)")
MAY_BE_EMPTY = "may be empty"  # rule of a str or path option that may be empty (a title; an out path in Python)


def _bound(text: str) -> float:
    base, _, exp = text.partition("**")
    if exp:
        return int(base) ** int(exp)
    return int(text) if _INT_TEXT.fullmatch(text) else float(text)


@functools.cache
def _range_test(rule: str) -> Callable[[float], bool]:
    """``'> 0'``, ``'>= 1'``, ``'[0, 1)'``, ``'(0, 1]'``, ``'[0, 2**63)'`` as a test of a number (exact: Python
    compares ints and floats without rounding)."""
    ops = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
    m = _COMPARE.fullmatch(rule.strip())
    if m:
        op, bound = ops[m[1]], _bound(m[2])
        return lambda v: op(v, bound)
    m = _RANGE.fullmatch(rule.strip())
    if not m:
        raise TypeError(f"not a range rule: {rule!r}")
    lo, hi = _bound(m[2]), _bound(m[3])
    lo_ok = operator.ge if m[1] == "[" else operator.gt
    hi_ok = operator.le if m[4] == "]" else operator.lt
    return lambda v: lo_ok(v, lo) and hi_ok(v, hi)


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """Rule of a ``str`` option (or each item of a list option) with a fixed set of values."""
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def dtype_name(value: str) -> str | None:
    """Rule of ``dtype`` options: 'auto' or a name :func:`moecraft.models.resolve_dtype` knows."""
    from moecraft.models import resolve_dtype

    try:
        resolve_dtype(value)
    except MoecraftError as exc:
        return str(exc).split(";", 1)[-1].strip().replace("choose from", "must be one of", 1)
    return None


def device_name(value: str) -> str | None:
    """Rule of ``device`` options: 'auto' or a device string torch parses (cpu, cuda, cuda:1, mps, ...)."""
    if value == "auto":
        return None
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        return "must be 'auto' or a torch device such as cpu, cuda, cuda:1"
    return None


SEED = "[0, 2**63)"  # torch.manual_seed takes it (numpy gets seed % 2**32)


def _check_text(name: str, value: Any, rule: Any) -> None:
    text = os.fspath(value)
    if text == "" and rule != MAY_BE_EMPTY:
        raise ConfigError(f"option '{name}' may not be empty", name)
    if "\x00" in text:
        raise ConfigError(f"option '{name}' contains a NUL character: {_show(text)}", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"option '{name}' is not valid UTF-8 text: {_show(text)}", name) from None


def _check_value(name: str, tp: Any, value: Any, rule: Any) -> None:
    """One field's value against its declared type, the generic checks and its ``rule``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return
        raise ConfigError(f"option '{name}' may not be empty", name)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option '{name}' expects a list, got {_show(value)}", name)
        (item_tp, *_rest) = typing.get_args(base) or (Any,)
        if item_tp is not Any:
            for item in value:
                _check_value(name, item_tp, item, rule)
        return
    if origin is typing.Literal:
        choices = typing.get_args(base)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"option '{name}' must be one of {list(choices)}, got {_show(value)}", name)
        return
    wrong = {
        bool: lambda v: not isinstance(v, bool),
        int: lambda v: isinstance(v, bool) or not isinstance(v, numbers.Integral),
        float: lambda v: isinstance(v, bool) or not isinstance(v, numbers.Real),
        str: lambda v: not isinstance(v, (str, os.PathLike)),
        Path: lambda v: not isinstance(v, (str, os.PathLike)),
    }.get(base)
    if wrong is not None and wrong(value):
        raise ConfigError(f"option '{name}' expects {base.__name__}, got {_show(value)}", name)
    if base in (str, Path):
        _check_text(name, value, rule)
    if base in (int, float):
        if not math.isfinite(value):
            raise ConfigError(f"option '{name}' must be a finite number, got {_show(value)}", name)
        if base is int and abs(value) > _INT64:
            raise ConfigError(f"option '{name}' is too large: {_show(value)}", name)
        rule = ">= 0" if rule is None else rule  # an option without a rule: a count, a size or a rate
    if isinstance(rule, str) and rule != MAY_BE_EMPTY:
        if not _range_test(rule)(value):
            shown = rule if rule[0] in "<>" else f"in {rule}"
            raise ConfigError(f"option '{name}' must be {shown}, got {_show(value)}", name)
    elif callable(rule):
        problem = rule(value)
        if problem:
            raise ConfigError(f"option '{name}' {problem}, got {_show(value)}", name)


def non_empty(*names: str) -> Callable[[Any], None]:
    """Check (for :func:`checked`) that list options are not empty lists: ``--layers=`` would craft no layer.
    None, where a field allows it, still means the default."""

    def check(cfg: Any) -> None:
        for name in names:
            if getattr(cfg, name) is not None and len(getattr(cfg, name)) == 0:
                raise ConfigError(f"option '{name}' may not be an empty list", name)

    return check


def check_config(cfg: Any) -> None:
    """Every field of a config dataclass against its type and rule, then the class's cross-field checks.

    Generic checks apply to every field: numbers are finite (ints within int64, and >= 0 unless the
    class's rule says otherwise), strings are non-empty, NUL-free UTF-8, ``Literal`` values are among the
    choices. Raises :class:`ConfigError` naming the option.
    """
    cls = type(cfg)
    hints = _field_types(cls)
    rules = getattr(cls, "__moecraft_rules__", {})
    for f in dataclasses.fields(cfg):
        _check_value(f.name, hints[f.name], getattr(cfg, f.name), rules.get(f.name))
    for check in getattr(cls, "__moecraft_checks__", ()):
        check(cfg)


def checked(*checks: Callable[[Any], None], **rules: Any) -> Callable[[type[T]], type[T]]:
    """Class decorator (put it *below* ``@dataclass``): check every instance when it is built.

    ``rules`` maps a field to its valid values: a range (``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"(0, 1]"``,
    applied to each item of a list), :data:`MAY_BE_EMPTY` for a str that may be empty, or a function of the
    value that returns what is wrong (``"must be ..."``) or None. ``checks`` are functions of the whole
    config for rules between fields; they raise :class:`ConfigError`. Python, YAML and the CLI all build
    configs through the constructor, so all three are checked alike.
    """

    def wrap(cls: type[T]) -> type[T]:
        cls.__moecraft_rules__ = dict(rules)
        cls.__moecraft_checks__ = tuple(checks)
        own = cls.__dict__.get("__post_init__")  # a class's own __post_init__ still runs, after the checks

        def post_init(self) -> None:
            check_config(self)
            if own is not None:
                own(self)

        cls.__post_init__ = post_init
        return cls

    return wrap


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config",
              origins: dict[str, str] | None = None) -> T:
    """Build (and check) a config dataclass from a plain dict, rejecting unknown keys by name.

    ``origins`` says where each option came from (a YAML file, the command line): errors about one
    option name that source, others ``source``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
    _unknown_keys(cls, data, source)
    values = _checked_values(cls, data, origins if origins is not None else source)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: required option(s) missing: {missing}")
    try:
        cfg = cls(**values)
        if "__moecraft_rules__" not in cls.__dict__:
            check_config(cfg)  # a config class without @checked still gets the generic checks
    except ConfigError as exc:
        where = (origins or {}).get(exc.option, source) if exc.option else source
        raise ConfigError(f"{where}: {exc}", exc.option) from exc
    except MoecraftError as exc:
        raise type(exc)(f"{source}: {exc}") from exc
    return cfg


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


# A config file is a few dozen options: these limits refuse alias bombs ("billion laughs": a few hundred
# bytes whose aliases expand to billions of nodes) and huge files before they cost memory or time.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 64
MAX_YAML_NODES = 5_000  # nodes, as written and with every alias expanded
MAX_YAML_DEPTH = 32


class _YamlLimit(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that stops a document, as it is read, once it has more than ``MAX_YAML_ALIASES``
    aliases, ``MAX_YAML_NODES`` nodes or ``MAX_YAML_DEPTH`` levels of nesting (PyYAML's scanner slows down
    quadratically with depth: 1000 nested brackets take seconds)."""

    aliases = nodes = depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise _YamlLimit(f"more than {MAX_YAML_NODES} values")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def fetch_flow_collection_start(self, TokenClass):
        # the scanner reads ahead of the composer, so flow brackets are counted where they are scanned
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _YamlLimit(f"nested more than {MAX_YAML_DEPTH} levels deep")
        super().fetch_flow_collection_start(TokenClass)


def _check_yaml_nodes(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion (aliases followed) exceeds ``MAX_YAML_NODES``, that refers to
    itself, or that has a mapping with a repeated key (PyYAML keeps the last value silently)."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            size[id(node)] = 1
            continue
        pairs = node.value if isinstance(node, yaml.MappingNode) else [(None, n) for n in node.value]
        children = [n for kv in pairs for n in kv if n is not None]
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(n)] for n in children)
            if size[id(node)] > MAX_YAML_NODES:
                raise _YamlLimit(f"more than {MAX_YAML_NODES} values once aliases are expanded")
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            raise _YamlLimit("a structure that contains itself (recursive alias)")
        if isinstance(node, yaml.MappingNode):
            keys = Counter(k.value for k, _ in pairs if isinstance(k, yaml.ScalarNode) and k.value != "<<")
            repeated = sorted(k for k, n in keys.items() if n > 1)
            if repeated:
                raise _YamlLimit(f"key {repeated[0]!r} appears more than once")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((n, False) for n in children if id(n) not in size)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty file -> ``{}``); a missing file, bad YAML, a non-mapping,
    a file over ``MAX_YAML_BYTES`` or an alias bomb is a :class:`ConfigError` naming the file (and the
    line, for YAML syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: config file too large ({path.stat().st_size} bytes; the limit is "
                          f"{MAX_YAML_BYTES} bytes)")
    try:
        loader = _BoundedLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_yaml_nodes(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc})") from exc
    except _YamlLimit as exc:
        raise ConfigError(f"{path}: refused YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: refused YAML: nested too deeply") from None
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
        elif typing.get_origin(base) in (list, tuple) and f.metadata.get("nargs"):
            kwargs["nargs"] = f.metadata["nargs"]  # space-separated values (paths may hold commas): not split
            kwargs["metavar"] = f.metadata.get("metavar", "VALUE")
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
    """YAML file first, then command-line options on top; errors name where the bad value came from."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = "command line"
    if getattr(namespace, "_config", None):
        path = Path(namespace._config)
        data.update(_checked_values(cls, read_yaml_mapping(path), str(path)))  # errors here name the file
        hints, rules = _field_types(cls), getattr(cls, "__moecraft_rules__", {})
        for k, v in data.items():  # each file value in range too, even where the command line overrides it
            try:
                _check_value(k, hints[k], v, rules.get(k))
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}", k) from exc
        origins = dict.fromkeys(data, str(path))
        source = f"{path} + command line"
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(namespace).items() if k in names}
    data.update(given)
    origins.update(dict.fromkeys(given, "command line"))
    return from_dict(cls, data, source=source, origins=origins)
