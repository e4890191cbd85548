"""Reading task data: the formats and file types users bring, each record turned into one canonical shape.

Sources: JSONL, JSON array, parquet, csv/tsv and arrow files, a folder saved by ``datasets``, a folder of
data files, a hub data set id (``name[:split]``) or ``builtin:<task>[:split]``.

Formats, detected record by record (or forced with :class:`DataOptions`): ``openai`` (``messages`` of
``role``/``content``, per-message ``weight``, content-part lists), ``sharegpt`` (``conversations`` of
``from``/``value``), ``alpaca`` (``instruction``/``input``/``output``), ``prompt_completion`` and ``text``.

After :func:`load_records` every record has one of the canonical shapes (extra fields such as ``id`` or
``tools`` are kept):
  - chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1}]}``;
    a message is trained iff ``message.get("weight", 1 if role == "assistant" else 0)``;
  - pair: ``{"prompt": str, "response": str}``;
  - text: ``{"text": str}``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from moecraft.config import ConfigError
from moecraft.errors import DataError

BUILTIN_PREFIX = "builtin:"
ROLES = ("system", "user", "assistant", "tool")
_ROLES = set(ROLES)
FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "text")
DataFormatName = Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "text"]
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".arrow")
MAX_DEPTH = 100  # JSON nesting deeper than this is not a record (and would exhaust the parser's stack)

# Role names of ShareGPT dumps, LLaMA-Factory's tags and OpenAI's older/newer names -> canonical roles.
DEFAULT_ROLE_NAMES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool",
}
# Canonical field -> the names looked for when no mapping is given (first present wins).
DEFAULT_COLUMNS = {
    "messages": ("messages", "conversations"),
    "instruction": ("instruction",), "input": ("input",), "output": ("output",),
    "system": ("system",), "history": ("history",),
    "prompt": ("prompt",), "completion": ("completion", "response"),
    "text": ("text",),
}
DEFAULT_MESSAGE_KEYS = {"role": ("role", "from"), "content": ("content", "value"), "weight": ("weight",)}
_SURROGATE = re.compile("[\ud800-\udfff]")


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class DataOptions:
    """How to read user data: the format (detected or forced) and the names of fields and roles.

    The same fields exist on the configs of ``score``, ``train``, ``eval``, ``demo`` and ``data``, so
    they are ``--data-format``, ``--field-messages``, ... on the command line and keys in YAML. Names
    follow axolotl (``field_messages``, ``message_property_mappings``, ``roles``, ``roles_to_train``)
    and LLaMA-Factory (``formatting`` values, ``columns``). Built-in tasks ignore the mappings.
    """

    data_format: DataFormatName = field(default="auto", metadata=_h(
        "data format: auto (detected record by record), openai, sharegpt, alpaca, prompt_completion, text"))
    field_messages: str | None = field(default=None, metadata=_h(
        "field holding the conversation (unset: 'messages', else 'conversations')"))
    message_property_mappings: dict | None = field(default=None, metadata=_h(
        "message keys, e.g. role=speaker,content=says,weight=train (unset: role or from, content or value, "
        "weight)"))
    data_columns: dict | None = field(default=None, metadata=_h(
        "record fields, e.g. instruction=question,output=answer (keys: instruction, input, output, system, "
        "history, prompt, completion, text)"))
    roles: dict | None = field(default=None, metadata=_h(
        "role names in the data per canonical role, e.g. assistant=bot,user=client (added to human/gpt/...)"))
    roles_to_train: list[str] | None = field(default=None, metadata=_h(
        "roles whose messages carry the loss (unset: assistant); a message's own weight wins"))

    def __post_init__(self) -> None:
        if self.data_format not in ("auto", *FORMATS):
            raise ConfigError(f"option 'data_format' must be one of {['auto', *FORMATS]}, got {self.data_format!r}")
        self._role_names = dict(DEFAULT_ROLE_NAMES)
        for role, names in (self.roles or {}).items():
            if role not in _ROLES:
                raise ConfigError(f"option 'roles': {role!r} is not a role; keys are {list(ROLES)}")
            for name in [names] if isinstance(names, str) else list(names):
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"option 'roles': role names must be non-empty strings, got {name!r}")
                self._role_names[name] = role
        bad = [r for r in self.roles_to_train or [] if r not in _ROLES]
        if bad:
            raise ConfigError(f"option 'roles_to_train': unknown role(s) {bad}; choose from {list(ROLES)}")
        self._msg_keys = _mapping("message_property_mappings", self.message_property_mappings,
                                  DEFAULT_MESSAGE_KEYS)
        self._columns = _mapping("data_columns", self.data_columns, DEFAULT_COLUMNS)
        if self.field_messages:
            self._columns["messages"] = (self.field_messages,)

    @classmethod
    def from_config(cls, cfg: Any) -> DataOptions:
        """The data options of any command config that has the :class:`DataOptions` fields."""
        return cls(**cls.values_of(cfg))

    @classmethod
    def values_of(cls, cfg: Any) -> dict[str, Any]:
        """The :class:`DataOptions` fields of a config, to hand on to another command's config."""
        return {f: getattr(cfg, f) for f in cls.__dataclass_fields__ if hasattr(cfg, f)}


