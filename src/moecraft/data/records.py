"""Reading task data: JSONL files, `datasets` folders, hub ids and built-in tasks, each record checked.

Record shapes accepted everywhere (extra metadata fields such as ``id`` or ``length`` are ignored):
  - chat:   ``{"messages": [{"role": "user"|"system"|"assistant", "content": str}, ...]}``
  - pair:   ``{"prompt": str, "response": str}`` (``completion`` is accepted for ``response``).
  - text:   ``{"text": str}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moecraft.errors import DataError

BUILTIN_PREFIX = "builtin:"
_ROLES = {"system", "user", "assistant"}


def load_records(source: str, limit: int | None = None) -> list[dict]:
    """Records from a JSONL file, a folder saved by ``datasets``, a hub id (``name[:split]``) or ``builtin:<task>[:split]``.

    Every record is checked (:func:`check_record`); the first bad one raises :class:`DataError` naming the
    file and line. An empty source is an error too.
    """
    source = str(source)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 (0 = no limit), got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        from moecraft.builtin_data import generate

        task, _, split = source[len(BUILTIN_PREFIX) :].partition(":")
        records = generate(task, split or "train")
        where = source
    else:
        path = Path(source)
        if path.is_file():
            records = _read_jsonl(path)
            where = str(path)
        elif path.is_dir():
            records = _read_datasets_folder(path)
            where = str(path)
        elif path.suffix in (".jsonl", ".json") or source.startswith((".", "/")):
            raise DataError(f"data file not found: {source}")
        else:
            records = _read_hub(source)
            where = source
    if not records:
        raise DataError(f"{where}: no records (empty data)")
    for i, rec in enumerate(records):
        check_record(rec, f"{where}:{i + 1}")
    return records[:limit] if limit else records


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line; bad JSON or a non-object names file and line."""
    rows = []
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
                    from exc
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            rows.append((lineno, rec))
    if not rows:
        raise DataError(f"{path}: empty file (no JSON lines)")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = read_jsonl_rows(path)
    # check here, where the real line numbers are known
    for lineno, rec in rows:
        check_record(rec, f"{path}:{lineno}")
    return [rec for _, rec in rows]


def _read_datasets_folder(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types here
        raise DataError(f"{path}: not a folder saved by datasets.save_to_disk ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [dict(r) for r in ds]


def _read_hub(source: str) -> list[dict]:
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not load data set '{source}' (not a file, folder or reachable hub id): {exc}") from exc
    return [dict(r) for r in ds]


def record_kind(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return "pair"
    if "text" in rec:
        return "text"
    return "unknown"


def check_record(rec: dict, where: str) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``rec`` is one of the accepted shapes."""
    kind = record_kind(rec)
    if kind == "unknown":
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(rec)}; expected 'messages', "
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
    elif kind == "pair":
        resp = rec.get("response", rec.get("completion"))
        if not isinstance(rec["prompt"], str) or not isinstance(resp, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    elif not isinstance(rec["text"], str) or not rec["text"]:
        raise DataError(f"{where}: 'text' must be a non-empty string")