def data_option(name: str):
    """A dataclass field for a command config, identical to :class:`DataOptions`' field ``name``."""
    f = DataOptions.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def _mapping(option: str, given: dict | None, defaults: dict) -> dict[str, tuple[str, ...]]:
    out = dict(defaults)
    for key, name in (given or {}).items():
        if key not in defaults:
            raise ConfigError(f"option '{option}': unknown key {key!r}; keys are {list(defaults)}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"option '{option}': {key} must name one field, got {name!r}")
        out[key] = (name,)
    return out


class Loaded(NamedTuple):
    """One record as read: its canonical form, the format it was read as, and where it came from."""

    record: dict
    format: str
    where: str


def load_records(source: str, limit: int | None = None, options: DataOptions | None = None) -> list[dict]:
    """Canonical records of ``source`` (see the module docstring); the first bad record raises
    :class:`DataError` naming the file and line (or row). ``limit`` stops reading after that many records."""
    return [r.record for r in read_records(source, limit, options)]


def read_records(source: str, limit: int | None = None, options: DataOptions | None = None) -> list[Loaded]:
    """:func:`load_records` with each record's format and location (for previews and counts)."""
    source = str(source)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 (0 = no limit), got {limit}")
    opts = options or DataOptions()
    out: list[Loaded] = []
    if source.startswith(BUILTIN_PREFIX):
        from moecraft.builtin_data import generate

        task, _, split = source[len(BUILTIN_PREFIX) :].partition(":")
        for i, rec in enumerate(generate(task, split or "train")):  # canonical already; mappings do not apply
            check_record(rec, f"{source}:{i + 1}")
            out.append(Loaded(rec, record_kind(rec) if record_kind(rec) != "chat" else "openai", f"{source}:{i + 1}"))
            if limit and len(out) >= limit:
                break
    else:
        for where, raw in read_rows(source):
            rec, fmt = to_canonical(raw, where, opts)
            out.append(Loaded(rec, fmt, where))
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{source}: no records (empty data)")
    return out


# ----------------------------------------------------------------------------- sources and file types
def read_rows(source: str) -> Iterator[tuple[str, dict]]:
    """``(where, raw object)`` of every row of a file, folder or hub id, lazily; ``where`` is
    ``file:line`` (JSONL, JSON array, csv) or ``file: row N`` (parquet, arrow, datasets)."""
    path = Path(source)
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        yield from _read_folder(path)
    elif path.suffix in DATA_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")
    else:
        yield from _read_hub(source)


def _read_folder(path: Path) -> Iterator[tuple[str, dict]]:
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        yield from _read_datasets_folder(path)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) and not a folder saved by "
                        "datasets.save_to_disk")
    splits = {s for f in files if (s := _split_of(f.relative_to(path)))}
    if len(splits) > 1:  # a downloaded hub repo: train-*.parquet next to test-*.parquet must not be mixed
        raise DataError(f"{path}: holds files of several splits ({', '.join(sorted(splits))}); give one split's "
                        "file or folder")
    for f in files:
        yield from _read_file(f)


_SPLITS = {"train": "train", "test": "test", "validation": "validation", "valid": "validation",
           "val": "validation", "dev": "validation", "eval": "eval"}


def _split_of(relative: Path) -> str | None:
    """The split a file's name or folder names (hub layout: ``data/train-00000-of-00001.parquet``)."""
    for part in (*relative.parent.parts, relative.name):
        word = re.split(r"[-_.]", part.lower(), maxsplit=1)[0]
        if word in _SPLITS:
            return _SPLITS[word]
    return None


def _read_file(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of one file, its type from the content (parquet and arrow magic bytes, a leading ``[``) and
    the suffix (``.csv``/``.tsv``)."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PAR1"):
        yield from _read_parquet(path)
    elif head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        yield from _read_arrow(path)
    elif head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PK\x03\x04")):
        kind = {b"\x1f": "gzip", b"\x28": "zstd", b"PK": "zip"}[head[:1] if head[:1] != b"P" else b"PK"]
        raise DataError(f"{path}: a {kind}-compressed file; decompress it first")
    elif path.suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if path.suffix == ".tsv" else ",")
    elif path.suffix in (".parquet", ".arrow"):
        raise DataError(f"{path}: not a {path.suffix[1:]} file (no {path.suffix[1:]} header)")
    else:
        for lineno, rec in iter_json_rows(path):
            yield f"{path}:{lineno}", rec


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")  # a leading BOM is fine
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` whose every failure (syntax, nesting too deep, numbers too long, lone surrogates) is a
    one-line :class:`DataError` naming ``where``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise DataError(f"{where}: not valid JSON (nested deeper than Python can parse)") from exc
    except ValueError as exc:  # e.g. an integer with more digits than int() converts (4300 by default)
        raise DataError(f"{where}: not valid JSON ({_first_line(exc)})") from exc
    if _may_need_check(text):
        check_values(value, where)
    return value


def _may_need_check(text: str) -> bool:
    """Whether JSON text can hold a lone surrogate (only a ``\\uD8xx``-style escape makes one) or nest deeper
    than :data:`MAX_DEPTH` (needs that many brackets): a cheap test that spares the walk on ordinary lines."""
    return "\\ud" in text or "\\uD" in text or text.count("[") + text.count("{") > MAX_DEPTH


def _first_line(exc: BaseException) -> str:
    if "integer string conversion" in str(exc):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_values(value: Any, where: str) -> None:
    """Raise :class:`DataError` for nesting deeper than :data:`MAX_DEPTH` or a string (key or value)
    holding a lone UTF-16 surrogate (JSON allows ``"\\ud800"``; no encoder or tokenizer does)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                raise DataError(f"{where}: text holds a lone surrogate {ascii(m.group())} at character {m.start()} "
                                "(half of a UTF-16 pair, not a character)")
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise DataError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
            for k, x in items:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((x, depth + 1))


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every record of a JSON file: one object a line (JSONL), a JSON array
    of objects, or a single object. Bad JSON or a non-object names the file and line."""
    return list(iter_json_rows(path))


def iter_json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """:func:`read_jsonl_rows`, lazily: JSONL is read line by line, so a limit stops the reading."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            text = _decode(path.read_bytes(), path)
            if _is_array_file(text):
                rows = _json_array_rows(text, path)
                if not rows:
                    raise DataError(f"{path}: empty JSON array (no records)")
                yield from rows
                return
        fh.seek(0)
        first, any_rows = True, False
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = parse_json(line, where)
            except DataError:
                if first and line.lstrip().startswith("{"):
                    whole = _single_object(path, lineno)  # one object spread over several lines
                    if whole is not None:
                        yield lineno, whole
                        return
                raise
            first = False
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            any_rows = True
            yield lineno, rec
    if not any_rows:
        raise DataError(f"{path}: empty file (no JSON lines)")


def _single_object(path: Path, lineno: int) -> dict | None:
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(value, dict):
        return None
    check_values(value, f"{path}:{lineno}")
    return value


def _is_array_file(text: str) -> bool:
    """A file starting with ``[`` is a JSON array unless its first line is a whole JSON value followed by
    more lines (JSONL whose lines are arrays: an error per line, below)."""
    start = len(text) - len(text.lstrip())
    first, sep, rest = text[start:].partition("\n")
    if not sep or not rest.strip():
        return True
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return True
    return False


def _json_array_rows(text: str, path: Path) -> list[tuple[int, dict]]:
    """Elements of a top-level JSON array, each with the line it starts on, parsed one at a time."""
    decoder = json.JSONDecoder()
    rows: list[tuple[int, dict]] = []
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            where = f"{path}:{line_at(pos)}"
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            except RecursionError as exc:
                raise DataError(f"{where}: not valid JSON (nested deeper than Python can parse)") from exc
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({_first_line(exc)})") from exc
            check_values(value, where)
            if not isinstance(value, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
            rows.append((line, value))
            pos = skip_ws(pos)
            if pos < len(text) and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise DataError(f"{path}:{line_at(pos)}: not valid JSON (expected ',' or ']' in the array)")
    if text[pos:].strip():
        raise DataError(f"{path}:{line_at(skip_ws(pos))}: not valid JSON (extra data after the array)")
    return rows


# Columns that hold JSON (lists of messages, history pairs, tool schemas) when they come from a CSV cell.
_JSON_CELL_COLUMNS = {"messages", "conversations", "history", "tools"}


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    text = _decode(path.read_bytes(), path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (no header row)")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"{path}:1: repeated column name(s) {dup}")
        start = reader.line_num + 1
        for cells in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise DataError(f"{where}: {len(cells)} fields, the header has {len(header)}")
            # an empty cell is a missing value (CSV cannot tell the two apart)
            row = {h: (c if c != "" else None) for h, c in zip(header, cells)}
            for key in _JSON_CELL_COLUMNS & row.keys():
                if isinstance(row[key], str) and row[key].lstrip()[:1] in ("[", "{"):
                    row[key] = parse_json(row[key], f"{where} (column {key!r})")
            yield where, row
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _arrow_rows(batches, path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from exc


def _read_arrow(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa

    try:
        try:
            reader = pa.ipc.open_file(path)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))  # the format datasets writes
        yield from _arrow_rows(batches, path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable arrow file ({_first_line(exc)})") from exc


def _arrow_rows(batches, path: Path) -> Iterator[tuple[str, dict]]:
    n = 0
    for batch in batches:
        for row in batch.to_pylist():  # arrow strings are UTF-8 (no surrogates); nesting is the schema's
            n += 1
            yield f"{path}: row {n}", row


def _read_datasets_folder(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types here
        raise DataError(f"{path}: not a folder saved by datasets.save_to_disk ({_first_line(exc)})") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}: row {i + 1}", dict(row)


def _read_hub(source: str) -> Iterator[tuple[str, dict]]:
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not load data set '{source}' (not a file, folder or reachable hub id): "
                        f"{_first_line(exc)}") from exc
    for i, row in enumerate(ds):
        yield f"{source}: row {i + 1}", dict(row)


# ----------------------------------------------------------------------------- formats -> canonical records
def _get(raw: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of ``names`` present in ``raw`` with a value (a null is a missing value)."""
    for name in names:
        if raw.get(name) is not None:
            return name, raw[name]
    return None, None


def detect_format(raw: dict, where: str, options: DataOptions | None = None) -> str:
    """The format of one raw record; a record that fits none, or two, is a :class:`DataError`."""
    opts = options or DataOptions()
    col = opts._columns
    has = {key: _get(raw, names)[0] for key, names in col.items()}
    found = []
    if has["messages"]:
        found.append(("chat", [has["messages"]]))
    if has["instruction"] and has["output"]:
        found.append(("alpaca", [has["instruction"], has["output"]]))
    if has["prompt"] and has["completion"]:
        found.append(("prompt_completion", [has["prompt"], has["completion"]]))
    if has["text"]:
        # text is the catch-all shape: a text field next to another format's key is a mix, not text
        others = [has[k] for k in ("messages", "instruction", "prompt") if has[k]]
        if others and not found:
            named = {has["messages"]: "openai|sharegpt", has["instruction"]: "alpaca", has["prompt"]: "prompt_completion"}
            raise DataError(f"{where}: record mixes formats: text ({has['text']!r}) next to "
                            f"{', '.join(map(repr, others))}; force one with --data-format "
                            f"{'|'.join(['text', *(named[k] for k in others)])}")
        found.append(("text", [has["text"]]))
    if not found:
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(raw)[:20]}; expected 'messages', "
            "'prompt'+'response' (or 'completion'), or 'text' (also: 'conversations' (sharegpt), "
            "'instruction'+'output' (alpaca)); map other names with --field-messages / --data-columns")
    if len(found) > 1:
        shown = ", ".join(f"{fmt} ({', '.join(map(repr, keys))})" for fmt, keys in found)
        names = "|".join("openai|sharegpt" if fmt == "chat" else fmt for fmt, _ in found)
        raise DataError(f"{where}: record mixes formats: {shown}; force one with --data-format {names}")
    fmt = found[0][0]
    if fmt == "chat":
        msgs = raw[has["messages"]]
        first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        role_key, _ = _get(first, opts._msg_keys["role"])
        return "sharegpt" if role_key == "from" or has["messages"] == "conversations" else "openai"
    return fmt


def to_canonical(raw: dict, where: str, options: DataOptions | None = None) -> tuple[dict, str]:
    """``(canonical record, format name)`` of one raw record, detected or as ``options.data_format``."""
    opts = options or DataOptions()
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    fmt = opts.data_format if opts.data_format != "auto" else detect_format(raw, where, opts)
    col = opts._columns
    used: set[str] = set()

    def need(key: str, kind: type = str) -> Any:
        name, value = _get(raw, col[key])
        if name is None:
            names = " or ".join(repr(n) for n in col[key])
            raise DataError(f"{where}: {fmt} record has no {names} (fields {sorted(raw)[:20]})")
        if not isinstance(value, kind):
            raise DataError(f"{where}: {name!r} must be a {'string' if kind is str else kind.__name__}, "
                            f"got {type(value).__name__}")
        used.add(name)
        return value

    def optional(key: str, kind: type = str) -> Any:
        return need(key, kind) if _get(raw, col[key])[0] else None

    if fmt in ("openai", "sharegpt"):
        name, _ = _get(raw, col["messages"])
        msgs = _messages(need("messages", list), where, opts, name or "messages")
        system = optional("system")
        if system:
            if msgs[0]["role"] == "system":
                raise DataError(f"{where}: both a {col['system'][0]!r} field and a system message")
            msgs.insert(0, _with_weight({"role": "system", "content": system}, opts))
        rec = {"messages": msgs}
    elif fmt == "alpaca":
        instruction, output = need("instruction"), need("output")
        inp = optional("input")
        msgs = []
        system = optional("system")
        if system:
            msgs.append({"role": "system", "content": system})
        for k, turn in enumerate(optional("history", list) or []):
            if (not isinstance(turn, list) or len(turn) != 2 or not all(isinstance(t, str) for t in turn)):
                raise DataError(f"{where}: history[{k}] must be a [prompt, response] pair of strings")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        # LLaMA-Factory's rendering of alpaca: instruction and input joined by a newline, as the user turn
        msgs += [{"role": "user", "content": instruction + ("\n" + inp if inp else "")},
                 {"role": "assistant", "content": output}]
        rec = {"messages": [_with_weight(m, opts) for m in msgs]}
    elif fmt == "prompt_completion":
        pname, prompt = _get(raw, col["prompt"])
        cname, completion = _get(raw, col["completion"])
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
            used.update((pname, cname))
            p = _messages(prompt, where, opts, pname, default_weight=0)
            c = _messages(completion, where, opts, cname, default_weight=1)
            rec = {"messages": p + c}
        else:
            need("prompt", object), need("completion", object)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                bad = pname if not isinstance(prompt, str) else cname
                raise DataError(f"{where}: 'prompt' and 'response' must be strings ({bad!r} is "
                                f"{type(raw[bad]).__name__}; message lists need both sides as lists)")
            rec = {"prompt": prompt, "response": completion}
    elif fmt == "text":
        rec = {"text": need("text")}
    else:  # pragma: no cover - DataOptions checks the name
        raise DataError(f"unknown data format {fmt!r}")
    # keep metadata (id, tools, ...), but no field of another format the renderer could read instead
    shadow = {n for names in col.values() for n in names} | {"messages", "prompt", "response", "completion", "text"}
    for key, value in raw.items():
        if key not in used and key not in shadow and value is not None:
            rec.setdefault(key, value)
    check_record(rec, where)
    return rec, fmt


def _with_weight(msg: dict, opts: DataOptions, default: int | None = None) -> dict:
    """Set ``weight`` when the data or the options decide it: the message's own weight, then
    ``roles_to_train``, then ``default``; otherwise leave the renderer's default (assistant turns)."""
    if "weight" not in msg:
        if opts.roles_to_train is not None:
            msg["weight"] = int(msg["role"] in opts.roles_to_train)
        elif default is not None:
            msg["weight"] = default
    return msg


def _messages(value: Any, where: str, opts: DataOptions, name: str, default_weight: int | None = None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name!r} must be a non-empty list")
    keys = opts._msg_keys
    out = []
    for j, m in enumerate(value):
        at = f"{where}: {name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with a role and a content, got {type(m).__name__}")
        rkey, role = _get(m, keys["role"])
        if not isinstance(role, str) or role not in opts._role_names:
            known = sorted(opts._role_names)
            raise DataError(f"{where}: {name}[{j}] must be {{'role': one of {sorted(_ROLES)}, 'content': str}}, "
                            f"got {m!r:.80}; role names read: {known}; map others with --roles "
                            "(e.g. --roles assistant=bot)")
        ckey = next((k for k in keys["content"] if k in m), None)
        content = m.get(ckey) if ckey else None
        if isinstance(content, list):
            content = _join_parts(content, at)
        elif content is None and m.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise DataError(f"{at}: content must be a string or a list of text parts, got "
                            f"{type(content).__name__ if ckey else 'no ' + ' or '.join(map(repr, keys['content']))}")
        msg = {"role": opts._role_names[role], "content": content}
        wkey, weight = _get(m, keys["weight"])
        if wkey is not None:
            if isinstance(weight, str) or weight not in (0, 1):
                raise DataError(f"{at}: weight must be 0 or 1, got {weight!r:.40}")
            msg["weight"] = int(weight)
        for k, v in m.items():  # tool_calls, name, tool_call_id, ... for chat templates that use them
            if k not in (rkey, ckey, wkey, *keys["role"], *keys["content"], *keys["weight"]) and v is not None:
                msg.setdefault(k, v)
        out.append(_with_weight(msg, opts, default_weight))
    return out


def _join_parts(parts: list, at: str) -> str:
    """Text of an OpenAI content-part list, parts joined by newlines; any other part type is an error."""
    texts = []
    for k, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(f"{at}: content part {k} is {kind!r:.40}, not text; only text parts can be trained")
        texts.append(part["text"])
    return "\n".join(texts)


def record_kind(rec: dict) -> str:
    """``chat``, ``pair``, ``text`` or ``unknown``: the canonical shape of a record."""
    if "messages" in rec:
        return "chat"
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return "pair"
    if "text" in rec:
        return "text"
    return "unknown"


def check_record(rec: dict, where: str) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``rec`` is one of the canonical shapes."""
    kind = record_kind(rec)
    if kind == "unknown":
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(rec)[:20]}; expected 'messages', "
            "'prompt'+'response' (or 'completion'), or 'text'"
        )
    if kind == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: messages[{j}] must be {{'role': one of {sorted(_ROLES)}, 'content': str}}, got {m!r:.80}"
                )
            if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], float)):
                raise DataError(f"{where}: messages[{j}] weight must be 0 or 1, got {m['weight']!r:.40}")
    elif kind == "pair":
        resp = rec.get("response", rec.get("completion"))
        if not isinstance(rec["prompt"], str) or not isinstance(resp, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    elif not isinstance(rec["text"], str) or not rec["text"]:
        raise DataError(f"{where}: 'text' must be a non-empty string")
